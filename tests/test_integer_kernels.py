"""The integer kernels (csrc/integer_gemm.cpp, csrc/code_ops.cpp): every instruction set this CPU has,
bit-exact against the pure-PyTorch reference on odd shapes; the reference against an independent oracle (F.conv2d and
matmul in float64, requantization in Python integers); the weight layout; requantization edge cases."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradq import _integer_reference, integer_kernels
from gradq._backend import native_available
from gradq.fixedpoint import quantize_multiplier
from gradq.integer_kernels import (
    ISAS,
    integer_conv2d,
    integer_linear,
    max_pool2d_codes,
    native_isa,
    pack_layout,
    plan_integer_gemm,
)

pytestmark = pytest.mark.skipif(not native_available(), reason="native kernels not built")

BEST = ISAS[native_isa()]
AVAILABLE = [name for name, v in ISAS.items() if 0 < v <= BEST]


def test_the_widest_instruction_set_of_this_cpu_is_chosen():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        expected = "avx512_vnni"
    else:
        expected = "avx2" if {"avx2", "fma"} <= flags else "portable"
    assert native_isa() == expected
    assert AVAILABLE[-1] == expected and AVAILABLE[0] == "portable"  # every narrower path is tested too


def _codes(q_bits: int, sign: bool, c: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if sign:
        return torch.where(torch.rand(c, k, generator=gen) < 0.5, -1, 1)
    half = 1 << (q_bits - 1)
    return torch.randint(-half, half, (c, k), generator=gen)


def _plan(c, k, bits, *, group=0, x_signed=False, out_signed=False, relu=False, zx=None, zero_frac=0.2, seed=0,
          taps=1):
    gen = torch.Generator().manual_seed(seed)
    sign = bits == 1
    q = _codes(bits, sign, c, k, gen)
    r = torch.randint(1, 256, (c, k // group), generator=gen) if group else None
    zero = torch.rand(c, generator=gen) < zero_frac
    bq = torch.randint(-3000, 3000, (c,), generator=gen)
    mult, shift = quantize_multiplier(torch.rand(c, generator=gen, dtype=torch.float64) * (2e-4 if group else 4e-3))
    zx = (0 if x_signed else 9) if zx is None else zx
    lo, hi = (-128, 127) if out_signed else (0, 255)
    zo = 0 if out_signed else 5
    if relu:
        lo = max(lo, zo)
    plan = plan_integer_gemm(q, r, zero, bits, sign, group, bq, mult, shift, zx, zo, lo, hi, x_signed, out_signed,
                             taps)
    return plan, (q, r, zero, bq, mult, shift, zx, zo, lo, hi)


def _inputs(shape, signed, seed):
    gen = torch.Generator().manual_seed(seed)
    if signed:
        return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


def _oracle_requantize(acc: torch.Tensor, mult, shift, zo, lo, hi, channel_dim):
    """docs/integer.md section 3 in Python integers, element by element."""
    out = acc.clone()
    flat_acc, flat_out = acc.movedim(channel_dim, -1).reshape(-1, acc.shape[channel_dim]), []
    for row in flat_acc.tolist():
        flat_out.append([min(max(((a * int(m) + (1 << (int(n) - 1))) >> int(n)) + zo, lo), hi)
                         for a, m, n in zip(row, mult, shift, strict=True)])
    moved = torch.tensor(flat_out, dtype=torch.int64).view(acc.movedim(channel_dim, -1).shape)
    out.copy_(moved.movedim(-1, channel_dim))
    return out


def _oracle_wi(q, r, zero, group):
    wi = q if r is None else q * r.repeat_interleave(group, dim=1)
    return torch.where(zero.unsqueeze(1), 0, wi)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_layout_round_trip_and_bytes(bits):
    gen = torch.Generator().manual_seed(bits)
    q = _codes(bits, bits == 1, 3, 192, gen)
    packed = pack_layout(q, bits, bits == 1)
    assert packed.shape == (3, 192 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(_integer_reference.unpack_layout(packed, bits, bits == 1), q)
    # byte 0 of a block: code 0 in its low bits; the next field is code 1 (8, 1 bit) or code 8*bits (2, 4 bit)
    field = (q < 0).long() if bits == 1 else q & ((1 << bits) - 1)
    second = 1 if bits in (1, 8) else 8 * bits
    expected = int(field[0, 0]) if bits == 8 else int(field[0, 0]) | (int(field[0, second]) << bits)
    assert int(packed[0, 0]) & ((1 << min(2 * bits, 8)) - 1) == expected
    if bits in (2, 4):  # offset binary: the fields are q + 2**(bits-1)
        offset = pack_layout(q, bits, False, offset_binary=True)
        assert torch.equal(_integer_reference.unpack_layout(offset, bits, False, offset_binary=True), q)
        half = 1 << (bits - 1)
        assert int(offset[0, 0]) & ((1 << bits) - 1) == int(q[0, 0]) + half


CASES = [  # rows, channels, K, bits, group
    (1, 5, 64, 8, 0), (3, 9, 100, 8, 0), (7, 13, 250, 4, 0), (5, 4, 64, 4, 64), (6, 7, 256, 4, 128),
    (2, 11, 130, 2, 0), (9, 6, 192, 2, 64), (4, 10, 77, 1, 0), (1, 3, 512, 1, 0), (5, 5, 96, 3, 0),
    (3, 6, 120, 5, 0), (4, 5, 40, 2, 8), (2, 3, 96, 4, 32), (17, 17, 320, 4, 0), (1, 33, 1000, 8, 0),
]


@pytest.mark.parametrize("rows,c,k,bits,group", CASES)
@pytest.mark.parametrize("x_signed,out_signed,relu", [(False, False, True), (True, True, False), (False, True, False)])
def test_linear_native_equals_reference_and_oracle(rows, c, k, bits, group, x_signed, out_signed, relu, monkeypatch):
    plan, (q, r, zero, bq, mult, shift, zx, zo, lo, hi) = _plan(
        c, k, bits, group=group, x_signed=x_signed, out_signed=out_signed, relu=relu, seed=rows * 31 + k
    )
    x = _inputs((rows, k), x_signed, seed=k)
    acc = (x.long() - zx) @ _oracle_wi(q, r, zero, group).T + bq
    expected = _oracle_requantize(acc, mult.tolist(), shift.tolist(), zo, lo, hi, -1)
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    ref = integer_linear(x, plan)
    assert ref.dtype == (torch.int8 if out_signed else torch.uint8)
    assert torch.equal(ref.long(), expected)
    monkeypatch.setenv("GRADQ_KERNELS", "native")
    for isa in AVAILABLE:
        assert torch.equal(integer_linear(x, plan, isa=isa, engine="gradq"), ref), isa


CONV_CASES = [  # N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups
    (2, 3, 9, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 4, 8, 8, 6, (3, 2), (2, 1), (0, 2), (1, 2), 2),
    (3, 1, 28, 28, 6, (5, 5), (1, 1), (0, 0), (1, 1), 1),
    (1, 6, 5, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1), 6),
    (2, 8, 6, 11, 4, (1, 3), (1, 2), (0, 1), (1, 1), 1),
    (2, 1, 9, 10, 5, (3, 3), (2, 1), (1, 2), (1, 1), 1),  # one channel, at most 4 x 8 taps: a byte shuffle
    (1, 1, 7, 6, 3, (4, 8), (1, 2), (2, 1), (1, 1), 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (2, 0), (1, 0), (4, 64)])
@pytest.mark.parametrize("x_signed", [False, True])
def test_conv2d_native_equals_reference_and_float64_conv(case, bits, group, x_signed, monkeypatch):
    n, cin, h, w, cout, kernel, stride, padding, dilation, groups = case
    k = cin // groups * kernel[0] * kernel[1]
    if group and k % group:
        group = 0
    plan, (q, r, zero, bq, mult, shift, zx, zo, lo, hi) = _plan(cout, k, bits, group=group, x_signed=x_signed,
                                                               out_signed=x_signed, seed=k + n,
                                                               taps=kernel[0] * kernel[1])
    x = _inputs((n, cin, h, w), x_signed, seed=h * w)
    wi = _oracle_wi(q, r, zero, group).view(cout, cin // groups, *kernel)
    acc = F.conv2d((x.long() - zx).double(), wi.double(), bq.double(), stride, padding, dilation, groups)
    expected = _oracle_requantize(acc.long(), mult.tolist(), shift.tolist(), zo, lo, hi, 1)
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    ref = integer_conv2d(x, plan, kernel, stride, padding, dilation, groups)
    assert torch.equal(ref.long(), expected)
    monkeypatch.setenv("GRADQ_KERNELS", "native")
    for isa in AVAILABLE:
        assert torch.equal(integer_conv2d(x, plan, kernel, stride, padding, dilation, groups, isa=isa), ref), isa


@pytest.mark.parametrize("rows", [1, 5, 130])
@pytest.mark.parametrize("x_signed", [False, True])
@pytest.mark.parametrize("bits", [8, 4, 1])
def test_int_mm_engine_equals_gradq_kernel(rows, x_signed, bits):
    plan, _ = _plan(7, 100, bits, x_signed=x_signed, out_signed=not x_signed, seed=rows)
    x = _inputs((rows, 100), x_signed, seed=rows)
    expected = integer_linear(x, plan, engine="gradq")
    assert torch.equal(integer_linear(x, plan, engine="int_mm"), expected)
    assert plan.int8_weights().shape == (112, 7)  # K padded to a multiple of 16, made once, then kept
    assert plan.int8_weights() is plan.int8_weights()
    assert torch.equal(integer_linear(x, plan, engine="auto"), expected)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[-1] == 1])  # torch._int_mm: groups 1 only
@pytest.mark.parametrize("bits", [8, 2, 1])
@pytest.mark.parametrize("tile_bytes", [1, 2000, integer_kernels.CONV_TILE_BYTES])
def test_conv_int_mm_engine_equals_gradq_kernel(case, bits, tile_bytes, monkeypatch):
    # tiles of one output row, of a few rows (a shorter last tile), and the default (one tile here)
    monkeypatch.setattr(integer_kernels, "CONV_TILE_BYTES", tile_bytes)
    n, cin, h, w, cout, kernel, stride, padding, dilation, groups = case
    k = cin * kernel[0] * kernel[1]
    for x_signed in (False, True):
        plan, _ = _plan(cout, k, bits, x_signed=x_signed, out_signed=x_signed, seed=k, taps=kernel[0] * kernel[1])
        x = _inputs((n, cin, h, w), x_signed, seed=h)
        expected = integer_conv2d(x, plan, kernel, stride, padding, dilation, 1, engine="gradq")
        for layout in (torch.contiguous_format, torch.channels_last):  # copied to channels last, or read in place
            out = integer_conv2d(x.contiguous(memory_format=layout), plan, kernel, stride, padding, dilation, 1,
                                 engine="int_mm")
            assert torch.equal(out, expected), layout


DIRECT_CASES = [  # (N, C_in, H, W, C_out, kernel, stride, padding, dilation)
    (2, 16, 14, 14, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # the residual CNN's block: one 16-channel block
    (3, 1, 28, 28, 16, (3, 3), (2, 2), (1, 1), (1, 1)),  # one input channel: a kernel row is 3 bytes of 4
    (1, 3, 9, 7, 32, (5, 5), (1, 1), (2, 2), (1, 1)),  # two blocks; rows of 15 inputs
    (2, 5, 11, 13, 48, (3, 2), (2, 1), (2, 0), (2, 1)),  # three blocks; dilation along H
    (1, 7, 10, 9, 80, (3, 3), (1, 2), (1, 1), (1, 2)),  # four blocks, then one; dilation along W: tap segments
    (1, 2, 2, 2, 64, (1, 1), (1, 1), (0, 0), (1, 1)),  # 4 positions, fewer than a register block
    (1, 33, 5, 6, 16, (4, 8), (1, 1), (1, 2), (1, 1)),  # rows of 264 inputs
    (2, 8, 7, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1)),  # 8 channels: one block, stored masked
    (1, 3, 9, 8, 40, (3, 3), (2, 1), (1, 1), (1, 1)),  # three blocks, the last one half full
    (1, 5, 6, 7, 84, (3, 1), (1, 1), (1, 0), (2, 1)),  # four blocks, then two, the last with 4 channels
]
DIRECT = native_available() and integer_kernels._direct_reason(_plan(16, 9, 8)[0], 1, integer_kernels._kernels(
    torch.zeros(1), "auto")[0]) == ""


@pytest.mark.skipif(not DIRECT, reason="the direct convolution needs the native build and AVX-512 VNNI")
@pytest.mark.parametrize("case", DIRECT_CASES)
@pytest.mark.parametrize("bits", [8, 4, 1])
@pytest.mark.parametrize("x_signed", [False, True])
def test_direct_convolution_equals_reference(case, bits, x_signed, monkeypatch):
    n, cin, h, w, cout, kernel, stride, padding, dilation = case
    k = cin * kernel[0] * kernel[1]
    plan, _ = _plan(cout, k, bits, x_signed=x_signed, out_signed=not x_signed, zx=-3 if x_signed else 9, seed=k,
                    taps=kernel[0] * kernel[1])
    wide = _inputs((n, cin, h, w + 3), x_signed, seed=h + cout)
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    expected = integer_conv2d(wide[..., 3:].contiguous(), plan, kernel, stride, padding, dilation, 1)
    monkeypatch.setenv("GRADQ_KERNELS", "native")
    for x in (wide[..., 3:].contiguous(), wide[..., 3:].contiguous(memory_format=torch.channels_last), wide[..., 3:]):
        out = integer_conv2d(x, plan, kernel, stride, padding, dilation, 1, engine="direct")
        assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, expected), x.stride()


@pytest.mark.skipif(not DIRECT, reason="the direct convolution needs the native build and AVX-512 VNNI")
def test_auto_engine_takes_the_direct_convolution_where_it_runs(monkeypatch):
    calls = []
    native = integer_kernels._kernels(torch.zeros(1), "auto")[0]
    direct = native.conv2d_direct
    monkeypatch.setattr(native, "conv2d_direct", lambda *a: calls.append(1) or direct(*a))
    x = _inputs((2, 16, 6, 6), False, seed=1)
    for cout, group, want in ((32, 0, 1), (20, 0, 1), (32, 16, 0)):  # per-group weights: int_mm or gradq
        plan, _ = _plan(cout, 144, 4, group=group, seed=cout, taps=9)
        auto = integer_conv2d(x, plan, (3, 3), (1, 1), (1, 1), (1, 1), 1)
        assert torch.equal(auto, integer_conv2d(x, plan, (3, 3), (1, 1), (1, 1), (1, 1), 1, engine="gradq"))
        assert len(calls) == want
        calls.clear()
    threads = torch.get_num_threads()
    plan, _ = _plan(48, 144, 8, seed=2, taps=9)
    x = _inputs((3, 16, 14, 14), False, seed=2)
    try:
        torch.set_num_threads(1)
        one = integer_conv2d(x, plan, (3, 3), (1, 1), (1, 1), (1, 1), 1)
        torch.set_num_threads(2)
        assert torch.equal(integer_conv2d(x, plan, (3, 3), (1, 1), (1, 1), (1, 1), 1), one)
    finally:
        torch.set_num_threads(threads)


def test_direct_engine_names_what_it_cannot_run():
    x = _inputs((1, 4, 6, 6), False, seed=0)
    for cout, group, groups, match in ((32, 4, 1, "per-channel weights"), (32, 0, 2, "groups=1 only")):
        plan, _ = _plan(cout, 36 // groups, 8, group=group, seed=1, taps=9)
        with pytest.raises(ValueError, match=match):
            integer_conv2d(x, plan, (3, 3), (1, 1), (1, 1), (1, 1), groups, engine="direct")
    plan, _ = _plan(16, 64, 8, seed=1)
    with pytest.raises(ValueError, match="engine='direct' runs convolutions"):
        integer_linear(torch.zeros(2, 64, dtype=torch.uint8), plan, engine="direct")
    if DIRECT:
        plan, _ = _plan(16, 9, 8, seed=1, taps=9)
        with pytest.raises(RuntimeError, match=r"padded input \(2 x 2\) is smaller than the dilated kernel"):
            integer_conv2d(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), plan, (3, 3), (1, 1), (0, 0), (1, 1), 1)


def test_int_mm_convolution_of_an_input_smaller_than_the_kernel_is_a_clear_error():
    plan, _ = _plan(4, 9, 8, seed=1, taps=9)
    x = torch.zeros(130, 1, 2, 2, dtype=torch.uint8)  # 2 x 2 under a 3 x 3 kernel: no output position
    with pytest.raises(RuntimeError, match=r"padded input \(2 x 2\) is smaller than the dilated kernel"):
        integer_conv2d(x, plan, (3, 3), (1, 1), (0, 0), (1, 1), 1, engine="int_mm")


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("x_signed,minus_128", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("width", ["K + 5", "K16", "64"])  # rows of odd width, as torch._int_mm's, as gradq's
def test_im2col_native_equals_reference(case, x_signed, minus_128, width):
    n, cin, h, w, _, kernel, stride, padding, dilation, groups = case
    x = _inputs((n, cin, h, w), x_signed, seed=w)
    if x_signed:  # any strides: a channels-last input gives the same rows
        x = x.contiguous(memory_format=torch.channels_last)
    k = cin // groups * kernel[0] * kernel[1]
    width = {"K + 5": k + 5, "K16": -(-k // 16) * 16, "64": -(-k // 64) * 64}[width]
    args = ([*kernel], [*stride], [*padding], [*dilation], groups, width, -3, minus_128)
    native = integer_kernels._kernels(x, "auto")[0].im2col_codes(x, *args)
    assert torch.equal(native, _integer_reference.im2col_codes(x, *args))


@pytest.mark.parametrize("signed", [False, True])
def test_dequantize_codes_equals_the_float64_product_rounded_once(signed, monkeypatch):
    codes = _inputs((5, 3, 7, 9), signed, seed=4)  # every code at least once
    scale, zp = 0.0123456789, (-7 if signed else 131)
    exact = (codes.double() - zp) * torch.tensor(scale, dtype=torch.float32).double()
    expected = exact.to(torch.float32)  # (q - z) is exact in fp32, so the product is rounded once
    for choice in ("native", "reference"):
        monkeypatch.setenv("GRADQ_KERNELS", choice)
        for x in (codes, codes.contiguous(memory_format=torch.channels_last)):
            out = integer_kernels.dequantize_codes(x, scale, zp)
            assert out.dtype == torch.float32 and torch.equal(out, expected), (choice, x.stride())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("kernel,stride,padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)),
                                                   ((3, 2), (1, 2), (1, 0)), ((2, 3), (3, 1), (0, 1))])
@pytest.mark.parametrize("channels", [3, 16, 64, 70])  # the native kernel takes 64 channels at a time
def test_max_pool_of_codes_equals_torch(dtype, kernel, stride, padding, channels, monkeypatch):
    x = _inputs((2, channels, 9, 8), dtype == torch.int8, seed=4)
    expected = torch.nn.functional.max_pool2d(x.double(), kernel, stride, padding).to(dtype)
    for choice in ("native", "reference"):
        monkeypatch.setenv("GRADQ_KERNELS", choice)
        for layout in (torch.contiguous_format, torch.channels_last):
            out = max_pool2d_codes(x.contiguous(memory_format=layout), kernel, stride, padding)
            assert torch.equal(out, expected), (choice, layout)


@pytest.mark.parametrize("isa", AVAILABLE)
def test_wrapping_products_stay_exact(isa, monkeypatch):
    # Within the layer's bound (K * 128 * 100 < 2**31 with zx = 128) the kernels' uint8 products
    # sum_k 255 * 100 pass 2**31 and wrap; the offset brings acc = 127 * 100 * K back exactly.
    k, c = 100_000, 3
    q = torch.full((c, k), 100)
    zero = torch.zeros(c, dtype=torch.bool)
    mult, shift = quantize_multiplier(torch.full((c,), 1e-7, dtype=torch.float64))
    bq = torch.tensor([0, 5, -5])
    plan = plan_integer_gemm(q, None, zero, 8, False, 0, bq, mult, shift, 128, 0, -128, 127, False, True)
    x = torch.full((2, k), 255, dtype=torch.uint8)
    assert 255 * 100 * k > 2**31 > k * 128 * 100
    acc = torch.full((2, c), 127 * 100 * k) + bq
    expected = _oracle_requantize(acc, mult.tolist(), shift.tolist(), 0, -128, 127, -1)
    monkeypatch.setenv("GRADQ_KERNELS", "native")
    assert torch.equal(integer_linear(x, plan, isa=isa, engine="gradq").long(), expected)
    assert expected.tolist()[0] == [127, 127, 127]  # 1.27e9 * 1e-7 = 127


def test_threads_do_not_change_results():
    plan, _ = _plan(70, 300, 4, seed=3)
    x = _inputs((150, 300), False, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = integer_linear(x, plan)
        torch.set_num_threads(2)
        assert torch.equal(integer_linear(x, plan), one)
    finally:
        torch.set_num_threads(threads)


def _requant_case(acc, mult, shift, zo=0, lo=-128, hi=127):
    acc = torch.tensor(acc, dtype=torch.int32).view(-1, 1)
    m = torch.tensor([mult], dtype=torch.int32)
    n = torch.tensor([shift], dtype=torch.int8)
    zero = torch.zeros(1, dtype=torch.int64)
    native = integer_kernels._kernels(acc, "auto")[0].requantize_int32(acc, zero, m, n, zo, lo, hi, True)
    ref = _integer_reference.requantize_int32(acc, zero, m, n, zo, lo, hi, True)
    expected = _oracle_requantize(acc.long(), [mult], [shift], zo, lo, hi, -1)
    assert torch.equal(native.long(), expected) and torch.equal(ref.long(), expected)
    return native.view(-1).tolist()


@pytest.mark.parametrize("out_signed", [False, True])
def test_requantization_of_many_channels_equals_the_oracle(out_signed):
    # 37 channels: the native epilogue's even and odd lanes and a short last vector, with per-channel
    # multipliers and shifts at their extremes among random ones
    gen = torch.Generator().manual_seed(12)
    rows, c = 5, 37
    acc = torch.randint(-(2**30), 2**30, (rows, c), generator=gen, dtype=torch.int32)
    offset = torch.randint(-(2**29), 2**29, (c,), generator=gen)
    mult = torch.randint(0, 2**31 - 1, (c,), generator=gen, dtype=torch.int32)
    shift = torch.randint(1, 63, (c,), generator=gen).to(torch.int8)
    mult[:4] = torch.tensor([2**31 - 1, 0, 2**30, 1], dtype=torch.int32)
    shift[4:8] = torch.tensor([1, 31, 62, 2], dtype=torch.int8)
    zo, lo, hi = (-3, -128, 127) if out_signed else (7, 0, 255)
    native = integer_kernels._kernels(acc, "auto")[0].requantize_int32(acc, offset, mult, shift, zo, lo, hi, out_signed)
    expected = _oracle_requantize(acc.long() + offset, mult.tolist(), shift.tolist(), zo, lo, hi, 1)
    assert native.dtype == (torch.int8 if out_signed else torch.uint8)
    assert torch.equal(native.long(), expected)
    assert 0 < int((expected == lo).sum()) and 0 < int((expected == hi).sum())  # both saturations occur


def test_requantization_edge_cases():
    # ties at m = 1/2 round toward plus infinity
    assert _requant_case([1, -1, 3, -3, 5, -5], 2**30, 31) == [1, 0, 2, -1, 3, -2]
    # saturation at both ends, with a zero point
    assert _requant_case([2**31 - 1, -(2**31), 300, -300], 2**30, 1, zo=3) == [127, -128, 127, -128]
    # the largest multiplier M = 2**31 - 1 at shift 31 (m just below 1) and a tiny one at shift 62
    assert _requant_case([100, -100, 127, -128], 2**31 - 1, 31) == [100, -100, 127, -128]
    assert _requant_case([2**31 - 1, -(2**31)], 2**30, 62) == [0, 0]
    # M = 0 (a multiplier below 2**-31) gives 0 + zo
    assert _requant_case([123456, -7], 0, 1, zo=-4) == [-4, -4]


def test_bad_arguments_are_named():
    plan, _ = _plan(4, 64, 4, seed=1)
    with pytest.raises(TypeError, match="codes must have dtype torch.uint8"):
        integer_linear(torch.zeros(2, 64, dtype=torch.int8), plan)
    with pytest.raises(ValueError, match="planned for 64"):
        integer_linear(torch.zeros(2, 65, dtype=torch.uint8), plan)
    with pytest.raises(ValueError, match="isa must be one of"):
        integer_linear(torch.zeros(2, 64, dtype=torch.uint8), plan, isa="sse9")
    with pytest.raises(ValueError, match="engine must be one of"):
        integer_linear(torch.zeros(2, 64, dtype=torch.uint8), plan, engine="blas")
    grouped, _ = _plan(4, 128, 4, group=64, seed=1)
    with pytest.raises(ValueError, match="needs per-channel weights"):
        integer_linear(torch.zeros(2, 128, dtype=torch.uint8), grouped, engine="int_mm")
    with pytest.raises(ValueError, match="must be contiguous"):
        integer_linear(torch.zeros(64, 2, dtype=torch.uint8).T, plan)


@pytest.mark.parametrize("signed", [False, True])
def test_quantize_codes_equals_gradq_quantize(signed, monkeypatch):
    import gradq

    gen = torch.Generator().manual_seed(6)
    scale, zp = 0.037, (0 if signed else 97)
    x = torch.randn(3, 7, 11, generator=gen) * 3
    x.view(-1)[:50] = (torch.arange(50) - 25 + 0.5) * scale  # ties, rounded to even
    scheme = gradq.QuantScheme.uniform(8, signed=signed, symmetric=signed)
    zero_point = None if signed else torch.tensor(zp)
    expected = gradq.quantize(x, scheme, scale=torch.tensor(scale), zero_point=zero_point).codes
    qmin, qmax = scheme.qmin, scheme.qmax
    for choice in ("native", "reference"):
        monkeypatch.setenv("GRADQ_KERNELS", choice)
        codes = integer_kernels.quantize_codes(x, scale, zp, qmin, qmax, signed)
        assert codes.dtype == (torch.int8 if signed else torch.uint8)
        assert torch.equal(codes.long(), expected.long()), choice
        assert int(codes.long().min()) == qmin and int(codes.long().max()) == qmax  # saturates at both ends
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = x.clone()
            bad[2, 6, 10] = value  # the last value: in the vector kernel's masked tail
            with pytest.raises(ValueError, match="NaN or Inf"):
                integer_kernels.quantize_codes(bad, scale, zp, qmin, qmax, signed)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("kernel,stride,padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)),
                                                   ((3, 2), (1, 2), (1, 0)), ((9, 8), (9, 8), (0, 0))])
@pytest.mark.parametrize("channels", [3, 16, 37])  # the native kernel takes 16 channels at a time
def test_avg_pool_of_codes_native_equals_reference(dtype, kernel, stride, padding, channels, monkeypatch):
    x = _inputs((2, channels, 9, 8), dtype == torch.int8, seed=8)
    zp = -3 if dtype == torch.int8 else 100
    expected = _integer_reference.avg_pool2d_codes(x.long(), [*kernel], [*stride], [*padding], zp)
    for choice in ("native", "reference"):
        monkeypatch.setenv("GRADQ_KERNELS", choice)
        for layout in (torch.contiguous_format, torch.channels_last):
            out = integer_kernels.avg_pool2d_codes(x.contiguous(memory_format=layout), kernel, stride, padding, zp)
            assert out.dtype == dtype and torch.equal(out.long(), expected), (choice, layout)


def test_native_avg_pool_rejects_windows_whose_sums_overflow(monkeypatch):
    monkeypatch.setenv("GRADQ_KERNELS", "native")
    x = torch.full((1, 1, 2049, 2049), 255, dtype=torch.uint8)  # 2049^2 > 2^22 codes in one window
    with pytest.raises(RuntimeError, match="overflow the int32 sums; at most 2\\^22"):
        integer_kernels.avg_pool2d_codes(x, [2049, 2049], [1, 1], [0, 0], 0)
