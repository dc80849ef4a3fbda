"""Chooses between the native kernels (gradq._C) and the pure-PyTorch reference.

``GRADQ_KERNELS`` selects: ``auto`` (default: native for CPU tensors when built), ``native`` (fail if
not built) or ``reference``. It is read at each call, so it can be changed at run time.
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
_CHOICES = ("auto", "native", "reference")
_warned = False


def native_available() -> bool:
    """True when the native CPU kernels were built and import."""
    return _C is not None


def _choice() -> str:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(_CHOICES)}")
    return choice


def kernels_for(t: torch.Tensor) -> ModuleType:
    """The kernel module to use for tensor ``t``: ``gradq._C`` or ``gradq._reference``."""
    global _warned
    choice = _choice()
    if choice == "reference":
        return _reference
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
