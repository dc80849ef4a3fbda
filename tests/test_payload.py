"""Header-free payloads: exact size formula, byte layout, round trips (docs/format.md)."""

import math
import struct

import pytest
import torch

import gradq
from gradq import PerAxis, PerBucket, PerGroup, QuantScheme

SCHEMES = [
    QuantScheme.uniform(8),
    QuantScheme.uniform(4, symmetric=False),
    QuantScheme.uniform(3, signed=False, symmetric=False, granularity=PerAxis(1)),
    QuantScheme.uniform(5, granularity=PerGroup(4, axis=0)),
    QuantScheme.uniform(7, symmetric=False, granularity=PerBucket(100), rounding="stochastic"),
    QuantScheme.sign(bucket_size=64),
    QuantScheme.ternary(bucket_size=128, clip=2.5),
    QuantScheme.qsgd(levels=4, bucket_size=512),
    QuantScheme.qsgd(levels=127, bucket_size=8),
]


CASES = [
    (scheme, shape)
    for scheme in SCHEMES
    for shape in [(8, 12), (4, 8, 3), (0,), (1,)]
    if len(shape) > 1 or not isinstance(scheme.granularity, PerAxis | PerGroup)  # those need >= 2 dimensions
]


@pytest.mark.parametrize("scheme, shape", CASES, ids=repr)
def test_payload_round_trips_and_has_the_predicted_size(scheme, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    qt = gradq.quantize(x, scheme, seed=3)
    payload = gradq.encode_payload(qt)
    numel, nscales = math.prod(shape), math.prod(qt.scale.shape)
    zero_points = nscales if scheme.has_zero_point else 0
    assert (
        payload.numel()
        == gradq.payload_nbytes(shape, scheme)
        == 4 * nscales + zero_points + math.ceil(numel * scheme.bits / 8)
    )
    back = gradq.decode_payload(payload, shape, scheme)
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)
    assert (back.zero_point is None) == (qt.zero_point is None)
    if qt.zero_point is not None:
        assert torch.equal(back.zero_point, qt.zero_point)
    assert torch.equal(gradq.dequantize(back), gradq.dequantize(qt))


def test_layout_is_scales_then_zero_points_then_codes():
    x = torch.tensor([[-4.0, 1.0, 2.0, 3.0], [-1.0, -2.0, 0.5, 8.0]])
    scheme = QuantScheme.uniform(4, symmetric=False, granularity=PerAxis(0))
    qt = gradq.quantize(x, scheme)
    payload = gradq.encode_payload(qt).tolist()
    scales = b"".join(struct.pack("<f", s) for s in qt.scale.tolist())
    assert bytes(payload[:8]) == scales
    assert payload[8:10] == [z & 0xFF for z in qt.zero_point.tolist()]  # signed: two's complement bytes
    assert any(z < 0 for z in qt.zero_point.tolist())
    fields = qt.codes.reshape(-1).view(torch.uint8) & 0xF
    assert payload[10:] == gradq.pack_bits(fields.contiguous(), 4).tolist()


def test_documented_payload_example():
    qt = gradq.quantize(torch.tensor([-1.0, 0.0, 0.5, 1.0]), QuantScheme.uniform(4))
    assert qt.codes.tolist() == [-7, 0, 3, 7]  # 0.5 / fp32(1/7) = 3.4999998 rounds to 3
    assert gradq.encode_payload(qt).tolist() == [0x25, 0x49, 0x12, 0x3E, 0x09, 0x73]


def test_decode_rejects_a_payload_of_the_wrong_size():
    scheme = QuantScheme.qsgd(4, 512)
    good = gradq.encode_payload(gradq.quantize(torch.randn(1000), scheme, seed=0))
    with pytest.raises(ValueError, match="payload has 507 bytes but shape"):
        gradq.decode_payload(good[:-1], (1000,), scheme)
    with pytest.raises(TypeError, match="payload must have dtype"):
        gradq.decode_payload(good.to(torch.int16), (1000,), scheme)
    with pytest.raises(TypeError, match="QTensor"):
        gradq.encode_payload(good)


def test_compression_ratio_of_the_gradient_code_books():
    n = 1 << 20
    assert gradq.payload_nbytes(n, QuantScheme.sign(bucket_size=65536)) == n // 8 + 4 * 16
    assert gradq.payload_nbytes(n, QuantScheme.ternary(bucket_size=65536)) == n // 4 + 4 * 16
    assert gradq.payload_nbytes(n, QuantScheme.qsgd(4, 512)) == n // 2 + 4 * (n // 512)


def test_format_document_matches_the_code():
    """docs/format.md states the format version in force and its worked examples are what the code does."""
    import doctest
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "format.md"
    assert f"`gradq.FORMAT_VERSION == {gradq.FORMAT_VERSION}`" in path.read_text()
    result = doctest.testfile(str(path), module_relative=False, globs={"gradq": gradq, "torch": torch})
    assert result.attempted >= 2 and result.failed == 0


@pytest.mark.parametrize("scheme", [QuantScheme.sign(), QuantScheme.ternary(), QuantScheme.uniform(4)], ids=repr)
def test_empty_tensor_under_a_per_tensor_scheme(scheme):
    qt = gradq.quantize(torch.empty(0), scheme, seed=0)
    payload = gradq.encode_payload(qt)
    assert payload.numel() == gradq.payload_nbytes(0, scheme) == 4
    assert gradq.dequantize(gradq.decode_payload(payload, (0,), scheme)).shape == (0,)
