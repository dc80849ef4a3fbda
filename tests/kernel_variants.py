"""The native kernels built again without AVX-512, and without AVX2 and BMI2, so that the tests also cover
the code paths of CPUs that lack those extensions (the installed gradq._C takes the widest path this
CPU has). Each variant compiles once into build/kernel-variants/ (about a minute on two cores)."""

import functools
from pathlib import Path
from types import ModuleType

from gradq import _native_build

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"avx2": ["-mno-avx512f"], "scalar": ["-mno-avx2", "-mno-bmi2"]}


@functools.cache
def build(variant: str) -> ModuleType:
    """The kernels compiled with setup.py's flags plus VARIANTS[variant], imported as a module."""
    return _native_build.build(
        f"gradq_kernels_{variant}",
        ROOT,
        ROOT / "build" / "kernel-variants" / variant,
        VARIANTS[variant],
    )
