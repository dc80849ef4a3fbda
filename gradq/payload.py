"""Header-free payloads: a quantized tensor as one flat uint8 tensor (layout in docs/format.md).

Layout: scales (fp32 little-endian, one per scale), then zero points (affine schemes only, one byte each,
two's complement when signed), then the packed codes. Nothing describes itself: sender and receiver
agree on (shape, scheme), so the size is the pure function :func:`payload_nbytes`.
"""

from __future__ import annotations

import math
import sys

import torch

from gradq import kernels
from gradq._validate import check_tensor
from gradq.quantize import QTensor, scale_shape
from gradq.scheme import QuantScheme

FORMAT_VERSION = 1
"""Version of the wire format in docs/format.md; any change to the layout or bit order increments it."""

if sys.byteorder != "little":  # pragma: no cover - every platform PyTorch ships for is little-endian
    raise ImportError("gradq payloads assume a little-endian host")


def _num_scales(shape: tuple[int, ...], scheme: QuantScheme) -> int:
    return math.prod(scale_shape(shape, scheme.granularity))


def payload_nbytes(shape: tuple[int, ...] | torch.Size | int, scheme: QuantScheme) -> int:
    """Exact payload size in bytes for a tensor of ``shape`` (or a flat numel) under ``scheme``.

    = 4 * nscales + (nscales if affine) + ceil(numel * bits / 8).
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nscales = _num_scales(shape, scheme)
    zero_points = nscales if scheme.has_zero_point else 0
    return 4 * nscales + zero_points + kernels.packed_nbytes(math.prod(shape), scheme.bits)


def _code_fields(qt: QTensor) -> torch.Tensor:
    """Codes as unsigned ``bits``-wide fields (two's complement for signed uniform codes)."""
    codes = qt.codes.reshape(-1)
    if codes.dtype == torch.int8:
        codes = codes.view(torch.uint8) & ((1 << qt.scheme.bits) - 1)
    return codes.contiguous()


def encode_payload(qt: QTensor) -> torch.Tensor:
    """``qt`` as a flat uint8 tensor of exactly ``payload_nbytes(qt.shape, qt.scheme)`` bytes."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"encode_payload takes a QTensor, got {type(qt).__name__}")
    parts = [qt.scale.reshape(-1).to(torch.float32).contiguous().view(torch.uint8)]
    if qt.zero_point is not None:
        parts.append(qt.zero_point.reshape(-1).to(torch.int8).view(torch.uint8))
    parts.append(kernels.pack_bits(_code_fields(qt), qt.scheme.bits))
    return torch.cat(parts)


def decode_payload(
    payload: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    scheme: QuantScheme,
    dtype: torch.dtype = torch.float32,
) -> QTensor:
    """Inverse of :func:`encode_payload` for the agreed ``shape`` and ``scheme``."""
    shape = torch.Size(shape)
    check_tensor("payload", payload, dtypes=(torch.uint8,), dim=1)
    expected = payload_nbytes(shape, scheme)
    if payload.numel() != expected:
        raise ValueError(
            f"payload has {payload.numel()} bytes but shape {tuple(shape)} under this scheme needs {expected}"
        )
    nscales = _num_scales(tuple(shape), scheme)
    target = scale_shape(shape, scheme.granularity)
    scale = payload[: 4 * nscales].clone().view(torch.float32).reshape(target)
    pos = 4 * nscales
    zero_point = None
    if scheme.has_zero_point:
        raw = payload[pos : pos + nscales]
        zero_point = (raw.view(torch.int8) if scheme.signed else raw).to(torch.int32).reshape(target)
        pos += nscales
    fields = kernels.unpack_bits(payload[pos:], scheme.bits, math.prod(shape))
    if scheme.codebook == "uniform" and scheme.signed:
        sign = 1 << (scheme.bits - 1)
        fields = ((fields.to(torch.int16) ^ sign) - sign).to(torch.int8)
    return QTensor(fields.view(shape), scale, zero_point, scheme, dtype)
