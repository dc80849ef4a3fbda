"""gradq-bench: data-parallel training with each compressor, its traffic, step time and accuracy.

Run ``gradq-bench --help`` (or ``python -m gradq_bench``). A user's own model plugs in through
``--model module:function`` where the function returns a :class:`Workload`.
"""

from gradq_bench.workloads import Workload


def main(argv: list[str] | None = None) -> int:
    """The command line (see ``gradq-bench --help``); returns the exit status."""
    from gradq_bench.cli import main as cli_main  # imported late: ranks start as python -m gradq_bench.worker

    return cli_main(argv)


__all__ = ["Workload", "main"]
