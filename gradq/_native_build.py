"""Compiling the native kernels outside the install: setup.py builds the installed ``gradq._C`` with
FLAGS, and the tests (other instruction sets) and ``benchmarks/kernels_ab.py`` (an earlier revision of
the source) build further copies with the same flags through :func:`build`.

No import beyond the standard library at module level: setup.py reads FLAGS from this file before
anything is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

FLAGS = ["-O3", "-march=native", "-ffp-contract=off"]
SOURCES = ["csrc/gradq_kernels.cpp", "csrc/integer_gemm.cpp", "csrc/code_ops.cpp"]
"""The extension's translation units, relative to the repository root (csrc/gradq_kernels.cpp binds them)."""


def build(name: str, root: Path, directory: Path, extra_flags: Sequence[str] = ()) -> ModuleType:
    """SOURCES under ``root`` (those it has: an earlier revision may have fewer) compiled with FLAGS plus
    ``extra_flags`` into ``directory`` (created; reused while the sources and flags are unchanged) and
    imported as module ``name``."""
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(root / s) for s in SOURCES if (root / s).exists()]
    return load(name=name, sources=sources, extra_cflags=[*FLAGS, *extra_flags], build_directory=str(directory))
