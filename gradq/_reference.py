"""Pure-PyTorch reference kernels: the executable specification of every native kernel.

Each function here defines its result bit for bit (see docs/kernels.md); ``csrc/gradq_kernels.cpp``
must reproduce it exactly, and the tests compare the two. Arguments are validated by the callers in
``gradq.kernels``; these functions assume 1-D contiguous inputs of the right dtypes. They run on any
device PyTorch supports; the Philox uniforms are identical on every device, while the fixed summation
order of :func:`block_lane_sum` is guaranteed by CPU ``cumsum`` (a sequential loop) only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit halves of the 64-bit product of constant ``a`` and int64-held uint32 ``b``.

    The constant is split in 16-bit halves so no intermediate exceeds 2**49 (int64 never overflows).
    """
    p_lo = b * (a & 0xFFFF)
    p_hi = b * (a >> 16)
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 (Salmon et al. 2011) of ``counters`` (m, 4) int64 holding uint32 words.

    Returns (m, 4) int64 holding uint32 words.
    """
    c0, c1, c2, c3 = counters.unbind(1)
    k0, k1 = key
    for rnd in range(_PHILOX_ROUNDS):
        if rnd:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=1)


def philox_uniform(n: int, seed: int, offset: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` fp32 uniforms in [0, 1) on a 2**-24 grid; element i uses word i % 4 of counter i // 4."""
    m = (n + 3) // 4
    j = torch.arange(m, dtype=torch.int64, device=device)
    counters = torch.stack(
        (
            j & _MASK32,
            j >> 32,
            torch.full_like(j, offset & _MASK32),
            torch.full_like(j, offset >> 32),
        ),
        dim=1,
    )
    words = philox4x32(counters, (seed & _MASK32, seed >> 32)).reshape(-1)[:n]
    return (words >> 8).to(torch.float32) * 2.0**-24


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (each < 2**bits) LSB-first into ceil(n * bits / 8) bytes."""
    n = codes.numel()
    nbytes = (n * bits + 7) // 8
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1)
    stream = torch.cat((stream, stream.new_zeros(nbytes * 8 - n * bits)))
    weights = torch.arange(8, dtype=torch.int32, device=codes.device)
    return (stream.view(nbytes, 8).to(torch.int32) << weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` ``bits``-wide codes of ``packed`` as uint8."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: n * bits]
    weights = torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (stream.view(n, bits).to(torch.int32) << weights).sum(1).to(torch.uint8)


def _block_view(v: torch.Tensor, block: int) -> torch.Tensor:
    """``v`` zero-padded to whole blocks, viewed as (nblocks, block)."""
    nblocks = (v.numel() + block - 1) // block
    padded = torch.cat((v, v.new_zeros(nblocks * block - v.numel())))
    return padded.view(nblocks, block)


def block_counts(n: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Number of elements in each block (the last one may be short), int64."""
    nblocks = (n + block - 1) // block
    counts = torch.full((nblocks,), block, dtype=torch.int64, device=device)
    if nblocks:
        counts[-1] = n - (nblocks - 1) * block
    return counts


RMS_CAP = 1.5  # the rms sign scale's cap, as a multiple of mean |m|: below 2, so error feedback contracts


