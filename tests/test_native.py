"""The native kernels reproduce the pure-PyTorch reference bit for bit (docs/kernels.md)."""

import math
from fractions import Fraction

import pytest
import torch

import gradq
from gradq import _reference
from tests.conftest import assert_same_bits

ODD_LENGTHS = [1, 7, 9, 63, 513, 4097, 100_003]
BLOCKS = [8, 64, 4096]


def test_native_is_built():
    assert gradq.native_available(), "gradq._C did not build; see the install log"


def sample(n: int, seed: int, nonfinite: bool) -> torch.Tensor:
    """Heavy-tailed values with exact zeros, -0.0, one all-zero 512-block (scale 0) and optional NaN/Inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).pow(4) * 10
    x[torch.rand(n, generator=gen) < 0.05] = 0.0
    x[torch.rand(n, generator=gen) < 0.02] = -0.0
    if n >= 2048:
        x[1024:1536] = 0.0
    if nonfinite:
        idx = torch.randint(0, n, (3,), generator=gen)
        x[idx[0]] = float("nan")
        x[idx[1]] = float("inf")
        x[idx[2]] = -float("inf")
    return x


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_reference_philox_matches_random123_known_answers(counter, key, expected):
    out = _reference.philox4x32(torch.tensor([counter], dtype=torch.int64), key)
    assert tuple(out[0].tolist()) == expected


def test_native_philox_matches_known_answer_and_reference(native):
    u = native.philox_uniform(4, 0, 0)
    words = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert u.tolist() == [(w >> 8) * 2.0**-24 for w in words]
    for n, seed, offset in [(1, 5, 0), (1001, 2**64 - 1, 2**64 - 1), (4099, 12345, 2**33 + 7)]:
        assert_same_bits(native.philox_uniform(n, seed, offset), _reference.philox_uniform(n, seed, offset))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, *ODD_LENGTHS])
def test_pack_unpack(native, bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + bits))
    packed = native.pack_bits(codes, bits)
    assert_same_bits(packed, _reference.pack_bits(codes, bits))
    assert_same_bits(native.unpack_bits(packed, bits, n), _reference.unpack_bits(packed, bits, n))


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n", ODD_LENGTHS)
def test_sign_compress_with_error_feedback(native, n, block, nonfinite, rms):
    x = sample(n, n + block, nonfinite)
    r_native = torch.randn(n, generator=torch.Generator().manual_seed(7))
    r_ref = r_native.clone()
    packed, scales = native.sign_compress(x, r_native, block, rms)
    ref_packed, ref_scales = _reference.sign_compress(x, r_ref, block, rms)
    assert_same_bits(packed, ref_packed)
    assert_same_bits(scales, ref_scales)
    assert_same_bits(r_native, r_ref)
    assert_same_bits(
        native.sign_decompress(packed, scales, block, n, None, False),
        _reference.sign_decompress(packed, scales, block, n, None, False),
    )


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("n", ODD_LENGTHS)
def test_sign_compress_without_residual(native, n, rms):
    x = sample(n, n, nonfinite=False)
    for a, b in zip(native.sign_compress(x, None, 64, rms), _reference.sign_compress(x, None, 64, rms), strict=True):
        assert_same_bits(a, b)


def _fp32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float64).float())


def _root_rounded_up(mean_square: Fraction) -> float:
    """The smallest fp32 s with s * s >= mean_square, found with exact rational arithmetic."""
    s = _fp32(math.sqrt(mean_square))
    while Fraction(s) ** 2 < mean_square:
        s = float(torch.nextafter(torch.tensor(s), torch.tensor(math.inf)))
    while s > 0 and Fraction(below := float(torch.nextafter(torch.tensor(s), torch.tensor(0.0)))) ** 2 >= mean_square:
        s = below
    return s


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_sign_rms_scale_is_the_root_mean_square_rounded_up_and_capped(native, backend):
    """rms scale = min(the smallest fp32 s with s * s >= sum(m^2) / count, fp32(1.5 * (sum|m| / count))),
    exactly: blocks of 8 fp32 integers (sums exact in float64 and in Python integers), some sparse enough
    (rms > 1.5 mean |m|) for the cap to decide."""
    kernels = native if backend == "native" else _reference
    gen = torch.Generator().manual_seed(23)
    blocks = torch.randint(-(2**25), 2**25, (4096, 8), generator=gen).float()
    blocks[:5] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # rms 1 exactly
    blocks[5:1000, 2:] = 0.0  # two values and six zeros: rms >= 2 mean |m|, capped
    x = torch.cat([blocks.flatten(), torch.tensor([3.0, -4.0])])  # a last block of 2: rms sqrt(12.5)
    _, scales = kernels.sign_compress(x, None, 8, True)
    capped = 0
    for row, s in zip([*blocks.long().tolist(), [3, -4]], scales.tolist(), strict=True):
        root = _root_rounded_up(Fraction(sum(v * v for v in row), len(row)))
        cap = _fp32(1.5 * (sum(abs(v) for v in row) / len(row)))
        assert s == min(root, cap)
        capped += cap < root
    assert scales[:5].tolist() == [1.0] * 5 and 995 <= capped < 2000  # the sparse ones (rms >= 2 mean), few others
    d = 2.0**-149  # subnormal: the rms of (d, d, 0 x 6) is d / 2, rounded up to d; 1.5 * mean is below it
    assert kernels.sign_compress(torch.tensor([d, d] + [0.0] * 6), None, 8, True)[1].tolist() == [0.0]
    assert kernels.sign_compress(torch.tensor([d] * 8), None, 8, True)[1].tolist() == [d]


def test_sign_compress_overflowing_sum_keeps_that_blocks_residual(native):
    x = torch.full((32,), 1.0)
    x[20] = 3.0e38
    r = torch.zeros(32)
    r[20] = 3.0e38  # x + r overflows to +inf inside block 2 only
    r_ref, r_before = r.clone(), r.clone()
    _, scales = native.sign_compress(x, r, 8, False)
    _reference.sign_compress(x, r_ref, 8, False)
    assert_same_bits(r, r_ref)
    assert torch.isinf(scales[2]) and torch.isfinite(scales[[0, 1, 3]]).all()
    assert torch.equal(r[16:24], r_before[16:24])  # untouched
    assert r[:16].eq(0.0).all()  # 1.0 - mean|1.0|


@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize(
    "levels, block, l2, clip",
    [
        (1, 64, False, 0.0),
        (1, 4096, False, 2.5),
        (3, 4096, False, 0.0),
        (2, 512, True, 0.0),
        (4, 512, True, 0.0),
        (7, 8, True, 0.0),
        (127, 4096, True, 0.0),
    ],
)
@pytest.mark.parametrize("n", ODD_LENGTHS)
def test_signmag_compress_and_decompress(native, n, levels, block, l2, clip, nonfinite):
    """Plain code and (l2 rule) escape code; both decode to the same values."""
    x = sample(n, n * levels, nonfinite)
    seed, offset = 2**64 - 3 - n, n * 31
    decoded = []
    for escapes in (0, gradq.signmag_escapes(levels, block)) if l2 else (0,):
        packed, scales = native.signmag_compress(x, levels, block, l2, clip, seed, offset, escapes)
        ref_packed, ref_scales = _reference.signmag_compress(x, levels, block, l2, clip, seed, offset, escapes)
        assert_same_bits(packed, ref_packed)
        assert_same_bits(scales, ref_scales)
        decoded.append(native.signmag_decompress(packed, scales, levels, block, n, None, False, escapes))
        ref_decoded = _reference.signmag_decompress(packed, scales, levels, block, n, None, False, escapes)
        assert_same_bits(decoded[-1], ref_decoded)
    assert_same_bits(decoded[0], decoded[-1])


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_escape_capacity_is_enforced(native, backend):
    """Levels >= 2 go to the escape entries; more escapes than entries fail loudly on both sides."""
    kernels = native if backend == "native" else _reference
    x = torch.tensor([1.0] * 4 + [0.0] * 12)  # ||x|| = 2: y = 2 exactly at 4 levels, so level 2 (escaped)
    packed, scales = kernels.signmag_compress(x, 4, 16, True, 0.0, 0, 0, 16)
    assert packed[:4].tolist() == [0b10101010, 0, 0, 0]  # four escape symbols, then level 0
    assert packed[4:].tolist() == [0x22, 0x22, 0, 0, 0, 0, 0, 0]  # entries: field 2 (level 2, sign 0) x 4
    assert_same_bits(kernels.signmag_decompress(packed, scales, 4, 16, 16, None, False, 16), x)
    # 16 equal values at 8 levels: y = 2 for all 16, twice the 8 entries passed (the bound would give 16).
    with pytest.raises(RuntimeError, match="more than 8 escapes"):
        kernels.signmag_compress(torch.ones(16), 8, 16, True, 0.0, 0, 0, 8)
    # The same 16 values at the start of a 256-block (16 values per step on AVX-512 there).
    with pytest.raises(RuntimeError, match="more than 8 escapes"):
        kernels.signmag_compress(
            torch.cat((torch.ones(256), torch.ones(16), torch.zeros(240))), 8, 256, True, 0.0, 0, 0, 8
        )
    corrupt = torch.cat((torch.full((4,), 0b10101010, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="corrupt sign-magnitude payload.*more than 8 escape symbols"):
        kernels.signmag_decompress(corrupt, torch.ones(1), 4, 16, 16, None, False, 8)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_l2_scale_is_the_norm_rounded_up(native, backend):
    """The smallest fp32 >= the float64 norm, also where round-to-nearest would go below it (subnormals)."""
    kernels = native if backend == "native" else _reference
    d = 2.0**-149  # the smallest subnormal: ||(d, d)|| = 1.41 d, which rounds to nearest as 1 d
    tiny = torch.tensor([d, d] + [0.0] * 6)
    _, scales = kernels.signmag_compress(tiny, 4, 8, True, 0.0, 0, 0, 0)
    assert scales.tolist() == [2 * d]
    x = sample(1 << 16, 5, nonfinite=False)
    _, scales = kernels.signmag_compress(x, 4, 64, True, 0.0, 0, 0, 0)
    norms = torch.stack([c.double().square().sum().sqrt() for c in x.split(64)])
    below = torch.nextafter(scales, torch.zeros_like(scales))
    assert (scales.double() >= norms * (1 - 2**-40)).all()
    assert ((below.double() < norms * (1 + 2**-40)) | (norms == 0)).all()  # nothing lower would do (0 stays 0)
    assert (scales.double() > norms).any()  # some blocks did round up


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_l2_scale_is_defined_by_an_exact_test_not_by_sqrt_rounding(native, backend):
    """scale = the smallest fp32 s with s * s >= the float64 sum of squares, checked in exact integers.

    (a, a 2^-26) has the sum a^2 (1 + 2^-52), whose float64 sqrt rounds to a itself: a rule built on the
    rounded sqrt keeps a, whose square is below the sum, so the scale must be the next fp32 above a."""
    kernels = native if backend == "native" else _reference
    a = torch.tensor([1.0, 2.0**20, 3.0 * 2**-30, 2.0**-60, 1.5])
    tricky = torch.zeros(len(a), 8)
    tricky[:, 0], tricky[:, 1] = a, a * 2.0**-26
    _, scales = kernels.signmag_compress(tricky.flatten(), 4, 8, True, 0.0, 0, 0, 0)
    assert torch.equal(scales, torch.nextafter(a, torch.full_like(a, torch.inf)))
    # integer blocks (p, q, r) with norms of 2^24..2^26, where fp32 steps are 2..8 apart
    gen = torch.Generator().manual_seed(17)
    blocks = torch.cat([torch.randint(2**23, 2**25, (4096, 3), generator=gen).float(), torch.zeros(4096, 5)], 1)
    ints = blocks[:, :3].long()  # fp32 integers (even above 2^24), exactly
    _, scales = kernels.signmag_compress(blocks.flatten(), 4, 8, True, 0.0, 0, 0, 0)
    below = torch.nextafter(scales, torch.zeros_like(scales))
    for (p, q, r), s, b in zip(ints.tolist(), scales.tolist(), below.tolist(), strict=True):
        sumsq = p * p + q * q + r * r  # < 2^52: the float64 sum is exact too
        assert s * s >= sumsq > b * b


@pytest.mark.parametrize("block", [64, 200])
@pytest.mark.parametrize("levels", [2, 3, 4, 8])
def test_escape_code_holds_every_block_the_l2_bound_allows(native, levels, block):
    """m equal values per block (y = levels / sqrt(m)) for every m up to levels**2 + 1, tiny or subnormal:
    the escapes fit signmag_escapes(levels, block) entries and decode to the plain code's values."""
    escapes = gradq.signmag_escapes(levels, block)
    rows = []
    for m in range(1, min(levels**2 + 1, block) + 1):
        for magnitude in (1.0, 3e-39, 2.0**-147):
            row = torch.zeros(block)
            row[torch.randperm(block, generator=torch.Generator().manual_seed(m))[:m]] = magnitude
            rows.append(row * torch.where(torch.arange(block) % 3 == 0, -1.0, 1.0))
    x = torch.cat(rows)
    for seed in range(5):
        plain = native.signmag_compress(x, levels, block, True, 0.0, seed, 0, 0)
        packed, scales = native.signmag_compress(x, levels, block, True, 0.0, seed, 0, escapes)
        ref_packed, ref_scales = _reference.signmag_compress(x, levels, block, True, 0.0, seed, 0, escapes)
        assert_same_bits(packed, ref_packed)
        assert_same_bits(scales, ref_scales)
        decoded = native.signmag_decompress(packed, scales, levels, block, x.numel(), None, False, escapes)
        assert_same_bits(decoded, native.signmag_decompress(*plain, levels, block, x.numel(), None, False, 0))
        assert (decoded.abs() > scales.repeat_interleave(block) * (1.5 / levels)).any()  # escapes did occur


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("n", [1, 9, 4097, 70_001])
def test_sign_mean_compress(native, n, rows, nonfinite, rms):
    block = 512
    codes = [native.sign_compress(sample(n, n + r, nonfinite and r == 1), None, block, rms) for r in range(rows)]
    packed_rows = torch.stack([c[0] for c in codes])
    scale_rows = torch.stack([c[1] for c in codes])
    for with_residual in (False, True):
        r_native = sample(n, 99, nonfinite=False) if with_residual else None
        r_ref = r_native.clone() if with_residual else None
        out = native.sign_mean_compress(packed_rows, scale_rows, r_native, block, n, rms)
        ref = _reference.sign_mean_compress(packed_rows, scale_rows, r_ref, block, n, rms)
        for a, b in zip(out, ref, strict=True):
            assert_same_bits(a, b)
        if with_residual:
            assert_same_bits(r_native, r_ref)


