"""Chooses between the native CPU kernels (gradq._C), the Triton GPU kernels (gradq._triton_kernels) and
the pure-PyTorch reference.

``GRADQ_KERNELS`` selects: ``auto`` (default: native for CPU tensors when built, Triton for CUDA tensors),
``native`` (CPU tensors only; fail if not built), ``reference``, or ``triton`` (the Triton kernels for every
tensor; CPU tensors through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before gradq is
imported). It is read at each call, so it can be changed at run time.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from gradq import _reference

try:
    from gradq import _C
except ImportError as exc:  # pragma: no cover - exercised only where the build failed
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

ENV_VAR = "GRADQ_KERNELS"
_CHOICES = ("auto", "native", "reference", "triton")
_warned = False


def native_available() -> bool:
    """True when the native CPU kernels were built and import."""
    return _C is not None


def _choice() -> str:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(_CHOICES)}")
    return choice


def triton_kernels(t: torch.Tensor) -> ModuleType:
    """``gradq._triton_kernels`` for tensor ``t``, or a clear error when Triton is missing or cannot run it."""
    try:
        from gradq import _triton_kernels
    except ImportError as exc:
        raise RuntimeError(
            f"gradq's kernels for {t.device.type} tensors need Triton, which failed to import ({exc}); "
            f"install it with `pip install 'gradq[gpu]'`, or set {ENV_VAR}=reference"
        ) from exc
    if t.device.type == "cuda" and _triton_kernels.INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET is set, so Triton runs kernels on CPU tensors only; unset it for CUDA tensors"
        )
    if t.device.type != "cuda" and not _triton_kernels.INTERPRETED:
        raise ValueError(
            f"the Triton kernels run on CUDA tensors, got one on {t.device}; for CPU tensors set "
            "TRITON_INTERPRET=1 before importing gradq (Triton's interpreter) or use the native kernels"
        )
    return _triton_kernels


def is_triton(module: ModuleType) -> bool:
    """Whether ``module`` (from :func:`kernels_for`) is the Triton kernels (imported only when used)."""
    return module.__name__ == "gradq._triton_kernels"


def uses_triton(t: torch.Tensor) -> bool:
    """Whether gradq's kernels for ``t`` are the Triton ones (CUDA tensors, or ``GRADQ_KERNELS=triton``)."""
    return is_triton(kernels_for(t))


def kernels_for(t: torch.Tensor) -> ModuleType:
    """The kernel module for tensor ``t``: ``gradq._C``, ``gradq._triton_kernels`` or ``gradq._reference``."""
    global _warned
    choice = _choice()
    if choice == "reference":
        return _reference
    if choice == "triton" or (choice == "auto" and t.device.type == "cuda"):
        return triton_kernels(t)
    if choice == "native":
        if _C is None:
            raise RuntimeError(
                f"{ENV_VAR}=native but the native kernels are not built ({_IMPORT_ERROR}); "
                "reinstall with `pip install --no-build-isolation -e .` and a C++ compiler, "
                f"or set {ENV_VAR}=reference"
            )
        if t.device.type != "cpu":
            raise ValueError(f"{ENV_VAR}=native runs on CPU tensors only, got one on {t.device}")
        return _C
    if t.device.type != "cpu":
        return _reference
    if _C is None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"gradq: native kernels unavailable ({_IMPORT_ERROR}); using the pure-PyTorch "
                "reference kernels (much slower). Reinstall with a C++ compiler to build them.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _reference
    return _C
