"""The native kernels built again without AVX-512, and without AVX2 and BMI2, so that the tests also cover
the code paths of CPUs that lack those extensions (the installed gradq._C takes the widest path this
CPU has). Each variant compiles once into build/kernel-variants/ (about a minute on two cores)."""

import functools
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-O3", "-march=native", "-ffp-contract=off"]  # as setup.py
VARIANTS = {"avx2": ["-mno-avx512f"], "scalar": ["-mno-avx2", "-mno-bmi2"]}


@functools.cache
def build(variant: str) -> ModuleType:
    """The kernels compiled with setup.py's flags plus VARIANTS[variant], imported as a module."""
    from torch.utils.cpp_extension import load

    directory = ROOT / "build" / "kernel-variants" / variant
    directory.mkdir(parents=True, exist_ok=True)
    return load(
        name=f"gradq_kernels_{variant}",
        sources=[str(ROOT / "csrc" / "gradq_kernels.cpp")],
        extra_cflags=[*FLAGS, *VARIANTS[variant]],
        build_directory=str(directory),
    )
