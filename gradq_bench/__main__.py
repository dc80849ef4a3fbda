"""``python -m gradq_bench``: the same as ``gradq-bench``."""

from gradq_bench.cli import entry

entry()
