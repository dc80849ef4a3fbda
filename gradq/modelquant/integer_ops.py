"""The integer operations of docs/integer.md on code tensors: the layer (section 3, the exact float
emulation), the residual add and average pooling (section 5). Shared by the prepared model's eval() and
the converted integer model, so both compute the same integers by construction."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gradq import _integer_reference
from gradq.fixedpoint import quantize_multiplier, requantize

LAYER_FUNCTIONS = {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d}
"""The float op of each layer kind, with (input, weight, bias, **conv_args)."""


def accumulate(
    xi: torch.Tensor, wi: torch.Tensor, kind: str, conv_args: dict, weight_shape: torch.Size, bound: int
) -> torch.Tensor:
    """acc = sum_k xi * Wi (int64) by im2col and a float GEMM that is exact: every partial sum is an integer
    below ``bound``, so fp32 is exact under 2**24 (at full fp32 matmul precision), else fp64.

    ``xi``: input codes minus the zero point, (N, K) for Linear or (N, C, *spatial) for convolutions;
    ``wi``: (C_out, K) integer weights; ``kind``: linear, conv1d or conv2d with ``conv_args``.
    """
    exact32 = bound < 2**24 and torch.get_float32_matmul_precision() == "highest"
    dtype = torch.float32 if exact32 else torch.float64
    w = wi.to(dtype)
    if kind == "linear":
        return (xi.to(dtype) @ w.T).to(torch.int64)
    two_d = kind == "conv2d"

    def pair(v: tuple, one: int) -> tuple:  # a Conv1d runs as a Conv2d of height 1
        return tuple(v) if two_d else (one, v[0])

    kernel = pair(weight_shape[2:], 1)
    stride = pair(conv_args["stride"], 1)
    padding, dilation = pair(conv_args["padding"], 0), pair(conv_args["dilation"], 1)
    x4 = xi.to(dtype) if two_d else xi.to(dtype).unsqueeze(2)
    cols = F.unfold(x4, kernel, dilation=dilation, padding=padding, stride=stride)
    groups, n = conv_args["groups"], x4.shape[0]
    out_hw = [
        (x4.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
    ]
    acc = torch.matmul(w.view(groups, -1, w.shape[1]), cols.view(n, groups, w.shape[1], -1))
    return acc.reshape(n, w.shape[0], *(out_hw if two_d else out_hw[1:])).to(torch.int64)


def integer_layer(
    codes: torch.Tensor, p: dict, kind: str, conv_args: dict, weight_shape: torch.Size
) -> torch.Tensor:
    """Output codes (int64) of the integer layer with parameters ``p`` (``QuantLayer.integer_parameters``)
    for input ``codes`` (any integer dtype, the input quantizer's codes; a convolution's may be unbatched)."""
    if kind != "linear" and codes.dim() == len(weight_shape) - 1:
        return integer_layer(codes.unsqueeze(0), p, kind, conv_args, weight_shape).squeeze(0)
    xi = codes.to(torch.int64) - p["zx"]
    acc = accumulate(xi, p["Wi"], kind, conv_args, weight_shape, p["bound"])
    channel_dim = -1 if kind == "linear" else 1
    view = [1] * acc.dim()
    view[channel_dim] = -1
    acc = acc + p["bq"].view(view)
    return requantize(acc, p["M"], p["n"], p["zo"], p["lo"], p["hi"], channel_dim)


def add_multipliers(sa: torch.Tensor, sb: torch.Tensor, so: torch.Tensor) -> tuple[int, int, int]:
    """(Ma, Mb, n) of the integer add (docs/integer.md section 5): ``m = fp64(s_in) / fp64(so)`` for each
    input as ``M * 2**-n`` with one shift ``n`` for both, chosen (as in section 3) for the larger multiplier,
    and the smaller rounded to the nearest integer (ties to even) at the same shift. Raises ValueError if a
    multiplier is 2**30 or more."""
    ma, mb = float(sa.double() / so.double()), float(sb.double() / so.double())
    big, shift = quantize_multiplier(torch.tensor([max(ma, mb)], dtype=torch.float64))
    n = int(shift)
    if int(big) == 0:
        return 0, 0, 1
    return round(math.ldexp(ma, n)), round(math.ldexp(mb, n)), n


def integer_add(qa: torch.Tensor, qb: torch.Tensor, p: dict) -> torch.Tensor:
    """Output codes (int64) of the residual add: ``clamp(((qa - za) Ma + (qb - zb) Mb + 2**(n-1)) >> n) + zo,
    lo, hi)``, broadcasting ``qa`` and ``qb``; ``p`` holds za, zb, Ma, Mb, n, zo, lo, hi as ints."""
    return _integer_reference.add_codes(qa, qb, p["za"], p["zb"], p["Ma"], p["Mb"], p["n"], p["zo"], p["lo"],
                                        p["hi"], None)


def pool_window(q: torch.Tensor, kernel: tuple[int, ...] | None, stride: tuple[int, ...],
                padding: tuple[int, ...]) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """``q`` (N, C, L) or (N, C, H, W) as 4-D with the 2-D kernel, stride and padding of an average pooling
    (``kernel=None``: the whole plane)."""
    x = q if q.dim() == 4 else q.unsqueeze(2)
    if kernel is None:
        return x, list(x.shape[2:]), list(x.shape[2:]), [0, 0]
    if q.dim() == 4:
        return x, list(kernel), list(stride), list(padding)
    return x, [1, kernel[0]], [1, stride[0]], [0, padding[0]]


def integer_avg_pool(q: torch.Tensor, zero_point: int, kernel: tuple[int, ...] | None, stride: tuple[int, ...],
                     padding: tuple[int, ...]) -> torch.Tensor:
    """Output codes (int64) of average pooling on codes ``q`` (N, C, L) or (N, C, H, W), on the same grid:
    the window's mean code rounded to nearest, ties to the even code, where padding counts as real zeros
    (codes ``z``) and the mean divides by the window size; ``kernel=None`` pools the whole plane (global
    average pooling to size 1)."""
    x, k, s, p = pool_window(q.to(torch.int64), kernel, stride, padding)
    out = _integer_reference.avg_pool2d_codes(x, k, s, p, zero_point)
    return out if q.dim() == 4 else out.squeeze(2)
