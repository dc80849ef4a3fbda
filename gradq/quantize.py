"""The quantizer core: ``choose_qparams``, ``quantize``, ``dequantize`` and ``fake_quantize``.

Every value that becomes an integer code in gradq goes through here or through the kernels in
``gradq.kernels`` that this module calls for the gradient code books (docs/quantization.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradq import kernels
from gradq._validate import FLOAT_DTYPES, check_int, check_tensor
from gradq.scheme import Granularity, PerAxis, PerBucket, PerGroup, PerTensor, QuantScheme

_SEED_HI = 2**63 - 1


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor.

    ``codes`` has the input's shape: int8 for signed uniform schemes, uint8 otherwise (for ``sign`` and
    ``sign_magnitude``, the code field as packed on the wire). ``scale`` is fp32 with the shape of
    :func:`scale_shape`; ``zero_point`` is int32 of the same shape for affine schemes, else None.
    ``dtype`` is the floating dtype that :func:`dequantize` returns.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    scheme: QuantScheme
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        """Shape of the quantized tensor."""
        return self.codes.shape


def _normalize_axis(axis: int, ndim: int, name: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} axis {axis} is out of range for a {ndim}-D tensor")
    return axis % ndim


def scale_shape(shape: tuple[int, ...] | torch.Size, granularity: Granularity) -> tuple[int, ...]:
    """Shape of the scale (and zero-point) tensor for a tensor of ``shape`` under ``granularity``.

    PerTensor: (); PerAxis(a): (shape[a],); PerGroup(g, a): ``shape`` with shape[a] -> shape[a] // g;
    PerBucket(d): (ceil(numel / d),).
    """
    shape = tuple(shape)
    if isinstance(granularity, PerTensor):
        return ()
    if isinstance(granularity, PerBucket):
        return (math.ceil(math.prod(shape) / granularity.bucket_size),)
    axis = _normalize_axis(granularity.axis, len(shape), type(granularity).__name__)
    if isinstance(granularity, PerAxis):
        return (shape[axis],)
    if shape[axis] % granularity.group_size:
        raise ValueError(
            f"PerGroup({granularity.group_size}) needs dimension {axis} (size {shape[axis]}) to be a multiple "
            f"of {granularity.group_size}"
        )
    return shape[:axis] + (shape[axis] // granularity.group_size,) + shape[axis + 1 :]


def _to_rows(t: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """``t`` as (number of scales, elements per scale); PerBucket zero-pads the last bucket."""
    if isinstance(granularity, PerTensor):
        return t.reshape(1, -1)
    if isinstance(granularity, PerBucket):
        d = granularity.bucket_size
        flat = t.reshape(-1)
        return torch.cat((flat, flat.new_zeros(-flat.numel() % d))).view(-1, d)
    axis = _normalize_axis(granularity.axis, t.dim(), type(granularity).__name__)
    if isinstance(granularity, PerAxis):
        return t.movedim(axis, 0).reshape(t.shape[axis], -1)
    return t.movedim(axis, -1).reshape(-1, granularity.group_size)


def _from_rows(rows: torch.Tensor, shape: torch.Size, granularity: Granularity) -> torch.Tensor:
    """Inverse of :func:`_to_rows` back to ``shape``."""
    if isinstance(granularity, (PerTensor, PerBucket)):
        return rows.reshape(-1)[: math.prod(shape)].view(shape)
    axis = _normalize_axis(granularity.axis, len(shape), type(granularity).__name__)
    dest = 0 if isinstance(granularity, PerAxis) else -1
    moved = list(shape)
    moved.insert(len(moved) if dest == -1 else 0, moved.pop(axis))
    return rows.reshape(moved).movedim(dest, axis)


def _rows_to_scale(values: torch.Tensor, shape: torch.Size, granularity: Granularity) -> torch.Tensor:
    """Inverse of :func:`_to_rows_scale`: one value per row -> the scale shape for a tensor of ``shape``."""
    target = scale_shape(shape, granularity)
    if isinstance(granularity, PerGroup):
        axis = granularity.axis % len(shape)
        moved = list(target)
        moved.append(moved.pop(axis))
        return values.reshape(moved).movedim(-1, axis)
    return values.reshape(target)


def _check_input(x: torch.Tensor, scheme: QuantScheme) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, contiguous=False)
    if not isinstance(scheme, QuantScheme):
        raise TypeError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")
    scale_shape(x.shape, scheme.granularity)


def choose_qparams(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (fp32) and zero point (int32, affine only) of a uniform ``scheme`` for ``x``.

    Affine: lo = min(x, 0), hi = max(x, 0), scale = (hi - lo) / (qmax - qmin), zero_point =
    clamp(qmin - round(lo / scale)). Symmetric: scale = max |x| / qmax (unsigned: max(x, 0) / qmax), or
    ||x||2 / qmax with ``scale_from='norm'``. A zero scale (all-zero input) becomes 1, so such tensors
    quantize to 0 and back without NaN. Raises ValueError on non-finite input.
    """
    _check_input(x, scheme)
    if scheme.codebook != "uniform":
        raise ValueError(f"choose_qparams is for uniform schemes; codebook {scheme.codebook!r} computes its own")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf; uniform quantization needs finite values")
    rows = _to_rows(x.detach().to(torch.float32), scheme.granularity)
    if rows.shape[1] == 0:  # an empty tensor: the qparams of zeros
        rows = rows.new_zeros(rows.shape[0], 1)
    zero_point = None
    if scheme.scale_from == "norm":
        norm = rows.to(torch.float64).square().sum(1).sqrt()
        scale = norm.to(torch.float32) / scheme.qmax
        # a norm past the fp32 maximum: divide before rounding to fp32 (one rounding instead of two)
        scale = torch.where(torch.isfinite(scale), scale, (norm / scheme.qmax).to(torch.float32))
    elif scheme.symmetric:
        top = rows.abs().amax(1) if scheme.signed else rows.amax(1).clamp(min=0)
        scale = top / scheme.qmax
    else:
        lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
        steps = float(scheme.qmax - scheme.qmin)
        scale = (hi - lo) / steps
        # hi - lo past the fp32 maximum: scale each end before subtracting
        scale = torch.where(torch.isfinite(scale), scale, hi / steps - lo / steps)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(
            "x is too large for this scheme: its scale would exceed the fp32 maximum (3.4e38); scale the values "
            "down, or use scale_from='max' or per-channel/per-group granularity"
        )
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if not scheme.symmetric:
        zero_point = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax).to(torch.int32)
        zero_point = _rows_to_scale(zero_point, x.shape, scheme.granularity)
    return _rows_to_scale(scale, x.shape, scheme.granularity), zero_point


