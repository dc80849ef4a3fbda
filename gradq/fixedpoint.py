"""Fixed-point requantization of int32 accumulators (docs/integer.md, section 3): the reference arithmetic."""

from __future__ import annotations

import torch

INT32_MAX = 2**31 - 1


def quantize_multiplier(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real multipliers ``m`` (float64, >= 0, < 2**30) as ``(M, n)`` int64 tensors with m ~ M * 2**-n.

    M lies in [2**30, 2**31) and n >= 1; a multiplier below 2**-31 becomes M = 0, n = 1 (every product
    then rounds to 0). Raises ValueError for negative, non-finite or too large multipliers.
    """
    if m.dtype != torch.float64:
        raise TypeError(f"multipliers must be float64, got {m.dtype}")
    if not bool((torch.isfinite(m) & (m >= 0) & (m < 2.0**30)).all()):
        raise ValueError("requantization multipliers must be finite and in [0, 2**30): check the layer's scales")
    frac, exp = torch.frexp(m)
    mult = torch.round(frac * 2.0**31).to(torch.int64)
    carry = mult == 2**31
    mult = torch.where(carry, torch.full_like(mult, 2**30), mult)
    shift = 31 - (exp.to(torch.int64) + carry.to(torch.int64))
    tiny = (shift > 62) | (m == 0)
    mult = torch.where(tiny, torch.zeros_like(mult), mult)
    shift = torch.where(tiny, torch.ones_like(shift), shift)
    return mult, shift


def requantize(
    acc: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, zero_point: int, lo: int, hi: int, channel_dim: int
) -> torch.Tensor:
    """Output codes ``clamp(((acc * M + 2**(n-1)) >> n) + zero_point, lo, hi)`` as int64.

    ``acc``: int64 holding int32 values; ``mult``/``shift``: int64 (C,) per output channel, which is
    dimension ``channel_dim`` of ``acc`` (-1 for Linear, 1 for convolutions).
    """
    view = [1] * acc.dim()
    view[channel_dim] = -1
    m, n = mult.view(view), shift.view(view)
    v = acc * m  # a new tensor: the rest runs in place
    v.add_(torch.ones_like(n) << (n - 1)).bitwise_right_shift_(n)
    return v.add_(zero_point).clamp_(lo, hi)
