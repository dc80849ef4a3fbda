"""Triton kernels of the integer model: the GPU backend of ``gradq.integer_kernels`` (docs/kernels.md,
"Integer GEMM on the GPU").

- :func:`integer_linear` / :func:`integer_conv2d`: the integer GEMM with weights read in gradq's packed
  layout (1, 2, 4 or 8 bits, sub-scales per group, or int16 Wi), unpacked in registers and multiplied on
  int8 tensor cores (``tl.dot`` of int8 tiles, int32 accumulators), and the requantization epilogue fused;
  the same arguments as ``gradq._integer_reference`` and the same codes, bit for bit.
- :func:`requantize_int32`: the epilogue alone, after ``torch._int_mm`` (the ``int_mm`` engine).
- :func:`weight_only_linear`: the weight-only (W4A16) Linear: float activations times packed weights, fp32
  accumulation, per-channel scale and bias once at the end.

The int32 arithmetic wraps (it is exact modulo 2**32), and the true accumulator fits int32 by the
layer's accumulator bound (docs/integer.md section 3), so the wrapped sum is the exact one. Input codes
enter the products as signed bytes: uint8 codes minus 128, int8 codes as they are; the planned
``signed_offset`` (bias, zero point and the 128 * sum_k Wi of that shift) restores the exact sum.
With ``TRITON_INTERPRET=1`` set before gradq is imported the same kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradq._integer_reference import im2col_codes
from gradq._triton_kernels import INTERPRETED

BLOCK = 64  # codes per block of the weight layout: one K step of the GEMM


@triton.jit
def _layout_codes(packed, rows, kb, row_bytes, BITS: tl.constexpr, SIGN: tl.constexpr,
                  OFFSET_BINARY: tl.constexpr):
    """(64, BN) int32 codes q of layout block ``kb`` for weight rows ``rows`` (BN,) (docs/kernels.md)."""
    i = tl.arange(0, 64)
    if BITS == 1:
        byte, shift = i // 8, i % 8
    elif BITS == 8:
        byte, shift = i, i * 0
    else:  # 2 and 4 bits: 8 / BITS slices of 8 * BITS codes; byte j holds code j of each slice
        byte, shift = i % (8 * BITS), BITS * (i // (8 * BITS))
    raw = tl.load(packed + rows[None, :].to(tl.int64) * row_bytes + kb * 8 * BITS + byte[:, None])
    field = (raw.to(tl.int32) >> shift[:, None]) & ((1 << BITS) - 1)
    if SIGN:
        q = 1 - 2 * field
    elif OFFSET_BINARY:
        q = field - (1 << (BITS - 1))
    else:
        q = (field ^ (1 << (BITS - 1))) - (1 << (BITS - 1))
    return q


@triton.jit
def _integer_gemm_kernel(x, x_stride, packed, wide, sub, signed_offset, mult, shift, out, out_stride,
                         m, cpg, k, kp, group_size, n_groups, zo, lo, hi,
                         BITS: tl.constexpr, SIGN: tl.constexpr, OFFSET_BINARY: tl.constexpr,
                         WIDE: tl.constexpr, HAS_SUB: tl.constexpr, X_UNSIGNED: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr):
    """out[r, g * cpg + c] = requantize(sum_k xs[r, g * kp + k] * Wi[g * cpg + c, k] + signed_offset) for
    a (BM, BN) tile of rows r and channels c of conv group g (program axis 2)."""
    g = tl.program_id(2)
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.program_id(1) * BN + tl.arange(0, BN)
    ch = g * cpg + tl.minimum(c, cpg - 1)  # clamped: out-of-range channels read a real row, never stored
    row_ok = r < m
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for kb in range(0, kp // 64):
        kk = kb * 64 + tl.arange(0, 64)
        ok = row_ok[:, None] & (kk < k)[None, :]
        xt = tl.load(x + r[:, None].to(tl.int64) * x_stride + g * kp + kk[None, :], mask=ok, other=0)
        xs = xt.to(tl.int32) - 128 if X_UNSIGNED else xt.to(tl.int32)
        xs = tl.where(ok, xs, 0).to(tl.int8)
        if WIDE:  # int16 Wi = 256 * hi + lo with lo, hi in int8 (|Wi| <= 32640)
            w = tl.load(wide + ch[None, :].to(tl.int64) * kp + kk[:, None]).to(tl.int32)
            w_lo = ((w + 128) & 255) - 128
            part = tl.dot(xs, w_lo.to(tl.int8)) + 256 * tl.dot(xs, ((w - w_lo) >> 8).to(tl.int8))
        else:
            q = _layout_codes(packed, ch, kb, kp * BITS // 8, BITS, SIGN, OFFSET_BINARY)
            part = tl.dot(xs, q.to(tl.int8))
        if HAS_SUB:
            part = part * tl.load(sub + ch * n_groups + kb * 64 // group_size)[None, :]
        acc += part
    total = (acc + tl.load(signed_offset + ch).to(tl.int32)[None, :]).to(tl.int64)
    n = tl.load(shift + ch).to(tl.int64)[None, :]
    v = (total * tl.load(mult + ch).to(tl.int64)[None, :] + (tl.full((1, BN), 1, tl.int64) << (n - 1))) >> n
    codes = tl.minimum(tl.maximum(v + zo, lo), hi).to(out.dtype.element_ty)
    store = row_ok[:, None] & (c < cpg)[None, :]
    tl.store(out + r[:, None].to(tl.int64) * out_stride + (g * cpg + c)[None, :], codes, mask=store)


@triton.jit
def _requantize_kernel(acc, signed_offset, mult, shift, out, rows, c, zo, lo, hi, BR: tl.constexpr,
                       BC: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = (r < rows)[:, None] & (ch < c)[None, :]
    chc = tl.minimum(ch, c - 1)
    index = r[:, None].to(tl.int64) * c + ch[None, :]
    a = tl.load(acc + index, mask=ok, other=0)
    total = (a + tl.load(signed_offset + chc).to(tl.int32)[None, :]).to(tl.int64)
    n = tl.load(shift + chc).to(tl.int64)[None, :]
    v = (total * tl.load(mult + chc).to(tl.int64)[None, :] + (tl.full((1, BC), 1, tl.int64) << (n - 1))) >> n
    tl.store(out + index, tl.minimum(tl.maximum(v + zo, lo), hi).to(out.dtype.element_ty), mask=ok)


@triton.jit
def _weight_only_kernel(x, packed, wide, sub, scale, bias, out, m, c, k, kp, group_size, n_groups,
                        BITS: tl.constexpr, SIGN: tl.constexpr, OFFSET_BINARY: tl.constexpr, WIDE: tl.constexpr,
                        HAS_SUB: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr):
    """out[r, ch] = (sum over K steps of (x[r, :] . q[ch, :]) * sub) * scale[ch] + bias[ch], all fp32."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    cc = tl.program_id(1) * BN + tl.arange(0, BN)
    ch = tl.minimum(cc, c - 1)
    row_ok = r < m
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, kp // 64):
        kk = kb * 64 + tl.arange(0, 64)
        xt = tl.load(x + r[:, None].to(tl.int64) * k + kk[None, :], mask=row_ok[:, None] & (kk < k)[None, :],
                     other=0.0)
        if WIDE:  # int16 Wi is exact in fp32, not in bf16
            w = tl.load(wide + ch[None, :].to(tl.int64) * kp + kk[:, None]).to(tl.float32)
            part = tl.dot(xt.to(tl.float32), w, input_precision="ieee")
        else:  # |q| <= 128: exact in x's dtype
            q = _layout_codes(packed, ch, kb, kp * BITS // 8, BITS, SIGN, OFFSET_BINARY)
            if DOT_FP32:  # the same exact products and fp32 sums, for the interpreter (numpy has no bf16)
                part = tl.dot(xt.to(tl.float32), q.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(xt, q.to(xt.dtype), input_precision="ieee")
        if HAS_SUB:
            part = part * tl.load(sub + ch * n_groups + kb * 64 // group_size).to(tl.float32)[None, :]
        acc += part
    y = acc * tl.load(scale + ch)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias + ch).to(tl.float32)[None, :]
    index = r[:, None].to(tl.int64) * c + cc[None, :]
    tl.store(out + index, y, mask=row_ok[:, None] & (cc < c)[None, :])


def _tiles(rows: int, channels: int) -> tuple[int, int]:
    """(BM, BN): 16-row tiles for GEMV-like calls, 64 x 64 otherwise, 128 x 128 for large GEMMs."""
    if rows <= 16:
        return 16, 64
    return (128, 128) if rows >= 1024 and channels >= 128 else (64, 64)


def _groups(sub: torch.Tensor) -> int:
    """Sub-scales per weight row (1 without sub-scales: the kernels then never read them)."""
    return sub.shape[1] if sub.numel() else 1


def _or_dummy(dummy: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors, an empty one replaced by ``dummy`` (a kernel argument its constexpr flags never read)."""
    return [t if t.numel() else dummy for t in tensors]


def _launch_gemm(x: torch.Tensor, x_stride: int, rows: int, groups: int, k: int, packed: torch.Tensor,
                 wide: torch.Tensor, bits: int, sign: bool, offset_binary: bool, kp: int, sub: torch.Tensor,
                 group_size: int, signed_offset: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, zo: int,
                 lo: int, hi: int, out_signed: bool, x_unsigned: bool) -> torch.Tensor:
    c = signed_offset.numel()
    out = torch.empty(rows, c, dtype=torch.int8 if out_signed else torch.uint8, device=x.device)
    cpg = c // groups
    bm, bn = _tiles(rows, cpg)
    if rows and c:
        grid = (triton.cdiv(rows, bm), triton.cdiv(cpg, bn), groups)
        _integer_gemm_kernel[grid](
            x, x_stride, *_or_dummy(signed_offset, packed, wide, sub), signed_offset, mult, shift, out, c, rows, cpg,
            k, kp, max(group_size, 1), _groups(sub), zo, lo, hi,
            BITS=bits, SIGN=sign, OFFSET_BINARY=offset_binary, WIDE=wide.numel() > 0, HAS_SUB=sub.numel() > 0,
            X_UNSIGNED=x_unsigned, BM=bm, BN=bn,
        )
    return out


def integer_linear(x: torch.Tensor, packed: torch.Tensor, wide: torch.Tensor, bits: int, sign: bool,
                   offset_binary: bool, kp: int, sub: torch.Tensor, group_size: int, signed_offset: torch.Tensor,
                   mult: torch.Tensor, shift: torch.Tensor, zo: int, lo: int, hi: int,
                   out_signed: bool) -> torch.Tensor:
    """Output codes (rows, C) of input codes ``x`` (rows, K) contiguous uint8/int8 (``gradq.IntegerGemm``'s
    fields; ``signed_offset`` in place of ``offset``)."""
    return _launch_gemm(x, x.shape[1], x.shape[0], 1, x.shape[1], packed, wide, bits, sign, offset_binary, kp,
                        sub, group_size, signed_offset, mult, shift, zo, lo, hi, out_signed,
                        x_unsigned=x.dtype == torch.uint8)


def integer_conv2d(x: torch.Tensor, packed: torch.Tensor, wide: torch.Tensor, bits: int, sign: bool,
                   offset_binary: bool, kp: int, sub: torch.Tensor, group_size: int, signed_offset: torch.Tensor,
                   mult: torch.Tensor, shift: torch.Tensor, zo: int, lo: int, hi: int, out_signed: bool,
                   kernel: list[int], stride: list[int], padding: list[int], dilation: list[int], groups: int,
                   zx: int) -> torch.Tensor:
    """Output codes (N, C, OH, OW), channels last in memory, of input codes ``x`` (N, C_in, H, W): the
    patches as signed bytes (im2col by PyTorch ops on the device), then the GEMM of every group at once."""
    n, cin = x.shape[:2]
    k = cin // groups * kernel[0] * kernel[1]
    cols = im2col_codes(x, kernel, stride, padding, dilation, groups, kp, zx, True).contiguous().view(torch.int8)
    codes = _launch_gemm(cols, groups * kp, cols.shape[0], groups, k, packed, wide, bits, sign, offset_binary, kp,
                         sub, group_size, signed_offset, mult, shift, zo, lo, hi, out_signed, x_unsigned=False)
    oh, ow = ((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in (0, 1))
    return codes.view(n, oh, ow, -1).permute(0, 3, 1, 2)


def requantize_int32(acc: torch.Tensor, signed_offset: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor,
                     zo: int, lo: int, hi: int, out_signed: bool) -> torch.Tensor:
    """Output codes (rows, C) of int32 accumulators ``acc`` (rows, C) contiguous plus ``signed_offset``
    (wrapping in int32), requantized: ``gradq._integer_reference.requantize_int32``."""
    rows, c = acc.shape
    out = torch.empty(rows, c, dtype=torch.int8 if out_signed else torch.uint8, device=acc.device)
    if rows and c:
        _requantize_kernel[(triton.cdiv(rows, 128), triton.cdiv(c, 64))](
            acc, signed_offset, mult, shift, out, rows, c, zo, lo, hi, BR=128, BC=64
        )
    return out


def weight_only_linear(x: torch.Tensor, packed: torch.Tensor, wide: torch.Tensor, bits: int, sign: bool,
                       offset_binary: bool, kp: int, sub: torch.Tensor, group_size: int, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` (rows, K) contiguous fp32/fp16/bf16 times the packed weights' Wi (C, K), times ``scale`` (C,)
    fp32, plus ``bias`` (C,): (rows, C) in x's dtype. Products are exact and summed in fp32 (not in the
    order of ``F.linear``; docs/kernels.md gives the error bound)."""
    rows, k = x.shape
    c = scale.numel()
    out = torch.empty(rows, c, dtype=torch.float32, device=x.device)  # rounded to x's dtype by PyTorch below
    bm, bn = _tiles(rows, c)
    if rows and c:
        _weight_only_kernel[(triton.cdiv(rows, bm), triton.cdiv(c, bn))](
            x, *_or_dummy(scale, packed, wide, sub), scale, scale if bias is None else bias, out, rows, c, k, kp,
            max(group_size, 1), _groups(sub),
            BITS=bits, SIGN=sign, OFFSET_BINARY=offset_binary, WIDE=wide.numel() > 0, HAS_SUB=sub.numel() > 0,
            HAS_BIAS=bias is not None, DOT_FP32=INTERPRETED and x.dtype == torch.bfloat16, BM=bm, BN=bn,
        )
    return out.to(x.dtype)
