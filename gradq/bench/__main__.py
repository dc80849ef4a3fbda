"""``python -m gradq.bench``: the same as ``gradq-bench``."""

from gradq.bench.cli import entry

entry()