SIGNMAG_CODES = [(1, 64, False, 0.0), (1, 4096, False, 2.5), (4, 512, True, 0.0), (7, 8, True, 0.0)]


@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("levels, block, l2, clip", SIGNMAG_CODES)
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("n", [1, 9, 4097, 70_001])
def test_signmag_mean_compress(native, n, rows, levels, block, l2, clip, nonfinite):
    """The fused server step against the reference's decode, sum in row order, / W, re-encode."""
    for escapes in (0, gradq.signmag_escapes(levels, block)) if l2 else (0,):
        codes = [
            native.signmag_compress(sample(n, n + r, nonfinite and r == 1), levels, block, l2, clip, r, 7, escapes)
            for r in range(rows)
        ]
        packed_rows = torch.stack([c[0] for c in codes])
        scale_rows = torch.stack([c[1] for c in codes])
        args = (levels, block, n, l2, clip, 2**64 - 5, n, escapes)
        out = native.signmag_mean_compress(packed_rows, scale_rows, *args)
        ref = _reference.signmag_mean_compress(packed_rows, scale_rows, *args)
        for a, b in zip(out, ref, strict=True):
            assert_same_bits(a, b)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_signmag_mean_compress_rejects_a_corrupt_row(native, backend):
    kernels = native if backend == "native" else _reference
    good = kernels.signmag_compress(torch.ones(16), 2, 16, True, 0.0, 0, 0, 8)[0]  # 4 + 8 entries x 3 bits
    corrupt = torch.cat((torch.full((4,), 0b10101010, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="corrupt sign-magnitude payload.*more than 8 escape symbols"):
        kernels.signmag_mean_compress(torch.stack((good, corrupt)), torch.ones(2, 1), 2, 16, 16, True, 0.0, 0, 0, 8)


@pytest.mark.parametrize("n", [1, 63, 4097])
def test_decompress_into_and_accumulating_into_an_output(native, n):
    x = sample(n, n, nonfinite=False)
    base = sample(n, n + 1, nonfinite=False)
    sign = native.sign_compress(x, None, 64, False)
    signmag = native.signmag_compress(x, 4, 64, True, 0.0, 3, 4, 0)
    escaped = native.signmag_compress(x, 4, 64, True, 0.0, 3, 4, 16)
    cases = (
        ("sign_decompress", (*sign, 64, n), ()),
        ("signmag_decompress", (*signmag, 4, 64, n), (0,)),
        ("signmag_decompress", (*escaped, 4, 64, n), (16,)),
    )
    for accumulate in (False, True):
        for kernel, args, tail in cases:
            outs = [base.clone(), base.clone()]
            results = [
                getattr(mod, kernel)(*args, out, accumulate, *tail)
                for mod, out in zip((native, _reference), outs, strict=True)
            ]
            assert all(r.data_ptr() == o.data_ptr() for r, o in zip(results, outs, strict=True))
            assert_same_bits(outs[0], outs[1])
            fresh = getattr(_reference, kernel)(*args, None, False, *tail)
            assert_same_bits(outs[0], base + fresh if accumulate else fresh)


def test_results_do_not_depend_on_thread_count(native):
    x = sample(1 << 20, 3, nonfinite=False)
    signmag_rows = native.signmag_compress(sample(1 << 20, 4, nonfinite=False), 4, 512, True, 0.0, 1, 2, 16)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            r = torch.zeros_like(x)
            sign = native.sign_compress(x, r, 4096, False)
            sign_rms = native.sign_compress(x, torch.zeros_like(x), 4096, True)
            signmag = native.signmag_compress(x, 4, 512, True, 0.0, 99, 1, 0)
            escaped = native.signmag_compress(x, 4, 512, True, 0.0, 99, 1, 16)
            decoded = native.signmag_decompress(*escaped, 4, 512, x.numel(), None, False, 16)
            rows = [torch.stack(t) for t in zip(escaped, signmag_rows, strict=True)]
            mean = native.signmag_mean_compress(*rows, 4, 512, x.numel(), True, 0.0, 5, 6, 16)
            uniforms = native.philox_uniform(x.numel(), 99, 1)
            outputs.append((*sign, r, *sign_rms, *signmag, *escaped, decoded, *mean, uniforms))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outputs, strict=True):
        assert_same_bits(a, b)


def test_environment_variable_selects_the_backend(monkeypatch):
    x = sample(1001, 1, nonfinite=False)
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    ref = gradq.signmag_compress(x, levels=4, block=64, rule="l2", seed=1)
    monkeypatch.setenv("GRADQ_KERNELS", "native")
    nat = gradq.signmag_compress(x, levels=4, block=64, rule="l2", seed=1)
    for a, b in zip(ref, nat, strict=True):
        assert_same_bits(a, b)
    monkeypatch.setenv("GRADQ_KERNELS", "fastest")
    with pytest.raises(ValueError, match="GRADQ_KERNELS='fastest'"):
        gradq.pack_bits(torch.zeros(3, dtype=torch.uint8), 1)


def test_missing_native_build_falls_back_once_with_a_warning(monkeypatch):
    from gradq import _backend

    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_IMPORT_ERROR", ImportError("no compiler"))
    monkeypatch.setattr(_backend, "_warned", False)
    monkeypatch.delenv("GRADQ_KERNELS", raising=False)
    codes = torch.tensor([1, 0, 1], dtype=torch.uint8)
    with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
        assert gradq.pack_bits(codes, 1).tolist() == [5]
    assert gradq.pack_bits(codes, 1).tolist() == [5]  # no second warning: pytest's filter would fail on it
    assert not gradq.native_available()
    monkeypatch.setenv("GRADQ_KERNELS", "native")
    with pytest.raises(RuntimeError, match="not built"):
        gradq.pack_bits(codes, 1)
