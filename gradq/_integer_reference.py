"""Pure-PyTorch reference of the integer kernels (csrc/integer_gemm.cpp, csrc/code_ops.cpp): the same
arguments, the arithmetic of docs/integer.md section 3 computed directly (no uint8 flip, no offset trick), exact in
float64 because every partial sum is an integer below 2**31. The layout is read back by
:func:`unpack_layout`, so the tests of the kernels against this module also check the layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradq._reference import unpack_bits
from gradq.fixedpoint import requantize

BLOCK = 64


def unpack_layout(packed: torch.Tensor, bits: int, sign: bool, offset_binary: bool = False) -> torch.Tensor:
    """Codes q (C, kp) int64 of a weight layout (C, kp * bits / 8) uint8 (docs/kernels.md, "Integer GEMM");
    ``offset_binary``: the fields hold q + 2**(bits-1) instead of q's two's complement."""
    c, kp = packed.shape[0], packed.shape[1] * 8 // bits
    fields = unpack_bits(packed.reshape(-1), bits, c * kp).to(torch.int64)
    if bits in (2, 4):  # byte j holds code j of each slice
        fields = fields.view(c, kp // BLOCK, 8 * bits, 8 // bits).transpose(2, 3)
    fields = fields.reshape(c, kp)
    if sign:
        return 1 - 2 * fields
    half = 1 << (bits - 1)
    return fields - half if offset_binary else (fields ^ half) - half


def _integer_weights(packed: torch.Tensor, wide: torch.Tensor, bits: int, sign: bool, offset_binary: bool,
                     kp: int, sub: torch.Tensor, group_size: int) -> torch.Tensor:
    if wide.numel():
        return wide.to(torch.int64)
    q = unpack_layout(packed, bits, sign, offset_binary)
    if sub.numel():
        q = q * sub.to(torch.int64).repeat_interleave(group_size, dim=1)
    return q


def _bias_and_zero(offset: torch.Tensor, wi: torch.Tensor, zeff: int) -> torch.Tensor:
    """bq from offset = bq - zeff * sum_k Wi."""
    return offset + zeff * wi.sum(1)


def _finish(acc: torch.Tensor, offset: torch.Tensor, wi: torch.Tensor, zeff: int, mult: torch.Tensor,
            shift: torch.Tensor, zo: int, lo: int, hi: int, out_signed: bool, channel_dim: int) -> torch.Tensor:
    view = [1] * acc.dim()
    view[channel_dim] = -1
    acc = acc + _bias_and_zero(offset, wi, zeff).view(view)
    codes = requantize(acc, mult.to(torch.int64), shift.to(torch.int64), zo, lo, hi, channel_dim)
    return codes.to(torch.int8 if out_signed else torch.uint8)


def _centered(x: torch.Tensor, zeff: int) -> torch.Tensor:
    """x - zx as float64 (for int8 codes zeff = zx + 128 on the flipped codes, i.e. x - zx)."""
    flipped = x.to(torch.int64) + (128 if x.dtype == torch.int8 else 0)
    return (flipped - zeff).to(torch.float64)


def integer_linear(x: torch.Tensor, packed: torch.Tensor, wide: torch.Tensor, bits: int, sign: bool,
                   offset_binary: bool, kp: int,
                   sub: torch.Tensor, group_size: int, offset: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor,
                   zo: int, lo: int, hi: int, out_signed: bool, isa: int, zeff: int) -> torch.Tensor:
    """Output codes (rows, C) of the integer Linear for input codes ``x`` (rows, K)."""
    wi = _integer_weights(packed, wide, bits, sign, offset_binary, kp, sub, group_size)[:, : x.shape[1]]
    acc = (_centered(x, zeff) @ wi.T.to(torch.float64)).to(torch.int64)
    return _finish(acc, offset, wi, zeff, mult, shift, zo, lo, hi, out_signed, -1)


def integer_conv2d(x: torch.Tensor, packed: torch.Tensor, wide: torch.Tensor, bits: int, sign: bool,
                   offset_binary: bool, kp: int,
                   sub: torch.Tensor, group_size: int, offset: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor,
                   zo: int, lo: int, hi: int, out_signed: bool, isa: int, kernel: list[int], stride: list[int],
                   padding: list[int], dilation: list[int], groups: int, zx: int, zeff: int) -> torch.Tensor:
    """Output codes (N, C, OH, OW) of the integer Conv2d for input codes ``x`` (N, C_in, H, W), weights in
    (kh, kw, C_in / groups) order; zero padding pads ``x - zx`` with 0."""
    n, cin = x.shape[:2]
    k = cin // groups * kernel[0] * kernel[1]
    wi = _integer_weights(packed, wide, bits, sign, offset_binary, kp, sub, group_size)[:, :k]
    wi = wi.view(-1, *kernel, cin // groups).permute(0, 3, 1, 2).reshape(-1, k)  # F.unfold's (C_in, kh, kw)
    cols = F.unfold(_centered(x, zeff), kernel, dilation=dilation, padding=padding, stride=stride)
    c = wi.shape[0]
    w = wi.to(torch.float64).view(groups, c // groups, k)
    acc = torch.matmul(w, cols.view(n, groups, k, -1)).reshape(n, c, -1).to(torch.int64)
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    codes = _finish(acc, offset, wi, zeff, mult, shift, zo, lo, hi, out_signed, 1)
    return codes.view(n, c, oh, -1)


def requantize_int32(acc: torch.Tensor, offset: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, zo: int,
                     lo: int, hi: int, out_signed: bool) -> torch.Tensor:
    """Output codes (rows, C) of int32 accumulators (rows, C) plus ``offset`` (wrapping in int32), requantized."""
    acc = (acc.to(torch.int64) + offset + 2**31) % 2**32 - 2**31
    codes = requantize(acc, mult.to(torch.int64), shift.to(torch.int64), zo, lo, hi, -1)
    return codes.to(torch.int8 if out_signed else torch.uint8)


def im2col_codes(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
                 groups: int, width: int, zx: int, minus_128: bool) -> torch.Tensor:
    """Rows (N * OH * OW, groups * width) uint8 of the patches of codes ``x``: each group's K columns (in
    (kh, kw, C_in / groups) order) then zeros up to ``width``; padding with the code ``zx``; uint8 codes as
    they are, int8 codes plus 128, and with ``minus_128`` the int8 bits of those values minus 128."""
    mask = (128 if x.dtype == torch.int8 else 0) ^ (128 if minus_128 else 0)
    bits = (x.view(torch.uint8).to(torch.int64) ^ mask).to(torch.float64)
    pad = float((zx & 0xFF) ^ mask)
    cols = F.unfold(bits - pad, kernel, dilation=dilation, padding=padding, stride=stride) + pad
    n, kg, positions = cols.shape
    k, taps = kg // groups, kernel[0] * kernel[1]
    hwc = cols.view(n, groups, k // taps, taps, positions).transpose(2, 3).reshape(n, groups, k, positions)
    per_group = F.pad(hwc, (0, 0, 0, width - k))
    return per_group.permute(0, 3, 1, 2).reshape(n * positions, groups * width).to(torch.uint8)


def max_pool2d_codes(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> torch.Tensor:
    """Max pooling of codes (N, C, H, W), padding never chosen (exact in float64)."""
    return F.max_pool2d(x.to(torch.float64), kernel, stride, padding).to(x.dtype)


def add_codes(a: torch.Tensor, b: torch.Tensor, za: int, zb: int, ma: int, mb: int, n: int, zo: int, lo: int,
              hi: int, out_signed: bool | None) -> torch.Tensor:
    """The integer residual add (docs/integer.md section 5) of code tensors ``a`` and ``b`` (broadcasting):
    int8/uint8 codes, or int64 for ``out_signed=None``."""
    v = (a.to(torch.int64) - za) * ma + (b.to(torch.int64) - zb) * mb
    codes = ((v + (1 << (n - 1))) >> n).add_(zo).clamp_(lo, hi)
    return codes if out_signed is None else codes.to(torch.int8 if out_signed else torch.uint8)


def avg_pool2d_codes(q: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int],
                     zero_point: int) -> torch.Tensor:
    """Average pooling of integer codes ``q`` (N, C, H, W) on their grid (docs/integer.md section 5): the
    window's mean code (padding counted as ``z``) rounded to nearest, ties to the even code. Same dtype as
    ``q``."""
    x = q.to(torch.float64)  # sums of integers below 2**53: exact
    total = F.avg_pool2d(x - zero_point, kernel, stride, padding, ceil_mode=False, count_include_pad=True,
                         divisor_override=1).to(torch.int64)
    count = kernel[0] * kernel[1]
    twice = 2 * (total + count * zero_point) + count  # mean code + 1/2 = twice / (2 count)
    out = torch.div(twice, 2 * count, rounding_mode="floor")
    out = out - ((twice % (2 * count) == 0) & (out % 2 != 0)).to(torch.int64)
    return out.to(q.dtype)


def quantize_codes(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                   out_signed: bool) -> list[torch.Tensor]:
    """``clamp(round(fp32(x / scale)) + zero_point, qmin, qmax)`` as int8/uint8 codes (round half to even,
    the arithmetic of ``gradq.quantize``), and whether every value of ``x`` was finite."""
    y = torch.round(x.to(torch.float32) / torch.tensor(scale, dtype=torch.float32)) + float(zero_point)
    codes = y.clamp(qmin, qmax).nan_to_num(float(qmin)).to(torch.int8 if out_signed else torch.uint8)
    return [codes, torch.isfinite(x).all()]


def dequantize_codes(codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``fp32(q - zero_point) * fp32(scale)`` of int8/uint8 codes (exact subtraction, one rounding)."""
    return (codes.to(torch.int32) - zero_point).to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
