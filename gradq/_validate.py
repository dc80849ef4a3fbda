"""Argument checks shared by the public functions: each error names the argument and the fix."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: tuple[torch.dtype, ...],
    dim: int | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor of one of ``dtypes`` (and ``dim``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {t.dtype}; convert it with .to()")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}; flatten it first")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() on it first")
    return t


def check_int(name: str, value: object, *, lo: int, hi: int | None = None) -> int:
    """Raise unless ``value`` is an int in [lo, hi] (bool is rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_bits(bits: object) -> int:
    """Code width in bits: an int from 1 to 8."""
    return check_int("bits", bits, lo=1, hi=8)


def check_block(block: object) -> int:
    """Scale-block length: a positive multiple of 8 (keeps every block byte-aligned for all widths)."""
    check_int("block", block, lo=8)
    if block % 8:
        raise ValueError(f"block must be a multiple of 8, got {block}")
    return block


def check_flag(name: str, value: object) -> bool:
    """Raise TypeError unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