def block_lane_sum(v: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block sum of ``v`` (float64, nblocks), in the kernels' fixed order.

    Position p of a block goes to lane p % 8; each lane accumulates in float64 in element order, then
    the lanes are added in order 0..7. ``cumsum`` is a sequential float64 loop, so this matches the
    native loop bit for bit whatever the thread count.
    """
    lanes = _block_view(v.to(torch.float64), block).view(-1, block // 8, 8)
    per_lane = lanes.cumsum(dim=1)[:, -1, :]
    return per_lane.cumsum(dim=1)[:, -1]


def _per_element(values: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """Block values repeated over their elements: (nblocks,) -> (n,)."""
    return values.repeat_interleave(block)[:n]


def sign_compress(
    x: torch.Tensor, residual: torch.Tensor | None, block: int, rms: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit sign code with optional error feedback; returns (packed, scales) and updates ``residual``.

    m = x + residual; bit = (m < 0) (so 0 and NaN map to +1); scale of a block: mean = float64 lane sum of
    |m| / count, rounded to fp32; with ``rms``, root = :func:`l2_scale` of (float64 lane sum of m^2) / count
    (the root mean square rounded up), capped at fp32(RMS_CAP * mean) (docs/quantization.md). The residual
    of each block whose scale is finite (so every m in it is) becomes m - (bit ? -scale : +scale); a block
    with a NaN/Inf keeps its residual.
    """
    n = x.numel()
    m = x if residual is None else x + residual
    neg = m < 0
    counts = block_counts(n, block, x.device).to(torch.float64)
    mean = block_lane_sum(m.abs(), block) / counts
    scales = mean.to(torch.float32)
    if rms:
        root = l2_scale(block_lane_sum(m.to(torch.float64).square(), block) / counts)
        cap = (RMS_CAP * mean).to(torch.float32)
        scales = torch.where(root < cap, root, cap)
    if residual is not None:
        s = _per_element(scales, n, block)
        updated = torch.where(neg, m + s, m - s)
        keep = ~_per_element(torch.isfinite(scales), n, block)
        residual.copy_(torch.where(keep, residual, updated))
    return pack_bits(neg.to(torch.uint8), 1), scales


def _emit(values: torch.Tensor, out: torch.Tensor | None, accumulate: bool) -> torch.Tensor:
    """``values`` as the result, or written into (added to, with ``accumulate``) ``out``."""
    if out is None:
        return values
    return out.add_(values) if accumulate else out.copy_(values)


def sign_decompress(
    packed: torch.Tensor, scales: torch.Tensor, block: int, n: int, out: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    """fp32 values of a sign code: bit 1 -> -scale, bit 0 -> +scale."""
    neg = unpack_bits(packed, 1, n).bool()
    s = _per_element(scales, n, block)
    return _emit(torch.where(neg, -s, s), out, accumulate)


def mean_of_rows(decode: Callable, packed_rows: torch.Tensor, scale_rows: torch.Tensor) -> torch.Tensor:
    """((d_0 + d_1) + ... + d_{W-1}) / W in fp32, d_r = row r decoded by ``decode(packed, scales, out,
    accumulate)`` (a decompress function: row 0 written, the others added in rank order): the server steps'
    mean, shared by every backend whose decoders take ``out``/``accumulate``."""
    mean = decode(packed_rows[0], scale_rows[0], None, False)
    for packed, scales in zip(packed_rows[1:], scale_rows[1:], strict=True):
        decode(packed, scales, mean, True)
    return mean / packed_rows.shape[0]


def sign_mean_compress(
    packed_rows: torch.Tensor, scale_rows: torch.Tensor, residual: torch.Tensor | None, block: int, n: int,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of W sign codes (rows), re-encoded: sign_compress(:func:`mean_of_rows`, residual, block, rms)."""
    mean = mean_of_rows(lambda p, s, out, acc: sign_decompress(p, s, block, n, out, acc), packed_rows, scale_rows)
    return sign_compress(mean, residual, block, rms)


def l2_scale(sumsq: torch.Tensor) -> torch.Tensor:
    """The smallest fp32 s with s * s >= sumsq (float64), for each entry: the l2 norm rounded up.

    Defined by an exact test (the square of an fp32 is exact in float64), not by how a sqrt rounds: the
    fp32 nearest the float64 sqrt is within one step of the answer, and one step up or down corrects it.
    """
    s = sumsq.sqrt().to(torch.float32)
    up = torch.nextafter(s, s.new_tensor(torch.inf))
    s = torch.where(s.to(torch.float64).square() < sumsq, up, s)
    down = torch.nextafter(s, s.new_tensor(0.0))
    return torch.where(down.to(torch.float64).square() >= sumsq, down, s)


def signmag_scales(x: torch.Tensor, block: int, l2: bool, clip: float) -> torch.Tensor:
    """Per-block fp32 scale: the l2 norm rounded up (:func:`l2_scale`), or max |x| (lowered to clip * rms
    when clip > 0)."""
    if l2:
        return l2_scale(block_lane_sum(x.to(torch.float64).square(), block))
    scales = _block_view(x.abs(), block).amax(dim=1)
    if clip > 0:
        counts = block_counts(x.numel(), block, x.device).to(torch.float64)
        sumsq = block_lane_sum(x.to(torch.float64).square(), block)
        threshold = (clip * (sumsq / counts).sqrt()).to(torch.float32)
        scales = torch.where(scales > threshold, threshold, scales)
    return scales


def _escape_ranks(escaped: torch.Tensor, block: int, nblocks: int) -> tuple[torch.Tensor, ...]:
    """Escapes (bool mask over elements) as (element index, block, rank within its block, most in a block)."""
    index = escaped.nonzero().squeeze(1)
    blocks = index // block
    per_block = torch.bincount(blocks, minlength=nblocks)
    first = per_block.cumsum(0) - per_block
    most = int(per_block.max()) if nblocks else 0
    return index, blocks, torch.arange(index.numel(), device=escaped.device) - first[blocks], most


def signmag_compress(
    x: torch.Tensor,
    levels: int,
    block: int,
    l2: bool,
    clip: float,
    seed: int,
    offset: int,
    escapes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic sign-magnitude code (TernGrad: levels=1, absmax; QSGD: l2); returns (packed, scales).

    y = (|x| / scale) * levels in fp32; level = min(floor(y + u), levels) with u = philox_uniform;
    level = 0 for a block whose scale is 0 or non-finite. Field = level | (x < 0 and level > 0) << lbits,
    lbits = bit_length(levels), width k = lbits + 1. With ``escapes`` = E > 0 (the escape code, l2 only):
    a 2-bit symbol per value (the field of a level-0/1 value, 0b10 for level >= 2), then per block E
    k-bit entries holding the fields of its escaped values in element order, zero-filled.
    """
    n = x.numel()
    lbits = levels.bit_length()
    scales = signmag_scales(x, block, l2, clip)
    s = _per_element(scales, n, block)
    y = (x.abs() / s) * float(levels)
    t = torch.floor(y + philox_uniform(n, seed, offset, x.device))
    valid = torch.isfinite(s) & (s > 0)
    level = torch.where(valid, t.clamp(max=levels), 0.0).to(torch.uint8)
    neg = ((x < 0) & (level > 0)).to(torch.uint8)
    fields = level | (neg << lbits)
    if not escapes:
        return pack_bits(fields, lbits + 1), scales
    escaped = level >= 2
    symbols = torch.where(escaped, 2, level | (neg << 1)).to(torch.uint8)
    index, blocks, rank, most = _escape_ranks(escaped, block, scales.numel())
    if most > escapes:  # impossible for the l2 rule with escapes >= min(levels**2, block) (docs/kernels.md)
        raise RuntimeError(f"gradq: more than {escapes} escapes in a block")
    entries = torch.zeros(scales.numel(), escapes, dtype=torch.uint8, device=x.device)
    entries[blocks, rank] = fields[index]
    return torch.cat((pack_bits(symbols, 2), pack_bits(entries.reshape(-1), lbits + 1))), scales


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
    """fp32 values of a sign-magnitude code: ±level * (scale / levels), in fp32; ``escapes`` as in
    :func:`signmag_compress`. Raises ``ValueError`` when a block has more escape symbols than entries."""
    lbits = levels.bit_length()
    if escapes:
        stream = (2 * n + 7) // 8
        symbols = unpack_bits(packed[:stream], 2, n)
        entries = unpack_bits(packed[stream:], lbits + 1, scales.numel() * escapes).view(-1, escapes)
        fields = (symbols & 1) | ((symbols >> 1) << lbits)
        index, blocks, rank, most = _escape_ranks(symbols == 2, block, scales.numel())
        if most > escapes:
            raise ValueError(f"corrupt sign-magnitude payload: a block has more than {escapes} escape symbols")
        fields[index] = entries[blocks, rank]
    else:
        fields = unpack_bits(packed, lbits + 1, n)
    step = _per_element(scales / float(levels), n, block)
    v = (fields & ((1 << lbits) - 1)).to(torch.float32) * step
    return _emit(torch.where((fields >> lbits).bool(), -v, v), out, accumulate)


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
    """The mean of W sign-magnitude codes (rows), re-encoded: signmag_compress(:func:`mean_of_rows`, ...)."""
    mean = mean_of_rows(lambda p, s, out, acc: signmag_decompress(p, s, levels, block, n, out, acc, escapes),
                        packed_rows, scale_rows)
    return signmag_compress(mean, levels, block, l2, clip, seed, offset, escapes)
