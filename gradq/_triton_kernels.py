"""Triton kernels of the gradient codes: the GPU backend of ``gradq.kernels`` (docs/kernels.md, "Triton").

The same functions, arguments and results as ``gradq._reference``, bit for bit: ``gradq._backend`` hands
CUDA tensors here. With ``TRITON_INTERPRET=1`` set before gradq is imported the same kernels run on CPU
tensors through Triton's interpreter, which is how CI tests them without a GPU.

Every per-block reduction keeps the reference's order: a program owns ``_NB`` whole blocks as an
(_NB, 8) tile, lane ``p % 8`` of a block accumulates its elements in float64 in element order, and the 8
lanes are added left to right. Float kernels are launched with ``enable_fp_fusion=False`` (no fused
multiply-add, as the C++ build's ``-ffp-contract=off``) and fp32 quotients use ``tl.div_rn`` (correctly
rounded, as on the CPU); float64 square roots are IEEE on NVIDIA GPUs.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from gradq._checks import check, norm_overflow_error
from gradq._reference import RMS_CAP, mean_of_rows

_NB = 16  # blocks per program of the block kernels: a (16, 8) tile per step
_GROUPS = 128  # groups of 8 codes per program of the packing kernels
_ELEMENTS = 1024  # elements per program of the elementwise kernels
_EXACT = {"enable_fp_fusion": False}
_RMS_CAP = tl.constexpr(RMS_CAP)


@triton.jit
def _lane(tile, lanes, j: tl.constexpr):
    """Column ``j`` of an (R, 8) tile, exactly (the other columns are replaced by +0.0 before the sum)."""
    return tl.sum(tl.where(lanes[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _lanes_in_order(acc, lanes):
    """((acc[:, 0] + acc[:, 1]) + ...) + acc[:, 7]: the fixed order of docs/kernels.md."""
    total = _lane(acc, lanes, 0)
    for j in tl.static_range(1, 8):
        total = total + _lane(acc, lanes, j)
    return total


@triton.jit
def _steps(n, block, NB: tl.constexpr):
    """Steps of 8 elements in the program's first (longest) block: the all-masked steps of a short last
    block, or of a block longer than the tensor, are skipped (they would add +0.0)."""
    first = tl.program_id(0).to(tl.int64) * NB * block
    return tl.cdiv(tl.minimum(block, n - first), 8)


@triton.jit
def _finite(v):
    return (v == v) & (tl.abs(v) < float("inf"))


@triton.jit
def _philox_tile(first_counter, rows, seed, offset):
    """(R, 8) fp32 uniforms of elements 4 * first_counter[r] + c, c < 8: two counters per row."""
    counter = (first_counter[:, None] + tl.arange(0, 2)[None, :]).to(tl.uint64)
    off = offset.to(tl.uint64)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + (off & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros_like(c0) + (off >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, 10)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [rows, 8])
    return (words >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _group_fields(packed, group, nbytes, lanes, K: tl.constexpr):
    """(G, 8) int32 fields of the groups of 8 ``group`` (G,) in a stream of K-bit fields of ``nbytes`` bytes."""
    word = tl.zeros_like(group).to(tl.uint64)
    for b in tl.static_range(K):
        position = group * K + b
        word = word | (tl.load(packed + position, mask=position < nbytes, other=0).to(tl.uint64) << (8 * b))
    return ((word[:, None] >> (lanes[None, :] * K).to(tl.uint64)) & ((1 << K) - 1)).to(tl.int32)


@triton.jit
def _emit(out, index, value, mask, ACCUMULATE: tl.constexpr):
    """Writes ``value`` to ``out[index]``, or adds it (fp32) with ACCUMULATE."""
    if ACCUMULATE:
        value = tl.load(out + index, mask=mask, other=0.0) + value
    tl.store(out + index, value, mask=mask)


@triton.jit
def _signed_values(field, scale, LEVELS: tl.constexpr, LBITS: tl.constexpr):
    """±level * (scale / LEVELS) in fp32 of sign-magnitude fields (level | sign << LBITS)."""
    magnitude = (field & ((1 << LBITS) - 1)).to(tl.float32) * tl.div_rn(scale, LEVELS * 1.0)
    return tl.where((field >> LBITS) != 0, -magnitude, magnitude)


@triton.jit
def _pack_kernel(codes, out, n, nbytes, BITS: tl.constexpr, GROUPS: tl.constexpr):
    group = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    lanes = tl.arange(0, 8)
    index = group[:, None] * 8 + lanes[None, :]
    c = tl.load(codes + index, mask=index < n, other=0).to(tl.uint64)
    word = tl.sum(c << (lanes[None, :] * BITS).to(tl.uint64), axis=1)
    for b in tl.static_range(BITS):
        position = group * BITS + b
        tl.store(out + position, ((word >> (8 * b)) & 0xFF).to(tl.uint8), mask=position < nbytes)


@triton.jit
def _unpack_kernel(packed, out, n, nbytes, BITS: tl.constexpr, GROUPS: tl.constexpr):
    group = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    lanes = tl.arange(0, 8)
    index = group[:, None] * 8 + lanes[None, :]
    tl.store(out + index, _group_fields(packed, group, nbytes, lanes, BITS).to(tl.uint8), mask=index < n)


@triton.jit
def _philox_kernel(out, n, seed, offset, ROWS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    u = _philox_tile(row * 2, ROWS, seed, offset)
    index = row[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(out + index, u, mask=index < n)


@triton.jit
def _sign_compress_kernel(x, residual, packed, scales, n, nblocks, block, HAS_R: tl.constexpr, RMS: tl.constexpr,
                          NB: tl.constexpr):
    b = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    lanes = tl.arange(0, 8)
    base = b * block
    acc = tl.zeros([NB, 8], dtype=tl.float64)
    acc_sq = tl.zeros([NB, 8], dtype=tl.float64)
    for t in range(0, _steps(n, block, NB)):
        index = base[:, None] + t * 8 + lanes[None, :]
        inside = (index < n) & (b < nblocks)[:, None]
        m = tl.load(x + index, mask=inside, other=0.0)
        if HAS_R:
            m = m + tl.load(residual + index, mask=inside, other=0.0)
        a = tl.abs(m).to(tl.float64)
        acc = acc + a
        if RMS:
            acc_sq = acc_sq + a * a
    count = tl.minimum(n - base, block).to(tl.float64)
    mean = _lanes_in_order(acc, lanes) / count
    scale = mean.to(tl.float32)
    if RMS:
        root = _l2_scale(_lanes_in_order(acc_sq, lanes) / count)
        cap = (mean * _RMS_CAP).to(tl.float32)
        scale = tl.where(root < cap, root, cap)
    tl.store(scales + b, scale, mask=b < nblocks)
    keep = ~_finite(scale)
    for t in range(0, _steps(n, block, NB)):
        index = base[:, None] + t * 8 + lanes[None, :]
        inside = (index < n) & (b < nblocks)[:, None]
        m = tl.load(x + index, mask=inside, other=0.0)
        old = tl.zeros([NB, 8], dtype=tl.float32)
        if HAS_R:
            old = tl.load(residual + index, mask=inside, other=0.0)
            m = m + old
        neg = m < 0
        byte = tl.sum(neg.to(tl.int32) << lanes[None, :], axis=1).to(tl.uint8)
        first = base + t * 8
        tl.store(packed + first // 8, byte, mask=(first < n) & (b < nblocks))
        if HAS_R:
            s = scale[:, None]
            updated = tl.where(neg, m + s, m - s)
            tl.store(residual + index, tl.where(keep[:, None], old, updated), mask=inside)


@triton.jit
def _sign_decompress_kernel(packed, scales, out, n, block, ACCUMULATE: tl.constexpr, ELEMENTS: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * ELEMENTS + tl.arange(0, ELEMENTS)
    inside = index < n
    byte = tl.load(packed + index // 8, mask=inside, other=0).to(tl.int32)
    s = tl.load(scales + index // block, mask=inside, other=0.0)
    _emit(out, index, tl.where(((byte >> (index % 8).to(tl.int32)) & 1) != 0, -s, s), inside, ACCUMULATE)


@triton.jit
def _l2_scale(sumsq):
    """The smallest fp32 s with s * s >= sumsq (float64): the correctly rounded sqrt, one step up or down."""
    s = tl.sqrt(sumsq).to(tl.float32)
    bits = s.to(tl.int32, bitcast=True)
    up = tl.where(s == float("inf"), s, (bits + 1).to(tl.float32, bitcast=True))
    s = tl.where(s.to(tl.float64) * s.to(tl.float64) < sumsq, up, s)
    bits = s.to(tl.int32, bitcast=True)
    down = tl.where(s == 0.0, s, (bits - 1).to(tl.float32, bitcast=True))
    return tl.where(down.to(tl.float64) * down.to(tl.float64) >= sumsq, down, s)


@triton.jit
def _signmag_kernel(x, packed, scales, entries, counts, overflow, n, nblocks, stream, block, seed, offset,
                    clip_bits, LEVELS: tl.constexpr, LBITS: tl.constexpr, L2: tl.constexpr, CLIP: tl.constexpr,
                    ESCAPES: tl.constexpr, NB: tl.constexpr):
    """Scales, then the codes: plain fields of LBITS + 1 bits, or (ESCAPES > 0) 2-bit symbols with the
    escaped fields written one byte each to ``entries`` (nblocks, ESCAPES) and their count to ``counts``;
    ``clip_bits`` holds the clip factor's float64 bits. With L2, ``overflow`` marks the blocks of finite
    values whose norm no fp32 scale holds (a finite float64 sum of squares, an infinite scale)."""
    K: tl.constexpr = 2 if ESCAPES > 0 else LBITS + 1
    b = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    lanes = tl.arange(0, 8)
    base = b * block
    sumsq = tl.zeros([NB, 8], dtype=tl.float64)
    largest = tl.zeros([NB, 8], dtype=tl.float32)
    for t in range(0, _steps(n, block, NB)):
        index = base[:, None] + t * 8 + lanes[None, :]
        v = tl.load(x + index, mask=(index < n) & (b < nblocks)[:, None], other=0.0)
        if L2 or CLIP:
            v64 = v.to(tl.float64)
            sumsq = sumsq + v64 * v64
        if not L2:
            largest = tl.maximum(largest, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
    if L2:
        total = _lanes_in_order(sumsq, lanes)
        scale = _l2_scale(total)
        tl.store(overflow + b, (_finite(total) & (scale == float("inf"))).to(tl.int8), mask=b < nblocks)
    else:
        scale = _lane(largest, lanes, 0)
        for j in tl.static_range(1, 8):
            scale = tl.maximum(scale, _lane(largest, lanes, j), propagate_nan=tl.PropagateNan.ALL)
        if CLIP:
            count = tl.minimum(n - base, block).to(tl.float64)
            clip = clip_bits.to(tl.int64).to(tl.float64, bitcast=True)
            threshold = (clip * tl.sqrt(_lanes_in_order(sumsq, lanes) / count)).to(tl.float32)
            scale = tl.where(scale > threshold, threshold, scale)
    tl.store(scales + b, scale, mask=b < nblocks)
    valid = _finite(scale) & (scale > 0)
    escaped_before = tl.zeros([NB], dtype=tl.int32)
    for t in range(0, _steps(n, block, NB)):
        first = base + t * 8
        index = first[:, None] + lanes[None, :]
        inside = (index < n) & (b < nblocks)[:, None]
        v = tl.load(x + index, mask=inside, other=0.0)
        u = _philox_tile(first // 4, NB, seed, offset)
        y = tl.div_rn(tl.abs(v), scale[:, None]) * (LEVELS * 1.0)
        level = tl.where(valid[:, None], tl.minimum(tl.floor(y + u), (LEVELS * 1.0)), 0.0).to(tl.int32)
        neg = ((v < 0) & (level > 0)).to(tl.int32)
        field = level | (neg << LBITS)
        if ESCAPES > 0:
            escaped = (level >= 2) & inside
            symbol = tl.where(escaped, 2, level | (neg << 1))
            rank = escaped_before[:, None] + tl.cumsum(escaped.to(tl.int32), axis=1) - escaped.to(tl.int32)
            slot = b[:, None] * ESCAPES + rank
            tl.store(entries + slot, field.to(tl.uint8), mask=escaped & (rank < ESCAPES))
            escaped_before = escaped_before + tl.sum(escaped.to(tl.int32), axis=1)
            field = symbol
        word = tl.sum(field.to(tl.uint64) << (lanes[None, :] * K).to(tl.uint64), axis=1)
        for byte in tl.static_range(K):  # the codes' stream is the first ``stream`` bytes of ``packed``
            position = (first // 8) * K + byte
            tl.store(packed + position, ((word >> (8 * byte)) & 0xFF).to(tl.uint8),
                     mask=(position < stream) & (b < nblocks))
    if ESCAPES > 0:
        tl.store(counts + b, escaped_before, mask=b < nblocks)


@triton.jit
def _signmag_decompress_kernel(packed, scales, out, n, nbytes, block, LEVELS: tl.constexpr, LBITS: tl.constexpr,
                               ACCUMULATE: tl.constexpr, GROUPS: tl.constexpr):
    """Values of the plain code, read straight from its packed fields."""
    group = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    lanes = tl.arange(0, 8)
    index = group[:, None] * 8 + lanes[None, :]
    inside = index < n
    field = _group_fields(packed, group, nbytes, lanes, LBITS + 1)
    scale = tl.load(scales + index // block, mask=inside, other=0.0)
    _emit(out, index, _signed_values(field, scale, LEVELS, LBITS), inside, ACCUMULATE)


@triton.jit
def _escape_symbols(packed, b, t, block, n, nblocks, stream, lanes):
    """Step t of blocks ``b`` in the escape code: the (NB, 8) 2-bit symbols, element indices and in-range mask."""
    first = b * block + t * 8
    index = first[:, None] + lanes[None, :]
    return _group_fields(packed, first // 8, stream, lanes, 2), index, (index < n) & (b < nblocks)[:, None]


@triton.jit
def _escape_count_kernel(packed, counts, n, nblocks, stream, block, NB: tl.constexpr):
    """Each block's number of escape symbols (0b10), to check against its entries before decoding."""
    b = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    lanes = tl.arange(0, 8)
    seen = tl.zeros([NB], dtype=tl.int32)
    for t in range(0, _steps(n, block, NB)):
        symbol, _, inside = _escape_symbols(packed, b, t, block, n, nblocks, stream, lanes)
        seen = seen + tl.sum(((symbol == 2) & inside).to(tl.int32), axis=1)
    tl.store(counts + b, seen, mask=b < nblocks)


