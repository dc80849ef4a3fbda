"""Validated entry points to the packing and fused compression kernels.

Each function checks its arguments (a clear ``TypeError``/``ValueError`` naming the argument), then runs
the native kernel when available (``gradq.native_available()``) or the pure-PyTorch reference; both
give bit-identical results (docs/kernels.md). Inputs are contiguous and 1-D (``pack_bits`` takes any
shape and flattens it); nothing is mutated except an error-feedback ``residual`` where documented.
"""

from __future__ import annotations

import torch

from gradq._backend import is_triton, kernels_for
from gradq._checks import check, norm_overflow_error
from gradq._validate import check_bits, check_block, check_flag, check_int, check_tensor

_U64_MAX = 2**64 - 1
SIGNMAG_RULES = ("absmax", "l2")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy when packed: ceil(numel * bits / 8)."""
    check_int("numel", numel, lo=0)
    return (numel * check_bits(bits) + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, each < 2**bits) into a flat uint8 tensor, LSB-first.

    Code i occupies bits [i*bits, (i+1)*bits) of the little-endian bit stream; bit j of the stream is bit
    j % 8 of byte j // 8; unused high bits of the last byte are 0 (docs/format.md).
    """
    check_bits(bits)
    check_tensor("codes", codes, dtypes=(torch.uint8,))
    flat = codes.reshape(-1)
    if bits < 8 and flat.numel() and int(flat.max()) >> bits:
        raise ValueError(f"codes must be < 2**bits = {1 << bits}, got a code {int(flat.max())}")
    return kernels_for(flat).pack_bits(flat, bits)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a 1-D uint8 tensor of ``numel`` codes.

    ``packed`` must hold exactly ``packed_nbytes(numel, bits)`` bytes.
    """
    expected = packed_nbytes(numel, bits)
    check_tensor("packed", packed, dtypes=(torch.uint8,), dim=1)
    if packed.numel() != expected:
        raise ValueError(f"packed has {packed.numel()} bytes but {numel} codes of {bits} bits need exactly {expected}")
    return kernels_for(packed).unpack_bits(packed, bits, numel)


def _check_seed(name: str, value: int) -> int:
    return check_int(name, value, lo=0, hi=_U64_MAX)


def philox_uniform(numel: int, seed: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``numel`` fp32 uniforms in [0, 1): Philox4x32-10 keyed by ``seed``, stream ``offset``.

    Element i is ``(word >> 8) * 2**-24`` of word i % 4 of counter (i // 4, offset); the same
    (seed, offset) gives the same values on every device and backend.
    """
    check_int("numel", numel, lo=0)
    _check_seed("seed", seed)
    _check_seed("offset", offset)
    probe = torch.empty(0, device=device)
    kernels = kernels_for(probe)
    if probe.device.type != "cpu":
        return kernels.philox_uniform(numel, seed, offset, probe.device)
    return kernels.philox_uniform(numel, seed, offset)


def _check_out(out: torch.Tensor | None, numel: int, like: torch.Tensor) -> None:
    if out is None:
        return
    check_tensor("out", out, dtypes=(torch.float32,), dim=1)
    if out.numel() != numel or out.device != like.device:
        raise ValueError(f"out must hold {numel} fp32 values on {like.device}, got {out.numel()} on {out.device}")


def _check_scales(scales: torch.Tensor, numel: int, block: int, like: torch.Tensor) -> None:
    check_tensor("scales", scales, dtypes=(torch.float32,), dim=1)
    nblocks = (numel + block - 1) // block
    if scales.numel() != nblocks:
        raise ValueError(f"scales has {scales.numel()} entries but {numel} values in blocks of {block} need {nblocks}")
    if scales.device != like.device:
        raise ValueError(f"scales is on {scales.device} but packed is on {like.device}; move them together")


