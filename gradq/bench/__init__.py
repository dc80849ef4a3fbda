"""gradq-bench: data-parallel training with each compressor, its traffic, step time and accuracy.

Run ``gradq-bench --help`` (or ``python -m gradq.bench``). A user's own model plugs in through
``--model module:function`` where the function returns a :class:`Workload`.
"""

from gradq.bench.cli import main
from gradq.bench.workloads import Workload

__all__ = ["Workload", "main"]