@triton.jit
def _escape_decompress_kernel(packed, entries, scales, out, n, nblocks, stream, block, LEVELS: tl.constexpr,
                              LBITS: tl.constexpr, ESCAPES: tl.constexpr, ACCUMULATE: tl.constexpr,
                              NB: tl.constexpr):
    """Values of the escape code: symbol 0b10 takes its block's next field of ``entries`` (nblocks, ESCAPES)."""
    b = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    lanes = tl.arange(0, 8)
    scale = tl.load(scales + b, mask=b < nblocks, other=0.0)
    seen = tl.zeros([NB], dtype=tl.int32)
    for t in range(0, _steps(n, block, NB)):
        symbol, index, inside = _escape_symbols(packed, b, t, block, n, nblocks, stream, lanes)
        escaped = (symbol == 2) & inside
        rank = seen[:, None] + tl.cumsum(escaped.to(tl.int32), axis=1) - escaped.to(tl.int32)
        entry = tl.load(entries + b[:, None] * ESCAPES + rank, mask=escaped & (rank < ESCAPES), other=0)
        field = tl.where(escaped, entry.to(tl.int32), (symbol & 1) | ((symbol >> 1) << LBITS))
        _emit(out, index, _signed_values(field, scale[:, None], LEVELS, LBITS), inside, ACCUMULATE)
        seen = seen + tl.sum(escaped.to(tl.int32), axis=1)