def _prepare(
    x: torch.Tensor, scheme: QuantScheme, seed: int | None, generator: torch.Generator | None, offset: int
) -> int | None:
    """Check the arguments shared by quantize and fake_quantize; the seed of a stochastic scheme, else None."""
    _check_input(x, scheme)
    check_int("offset", offset, lo=0, hi=2**64 - 1)
    return _resolve_seed(seed, generator) if scheme.rounding == "stochastic" else None


def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        return check_int("seed", seed, lo=0, hi=2**64 - 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return int(torch.randint(0, _SEED_HI, (), generator=generator, device="cpu"))


def _resolve_qparams(
    x: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor | None, zero_point: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The given (scale, zero_point), checked, or :func:`choose_qparams` of ``x`` when scale is None."""
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point needs scale as well")
        return choose_qparams(x, scheme)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf; uniform quantization needs finite values")
    target = scale_shape(x.shape, scheme.granularity)
    check_tensor("scale", scale, dtypes=FLOAT_DTYPES, contiguous=False)
    if tuple(scale.shape) != target:
        raise ValueError(f"scale must have shape {target} for this scheme and input, got {tuple(scale.shape)}")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError("scale must be finite and > 0")
    if scheme.has_zero_point:
        if zero_point is None:
            raise ValueError("an affine scheme needs zero_point together with scale")
        check_tensor("zero_point", zero_point, dtypes=(torch.int32, torch.int64), contiguous=False)
        if tuple(zero_point.shape) != target:
            raise ValueError(f"zero_point must have shape {target}, got {tuple(zero_point.shape)}")
        if bool(((zero_point < scheme.qmin) | (zero_point > scheme.qmax)).any()):
            raise ValueError(f"zero_point must lie in [{scheme.qmin}, {scheme.qmax}]")
        zero_point = zero_point.to(torch.int32)
    elif zero_point is not None:
        raise ValueError("zero_point is only for affine (symmetric=False) schemes")
    return scale.detach().to(torch.float32), zero_point


def _uniform_codes(
    x: torch.Tensor,
    scheme: QuantScheme,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    seed: int | None,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped codes (int32, x's shape) and the mask of elements whose code was not clamped."""
    gran = scheme.granularity
    rows = _to_rows(x.detach().to(torch.float32), gran)
    y = rows / _to_rows_scale(scale, gran)
    if scheme.rounding == "stochastic":
        u = kernels.philox_uniform(x.numel(), seed, offset, x.device).view(x.shape)
        q = torch.floor(y + _to_rows(u, gran))
    else:
        q = torch.round(y)
    if zero_point is not None:
        q = q + _to_rows_scale(zero_point, gran).to(torch.float32)
    in_range = (q >= scheme.qmin) & (q <= scheme.qmax)
    q = q.clamp(scheme.qmin, scheme.qmax).to(torch.int32)
    return _from_rows(q, x.shape, gran), _from_rows(in_range, x.shape, gran)


def _to_rows_scale(param: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """A scale-shaped tensor as a (rows, 1) column matching :func:`_to_rows`."""
    if isinstance(granularity, PerGroup):
        axis = granularity.axis % param.dim()
        return param.movedim(axis, -1).reshape(-1, 1)
    return param.reshape(-1, 1)


def quantize(
    x: torch.Tensor,
    scheme: QuantScheme,
    *,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    offset: int = 0,
) -> QTensor:
    """Quantize floating ``x`` (fp32/fp16/bf16, any device) under ``scheme``; ``x`` is not modified.

    Uniform schemes: q = clamp(round(x / scale) + zero_point, qmin, qmax), with ``scale``/``zero_point``
    from :func:`choose_qparams` unless given (e.g. calibrated). Stochastic rounding replaces round(y) by
    floor(y + u), u from Philox(seed, offset) per flat element index: unbiased, and the same uniforms on
    every device and kernel backend. ``seed`` or ``generator`` picks the stream (neither: a seed drawn
    from torch's default generator). ``sign``/``sign_magnitude`` code books run the fused kernels of ``gradq.kernels``.
    """
    seed = _prepare(x, scheme, seed, generator, offset)
    if scheme.codebook != "uniform":
        if scale is not None or zero_point is not None:
            raise ValueError(f"codebook {scheme.codebook!r} computes its scales; do not pass scale/zero_point")
        return _quantize_gradient_codebook(x, scheme, seed, offset)
    scale, zero_point = _resolve_qparams(x, scheme, scale, zero_point)
    codes, _ = _uniform_codes(x, scheme, scale, zero_point, seed, offset)
    codes = codes.to(torch.int8 if scheme.signed else torch.uint8)
    return QTensor(codes, scale, zero_point, scheme, x.dtype)


def _bucket(scheme: QuantScheme, numel: int) -> int:
    """Kernel block length: the bucket size, or the whole tensor rounded up to a multiple of 8."""
    if isinstance(scheme.granularity, PerBucket):
        return scheme.granularity.bucket_size
    return max(8, -(-numel // 8) * 8)


def _sign_rows(x: torch.Tensor, scheme: QuantScheme) -> QTensor:
    """Sign code per channel or group: code 1 for x < 0, scale = fp32(float64 mean |x|) of each row."""
    gran = scheme.granularity
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf; binary (sign) weights need finite values")
    rows = _to_rows(x.detach().to(torch.float32), gran)
    scale = rows.to(torch.float64).abs().mean(1).to(torch.float32) if rows.shape[1] else rows.new_zeros(len(rows))
    codes = _from_rows((rows < 0).to(torch.uint8), x.shape, gran)
    return QTensor(codes, _rows_to_scale(scale, x.shape, gran), None, scheme, x.dtype)


def _quantize_gradient_codebook(x: torch.Tensor, scheme: QuantScheme, seed: int | None, offset: int) -> QTensor:
    if isinstance(scheme.granularity, (PerAxis, PerGroup)):
        return _sign_rows(x, scheme)
    flat = x.detach().reshape(-1).to(torch.float32).contiguous()
    target = scale_shape(x.shape, scheme.granularity)
    if flat.numel() == 0:  # PerTensor still carries its one (zero) scale
        return QTensor(torch.empty(x.shape, dtype=torch.uint8), torch.zeros(target), None, scheme, x.dtype)
    block = _bucket(scheme, flat.numel())
    if scheme.codebook == "sign":
        packed, scales = kernels.sign_compress(flat, None, block=block, rms=scheme.scale_from == "rms")
    else:
        rule = "l2" if scheme.scale_from == "norm" else "absmax"
        packed, scales = kernels.signmag_compress(
            flat, levels=scheme.levels, block=block, rule=rule, seed=seed, offset=offset, clip=float(scheme.clip)
        )
    codes = kernels.unpack_bits(packed, scheme.bits, flat.numel()).view(x.shape)
    return QTensor(codes, scales.reshape(target), None, scheme, x.dtype)


def dequantize(qt: QTensor) -> torch.Tensor:
    """Real values of ``qt`` in ``qt.dtype``: scale * (q - zero_point), or the code book's values."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"dequantize takes a QTensor, got {type(qt).__name__}")
    scheme = qt.scheme
    gran = scheme.granularity
    if scheme.codebook == "sign" and isinstance(gran, (PerAxis, PerGroup)):
        signs = 1.0 - 2.0 * _to_rows(qt.codes.to(torch.float32), gran)
        return _from_rows(signs * _to_rows_scale(qt.scale, gran), qt.shape, gran).to(qt.dtype)
    if scheme.codebook != "uniform":
        numel = qt.codes.numel()
        if numel == 0:
            return torch.empty(qt.shape, dtype=qt.dtype)
        packed = kernels.pack_bits(qt.codes, scheme.bits)
        block, scales = _bucket(scheme, numel), qt.scale.reshape(-1).contiguous()
        if scheme.codebook == "sign":
            flat = kernels.sign_decompress(packed, scales, block=block, numel=numel)
        else:
            flat = kernels.signmag_decompress(packed, scales, levels=scheme.levels, block=block, numel=numel)
        return flat.view(qt.shape).to(qt.dtype)
    q = _to_rows(qt.codes.to(torch.float32), gran)
    if qt.zero_point is not None:
        q = q - _to_rows_scale(qt.zero_point, gran).to(torch.float32)
    return _from_rows(q * _to_rows_scale(qt.scale, gran), qt.shape, gran).to(qt.dtype)


class _FakeQuantize(torch.autograd.Function):
    """dequantize(quantize(x)) forward; straight-through gradient where the code was not clamped."""

    @staticmethod
    def forward(ctx, x, scheme, scale, zero_point, seed, offset):  # noqa: ANN001, ANN205
        codes, in_range = _uniform_codes(x, scheme, scale, zero_point, seed, offset)
        qt = QTensor(codes.to(torch.int8 if scheme.signed else torch.uint8), scale, zero_point, scheme, x.dtype)
        ctx.save_for_backward(in_range)
        return dequantize(qt)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (in_range,) = ctx.saved_tensors
        return grad * in_range.to(grad.dtype), None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scheme: QuantScheme,
    *,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """``dequantize(quantize(x, ...))`` with a straight-through estimator, for quantization-aware training.

    Forward equals dequantize(quantize(x)) exactly (same arguments). Backward passes the incoming gradient
    where the unclamped code lay in [qmin, qmax] and 0 where it was clamped. Uniform schemes only.
    """
    seed = _prepare(x, scheme, seed, generator, offset)
    if scheme.codebook != "uniform":
        raise ValueError(f"fake_quantize supports uniform schemes; codebook {scheme.codebook!r} is for gradients")
    scale, zero_point = _resolve_qparams(x, scheme, scale, zero_point)
    return _FakeQuantize.apply(x, scheme, scale, zero_point, seed, offset)
