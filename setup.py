"""Builds the native CPU kernels (csrc/) as the optional extension gradq._C.

If the compiler fails, the install still succeeds (``optional=True``) and gradq runs on its
pure-PyTorch reference kernels, saying so once at first use.
"""

import runpy
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

BUILD = runpy.run_path(str(Path(__file__).parent / "gradq" / "_native_build.py"))

setup(
    ext_modules=[
        CppExtension(
            "gradq._C",
            BUILD["SOURCES"],
            extra_compile_args=BUILD["FLAGS"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
