"""Bit packing: dense sizes, the documented bit order, round trips on every width and length."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradq
from gradq import _reference

LENGTHS = [0, 1, 7, 8, 9, 63, 64, 65, 1000, 100_003]


def oracle_pack(codes: list[int], bits: int) -> bytes:
    """Independent oracle: code i at bits [i*bits, (i+1)*bits) of one little-endian integer."""
    value = sum(c << (i * bits) for i, c in enumerate(codes))
    return value.to_bytes((len(codes) * bits + 7) // 8, "little")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_pack_matches_oracle_and_round_trips(bits, n):
    gen = torch.Generator().manual_seed(1000 * bits + n)
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=gen)
    packed = gradq.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == gradq.packed_nbytes(n, bits) == -(-n * bits // 8)
    if n <= 1000:
        assert bytes(packed.tolist()) == oracle_pack(codes.tolist(), bits)
    assert torch.equal(gradq.unpack_bits(packed, bits, n), codes)


def test_one_bit_order_matches_numpy_little_endian_packbits():
    bits = np.random.default_rng(0).integers(0, 2, 1001).astype(np.uint8)
    expected = np.packbits(bits, bitorder="little")
    assert gradq.pack_bits(torch.from_numpy(bits), 1).numpy().tobytes() == expected.tobytes()


def test_documented_worked_example():
    packed = gradq.pack_bits(torch.tensor([5, 0, 7, 2, 1], dtype=torch.uint8), 3)
    # 5 + 0 << 3 + 7 << 6 + 2 << 9 + 1 << 12 = 0x15c5, stored little-endian
    assert packed.tolist() == [0xC5, 0x15]


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_property(bits, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=300))
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = gradq.pack_bits(t, bits)
    assert bytes(packed.tolist()) == oracle_pack(codes, bits)
    assert gradq.unpack_bits(packed, bits, len(codes)).tolist() == codes
    assert torch.equal(_reference.pack_bits(t, bits), packed)


def test_pack_accepts_any_shape_and_flattens():
    codes = torch.arange(12, dtype=torch.uint8).view(3, 4) % 4
    assert torch.equal(gradq.pack_bits(codes, 2), gradq.pack_bits(codes.reshape(-1), 2))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: gradq.pack_bits(torch.zeros(4, dtype=torch.uint8), 0), ValueError, "bits"),
        (lambda: gradq.pack_bits(torch.zeros(4, dtype=torch.uint8), 9), ValueError, "bits"),
        (lambda: gradq.pack_bits(torch.zeros(4, dtype=torch.uint8), 2.0), TypeError, "bits"),
        (lambda: gradq.pack_bits(torch.zeros(4, dtype=torch.int32), 2), TypeError, "codes"),
        (lambda: gradq.pack_bits([1, 2], 2), TypeError, "codes"),
        (lambda: gradq.pack_bits(torch.tensor([4], dtype=torch.uint8), 2), ValueError, "codes must be < 2**bits"),
        (lambda: gradq.pack_bits(torch.zeros(8, dtype=torch.uint8)[::2], 2), ValueError, "contiguous"),
        (lambda: gradq.unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 9), ValueError, "packed has 3 bytes"),
        (lambda: gradq.unpack_bits(torch.zeros(4, dtype=torch.uint8), 3, -1), ValueError, "numel"),
        (lambda: gradq.unpack_bits(torch.zeros(2, 2, dtype=torch.uint8), 8, 4), ValueError, "packed must be 1-D"),
        (lambda: gradq.unpack_bits(torch.zeros(2, dtype=torch.int8), 8, 2), TypeError, "packed"),
        (lambda: gradq.packed_nbytes(-1, 3), ValueError, "numel"),
    ],
)
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc, match=words.replace("*", r"\*")):
        call()