INTERPRETED = type(_pack_kernel).__name__ == "InterpretedFunction"
"""Whether Triton's interpreter runs these kernels (``TRITON_INTERPRET=1`` at import): on CPU tensors only."""


def _programs(count: int, per_program: int) -> tuple[int]:
    return (max(1, triton.cdiv(count, per_program)),)


def _pack_into(codes: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Packs ``codes`` into ``out`` (exactly their packed bytes, contiguous); returns ``out``."""
    n = codes.numel()
    if n:
        _pack_kernel[_programs(-(-n // 8), _GROUPS)](codes, out, n, out.numel(), BITS=bits, GROUPS=_GROUPS)
    return out


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return _pack_into(codes, bits, torch.empty((codes.numel() * bits + 7) // 8, dtype=torch.uint8,
                                               device=codes.device))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    if n:
        _unpack_kernel[_programs(-(-n // 8), _GROUPS)](packed, out, n, packed.numel(), BITS=bits, GROUPS=_GROUPS)
    return out


def philox_uniform(n: int, seed: int, offset: int, device: torch.device | str = "cpu") -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        _philox_kernel[_programs(-(-n // 8), _GROUPS)](out, n, seed, offset, ROWS=_GROUPS)
    return out


def sign_compress(
    x: torch.Tensor, residual: torch.Tensor | None, block: int, rms: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    nblocks = -(-n // block)
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n:
        _sign_compress_kernel[_programs(nblocks, _NB)](
            x, x if residual is None else residual, packed, scales, n, nblocks, block,
            HAS_R=residual is not None, RMS=rms, NB=_NB, **_EXACT,
        )
    return packed, scales


def _output(out: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=device) if out is None else out


def sign_decompress(
    packed: torch.Tensor, scales: torch.Tensor, block: int, n: int, out: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    result = _output(out, n, packed.device)
    if n:
        _sign_decompress_kernel[_programs(n, _ELEMENTS)](
            packed, scales, result, n, block, ACCUMULATE=out is not None and accumulate, ELEMENTS=_ELEMENTS, **_EXACT
        )
    return result


def sign_mean_compress(
    packed_rows: torch.Tensor, scale_rows: torch.Tensor, residual: torch.Tensor | None, block: int, n: int,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    mean = mean_of_rows(lambda p, s, out, acc: sign_decompress(p, s, block, n, out, acc), packed_rows, scale_rows)
    return sign_compress(mean, residual, block, rms)


def signmag_compress(
    x: torch.Tensor, levels: int, block: int, l2: bool, clip: float, seed: int, offset: int, escapes: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    nblocks = -(-n // block)
    k = levels.bit_length() + 1
    stream = (n * (2 if escapes else k) + 7) // 8
    packed = torch.empty(stream + nblocks * escapes * k // 8, dtype=torch.uint8, device=x.device)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    entries = torch.zeros(nblocks * escapes, dtype=torch.uint8, device=x.device) if escapes else scales
    counts = torch.empty(nblocks, dtype=torch.int32, device=x.device) if escapes else scales
    overflow = torch.empty(nblocks, dtype=torch.int8, device=x.device) if l2 else scales
    if n:
        _signmag_kernel[_programs(nblocks, _NB)](
            x, packed, scales, entries, counts, overflow, n, nblocks, stream, block, seed, offset,
            struct.unpack("<q", struct.pack("<d", float(clip)))[0],
            LEVELS=levels, LBITS=levels.bit_length(), L2=bool(l2), CLIP=clip > 0, ESCAPES=escapes, NB=_NB, **_EXACT,
        )
    if l2 and nblocks:
        check(overflow.any(), norm_overflow_error())
    if escapes:
        if nblocks:  # impossible for the l2 rule (docs/kernels.md)
            check(counts.max() > escapes, RuntimeError(f"gradq: more than {escapes} escapes in a block"))
        _pack_into(entries, k, packed[stream:])
    return packed, scales


def signmag_decompress(
    packed: torch.Tensor,
    scales: torch.Tensor,
    levels: int,
    block: int,
    n: int,
    out: torch.Tensor | None,
    accumulate: bool,
    escapes: int = 0,
) -> torch.Tensor:
    lbits, nblocks = levels.bit_length(), scales.numel()
    code = dict(LEVELS=levels, LBITS=lbits, ACCUMULATE=out is not None and accumulate)
    if not escapes:
        result = _output(out, n, packed.device)
        if n:
            _signmag_decompress_kernel[_programs(-(-n // 8), _GROUPS)](
                packed, scales, result, n, packed.numel(), block, GROUPS=_GROUPS, **code, **_EXACT
            )
        return result
    stream = (2 * n + 7) // 8
    counts = torch.empty(nblocks, dtype=torch.int32, device=packed.device)
    if n:
        _escape_count_kernel[_programs(nblocks, _NB)](packed, counts, n, nblocks, stream, block, NB=_NB)
    if nblocks:  # read before anything is written to out, unless checks are deferred (kernels.deferred_checks)
        check(counts.max() > escapes,
              ValueError(f"corrupt sign-magnitude payload: a block has more than {escapes} escape symbols"))
    entries = unpack_bits(packed[stream:], lbits + 1, nblocks * escapes)
    result = _output(out, n, packed.device)
    if n:
        _escape_decompress_kernel[_programs(nblocks, _NB)](
            packed, entries, scales, result, n, nblocks, stream, block, ESCAPES=escapes, NB=_NB, **code, **_EXACT
        )
    return result


def signmag_mean_compress(
    packed_rows: torch.Tensor,
    scale_rows: torch.Tensor,
    levels: int,
    block: int,
    n: int,
    l2: bool,
    clip: float,
    seed: int,
    offset: int,
    escapes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    mean = mean_of_rows(lambda p, s, out, acc: signmag_decompress(p, s, levels, block, n, out, acc, escapes),
                        packed_rows, scale_rows)
    return signmag_compress(mean, levels, block, l2, clip, seed, offset, escapes)