def sign_compress(
    x: torch.Tensor, residual: torch.Tensor | None = None, *, block: int, rms: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit sign code of ``x`` (+ error feedback); returns (packed bits, fp32 scale per block).

    m = x + residual; bit i = (m_i < 0) (0 maps to +1); scale of a block = mean |m| over it, or with
    ``rms`` sqrt(mean m^2) rounded up to fp32, capped at 1.5 mean |m| (docs/quantization.md). Mutates
    ``residual`` to m - decoded(m) in each block whose scale is finite; a block holding a NaN/Inf (in x,
    or from an overflow of x + residual) keeps its residual and gets a non-finite scale, so the residual
    never absorbs NaN/Inf and the decoded block stays non-finite.
    """
    check_tensor("x", x, dtypes=(torch.float32,), dim=1)
    check_block(block)
    if residual is not None:
        check_tensor("residual", residual, dtypes=(torch.float32,), dim=1)
        if residual.shape != x.shape or residual.device != x.device:
            raise ValueError(
                f"residual must match x: got {tuple(residual.shape)} on {residual.device}, "
                f"x is {tuple(x.shape)} on {x.device}"
            )
    return kernels_for(x).sign_compress(x, residual, block, bool(rms))


def sign_decompress(
    packed: torch.Tensor,
    scales: torch.Tensor,
    *,
    block: int,
    numel: int,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """fp32 values (numel,) of a sign code: bit 1 -> -scale, bit 0 -> +scale of its block.

    With ``out`` (1-D contiguous fp32 of numel values) the values are written there, or added to it
    with ``accumulate=True`` (out[i] += value, in fp32), and ``out`` is returned.
    """
    check_block(block)
    check_tensor("packed", packed, dtypes=(torch.uint8,), dim=1)
    if packed.numel() != packed_nbytes(numel, 1):
        raise ValueError(f"packed has {packed.numel()} bytes but {numel} signs need {packed_nbytes(numel, 1)}")
    _check_scales(scales, numel, block, packed)
    _check_out(out, numel, packed)
    return kernels_for(packed).sign_decompress(packed, scales, block, numel, out, bool(accumulate))


def sign_mean_compress(
    packed_rows: torch.Tensor,
    scale_rows: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    block: int,
    numel: int,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of W sign codes, re-encoded as a sign code with error feedback, in one pass.

    ``packed_rows`` (W, packed_nbytes(numel, 1)) uint8 and ``scale_rows`` (W, nblocks) fp32 hold W sign
    codes of ``numel`` values with the same blocking. Equals ``sign_compress(mean, residual, block=block, rms=rms)``
    with mean = ((d_0 + d_1) + ... + d_{W-1}) / W in fp32, d_r = sign_decompress of row r, bit for bit;
    ``residual`` (numel,) is updated under the same rules. Two-phase onebit's server step.
    """
    check_block(block)
    check_int("numel", numel, lo=0)
    check_tensor("packed_rows", packed_rows, dtypes=(torch.uint8,), dim=2)
    check_tensor("scale_rows", scale_rows, dtypes=(torch.float32,), dim=2)
    nblocks = -(-numel // block)
    rows = packed_rows.shape[0]
    if rows < 1 or packed_rows.shape != (rows, packed_nbytes(numel, 1)) or scale_rows.shape != (rows, nblocks):
        raise ValueError(
            f"need packed_rows ({rows}, {packed_nbytes(numel, 1)}) and scale_rows ({rows}, {nblocks}) for {numel} "
            f"values in blocks of {block}; got {tuple(packed_rows.shape)} and {tuple(scale_rows.shape)}"
        )
    if residual is not None:
        check_tensor("residual", residual, dtypes=(torch.float32,), dim=1)
        if residual.numel() != numel:
            raise ValueError(f"residual must hold {numel} values, got {residual.numel()}")
    return kernels_for(packed_rows).sign_mean_compress(packed_rows, scale_rows, residual, block, numel, bool(rms))


def signmag_bits(levels: int) -> int:
    """Code width of a sign-magnitude code with ``levels`` levels: bit_length(levels) + 1 sign bit."""
    return check_int("levels", levels, lo=1, hi=127).bit_length() + 1


def signmag_escapes(levels: int, block: int) -> int:
    """Escape entries per block of the escape code: min(levels**2, block) rounded up to a multiple of 8.

    With the l2 rule, sum_i ((|x_i| / scale) * levels)**2 <= levels**2 in each block (up to rounding), and
    a level >= 2 needs (|x_i| / scale) * levels >= 1 - 2**-23, so a block has at most levels**2 such values
    (docs/kernels.md). 0 for levels = 1, where the escape code is the plain 2-bit code.
    """
    signmag_bits(levels)
    check_block(block)
    if levels == 1:
        return 0
    return -(-min(levels * levels, block) // 8) * 8


def signmag_packed_nbytes(numel: int, levels: int, block: int, *, escape: bool = False) -> int:
    """Bytes of the packed codes of a sign-magnitude code (scales not included).

    Plain: ``packed_nbytes(numel, signmag_bits(levels))``. Escape code: a 2-bit symbol per value, then
    ``signmag_escapes(levels, block)`` entries of ``signmag_bits(levels)`` bits per block.
    """
    bits = signmag_bits(levels)
    if not escape:
        return packed_nbytes(numel, bits)
    nblocks = -(-check_int("numel", numel, lo=0) // check_block(block))
    return packed_nbytes(numel, 2) + nblocks * signmag_escapes(levels, block) * bits // 8


def _signmag_code(levels: int, block: int, rule: str, clip: float, escape: bool, seed: int, offset: int) -> int:
    """Checks a sign-magnitude code's settings; returns its escape entries per block (0: plain code)."""
    signmag_bits(levels)
    check_block(block)
    if rule not in SIGNMAG_RULES:
        raise ValueError(f"rule must be one of {SIGNMAG_RULES}, got {rule!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0 or clip == float("inf"):
        raise ValueError(f"clip must be a finite number >= 0 (0 disables clipping), got {clip!r}")
    if clip and rule != "absmax":
        raise ValueError("clip applies to rule='absmax' only")
    check_flag("escape", escape)
    if escape and rule != "l2":
        raise ValueError("escape=True needs rule='l2': only the l2 norm bounds the number of levels >= 2 per block")
    _check_seed("seed", seed)
    _check_seed("offset", offset)
    return signmag_escapes(levels, block) if escape else 0


def signmag_compress(
    x: torch.Tensor,
    *,
    levels: int,
    block: int,
    rule: str,
    seed: int,
    offset: int = 0,
    clip: float = 0.0,
    escape: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic sign-magnitude code of ``x``; returns (packed codes, fp32 scale per block).

    ``rule="absmax"``: scale = max |x| of the block, lowered to ``clip`` x RMS when ``clip > 0``
    (TernGrad: levels=1). ``rule="l2"``: scale = ||x||2 of the block (QSGD). Level of x_i =
    min(floor((|x_i| / scale) * levels + u_i), levels) in fp32, u = :func:`philox_uniform` (seed, offset):
    an unbiased estimate of levels * |x_i| / scale inside the clipping range. Codes are
    ``signmag_bits(levels)`` wide: level | (negative and level > 0) << bit_length(levels).

    ``escape=True`` (rule "l2" only) packs the same levels with the escape code: 2 bits per value, the
    rare levels >= 2 in a per-block area of :func:`signmag_escapes` entries (docs/format.md).
    """
    check_tensor("x", x, dtypes=(torch.float32,), dim=1)
    escapes = _signmag_code(levels, block, rule, clip, escape, seed, offset)
    module = kernels_for(x)
    packed, scales = module.signmag_compress(x, levels, block, rule == "l2", float(clip), seed, offset, escapes)
    if is_triton(module):  # checked by the kernel, on the device
        return packed, scales
    if not bool(torch.isfinite(scales).all()) and bool(torch.isfinite(x).all()):
        raise norm_overflow_error()
    return packed, scales


def signmag_decompress(
    packed: torch.Tensor,
    scales: torch.Tensor,
    *,
    levels: int,
    block: int,
    numel: int,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    escape: bool = False,
) -> torch.Tensor:
    """fp32 values (numel,) of a sign-magnitude code: ±level * (scale / levels), computed in fp32.

    ``out`` and ``accumulate`` as in :func:`sign_decompress`; ``escape`` as given to
    :func:`signmag_compress`. A block with more escape symbols than entries raises ``ValueError``.
    """
    bits = signmag_bits(levels)
    check_block(block)
    check_tensor("packed", packed, dtypes=(torch.uint8,), dim=1)
    check_flag("escape", escape)
    expected = signmag_packed_nbytes(numel, levels, block, escape=escape)
    if packed.numel() != expected:
        code = "the escape code" if escape else f"codes of {bits} bits"
        raise ValueError(f"packed has {packed.numel()} bytes but {numel} values in {code} need {expected}")
    _check_scales(scales, numel, block, packed)
    _check_out(out, numel, packed)
    escapes = signmag_escapes(levels, block) if escape else 0
    return kernels_for(packed).signmag_decompress(packed, scales, levels, block, numel, out, bool(accumulate), escapes)


def signmag_mean_compress(
    packed_rows: torch.Tensor,
    scale_rows: torch.Tensor,
    *,
    levels: int,
    block: int,
    numel: int,
    rule: str,
    seed: int,
    offset: int = 0,
    clip: float = 0.0,
    escape: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of W sign-magnitude codes, re-encoded, in one pass over each block.

    ``packed_rows`` (W, signmag_packed_nbytes(numel, levels, block, escape=escape)) uint8 and ``scale_rows``
    (W, nblocks) fp32 hold W codes of ``numel`` values made with these ``levels``, ``block`` and ``escape``.
    Equals :func:`signmag_compress` (same arguments) of mean = ((d_0 + d_1) + ... + d_{W-1}) / W in fp32,
    d_r = :func:`signmag_decompress` of row r, bit for bit; a row with more escape symbols in a block than
    entries raises ``ValueError``. Two-phase TernGrad's and QSGD's server step.
    """
    check_int("numel", numel, lo=0)
    escapes = _signmag_code(levels, block, rule, clip, escape, seed, offset)
    check_tensor("packed_rows", packed_rows, dtypes=(torch.uint8,), dim=2)
    check_tensor("scale_rows", scale_rows, dtypes=(torch.float32,), dim=2)
    rows, nblocks = packed_rows.shape[0], -(-numel // block)
    nbytes = signmag_packed_nbytes(numel, levels, block, escape=escape)
    if rows < 1 or packed_rows.shape != (rows, nbytes) or scale_rows.shape != (rows, nblocks):
        raise ValueError(
            f"need packed_rows ({rows}, {nbytes}) and scale_rows ({rows}, {nblocks}) for {numel} values in "
            f"blocks of {block}; got {tuple(packed_rows.shape)} and {tuple(scale_rows.shape)}"
        )
    packed, scales = kernels_for(packed_rows).signmag_mean_compress(
        packed_rows, scale_rows, levels, block, numel, rule == "l2", float(clip), seed, offset, escapes
    )
    check(~torch.isfinite(scales).all() & torch.isfinite(scale_rows).all(), norm_overflow_error())
    return packed, scales
