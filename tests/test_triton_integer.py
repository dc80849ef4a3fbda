"""The Triton kernels of the integer model (gradq/_triton_integer.py): the integer GEMM with packed weights
and its fused epilogue, bit for bit against the reference (itself checked against an independent oracle in
tests/test_integer_kernels.py); the epilogue after ``torch._int_mm``; whole converted models equal to the
native kernels; the weight-only (W4A16) Linear within its derived fp32 error bound.

Without a GPU (CI) they run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA the same tests run the compiled kernels (benchmarks/gpu.py).
"""

import pytest
import torch
from torch import nn

from benchmarks.quant_data import load_lenet5, load_mnist5k, mnist5k_split
from gradq import _integer_reference, _triton_integer
from gradq.fixedpoint import quantize_multiplier
from gradq.integer_kernels import (
    integer_conv2d,
    integer_linear,
    plan_integer_gemm,
    plan_weight_only,
    weight_only_linear,
)
from gradq.modelquant import IntegerLayer, QuantConfig, WeightOnlyLayer
from tests.test_convert import CONFIGS, _converted
from tests.test_integer_kernels import CASES, CONV_CASES, _inputs, _oracle_requantize, _plan
from tests.test_modelquant import Net, _data

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's int32 wrap in the interpreter


def on(device: str, plan):
    """The plan with its tensors moved to ``device``."""
    moved = {f: (v.to(device) if isinstance(v, torch.Tensor) else v) for f, v in vars(plan).items()
             if f != "_cache"}
    return type(plan)(**moved)


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls of gradq._triton_integer's entry points, by name (which kernels really ran)."""
    calls = {}

    def spy(name, real):
        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        return counted

    for name in ("integer_linear", "integer_conv2d", "requantize_int32", "weight_only_linear"):
        monkeypatch.setattr(_triton_integer, name, spy(name, getattr(_triton_integer, name)))
    return calls


def reference_and_triton(monkeypatch, fn):
    """``fn(device)`` with the reference kernels on the CPU, then with the Triton kernels on DEVICE."""
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    expected = fn("cpu")
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    return expected, fn(DEVICE)


@pytest.mark.parametrize("rows,c,k,bits,group", CASES)
@pytest.mark.parametrize("x_signed,out_signed,relu", [(False, False, True), (True, True, False), (False, True, False)])
def test_linear_equals_reference(rows, c, k, bits, group, x_signed, out_signed, relu, monkeypatch):
    plan, _ = _plan(c, k, bits, group=group, x_signed=x_signed, out_signed=out_signed, relu=relu, seed=rows * 31 + k)
    x = _inputs((rows, k), x_signed, seed=k)
    expected, got = reference_and_triton(monkeypatch, lambda d: integer_linear(x.to(d), on(d, plan), engine="gradq"))
    assert got.dtype == expected.dtype and torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (2, 0), (1, 0), (4, 3)])
@pytest.mark.parametrize("x_signed", [False, True])
def test_conv2d_equals_reference(case, bits, group, x_signed, monkeypatch):
    n, cin, h, w, cout, kernel, stride, padding, dilation, groups = case
    k = cin // groups * kernel[0] * kernel[1]
    plan, _ = _plan(cout, k, bits, group=group if k % max(group, 1) == 0 else 0, x_signed=x_signed,
                    out_signed=x_signed, seed=k + n, taps=kernel[0] * kernel[1])
    x = _inputs((n, cin, h, w), x_signed, seed=h * w)
    if x_signed:
        x = x.contiguous(memory_format=torch.channels_last)  # any memory format

    def run(d):
        return integer_conv2d(x.to(d), on(d, plan), kernel, stride, padding, dilation, groups, engine="gradq")

    expected, got = reference_and_triton(monkeypatch, run)
    assert torch.equal(got.cpu(), expected)
    assert got.permute(0, 2, 3, 1).is_contiguous()  # channels last, as the native kernel


@pytest.mark.parametrize("rows", [17, 130])
@pytest.mark.parametrize("x_signed", [False, True])
@pytest.mark.parametrize("bits", [8, 4, 1])
def test_int_mm_engine_with_the_triton_epilogue(rows, x_signed, bits, monkeypatch, triton_calls):
    plan, _ = _plan(8, 100, bits, x_signed=x_signed, out_signed=not x_signed, seed=rows)
    x = _inputs((rows, 100), x_signed, seed=rows)
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    expected = integer_linear(x, plan, engine="gradq")
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    got = integer_linear(x.to(DEVICE), on(DEVICE, plan), engine="int_mm")
    assert torch.equal(got.cpu(), expected)
    auto = integer_linear(x.to(DEVICE), on(DEVICE, plan), engine="auto")
    assert torch.equal(auto.cpu(), expected)
    auto_kernel = "requantize_int32" if rows >= 128 else "integer_linear"  # int_mm from 128 rows
    assert triton_calls == ({"requantize_int32": 2} if rows >= 128 else {"requantize_int32": 1, auto_kernel: 1})


def test_conv_int_mm_engine_with_the_triton_epilogue(monkeypatch, triton_calls):
    n, cin, h, w, cout, kernel, stride, padding, dilation, _ = CONV_CASES[0]
    k = cin * kernel[0] * kernel[1]
    plan, _ = _plan(8, k, 4, seed=k, taps=kernel[0] * kernel[1])
    x = _inputs((n, cin, h, w), False, seed=h)
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    expected = integer_conv2d(x, plan, kernel, stride, padding, dilation, 1, engine="gradq")
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    got = integer_conv2d(x.to(DEVICE), on(DEVICE, plan), kernel, stride, padding, dilation, 1, engine="int_mm")
    assert torch.equal(got.cpu(), expected)
    assert triton_calls == {"requantize_int32": 1}


@pytest.mark.parametrize("acc,mult,shift,zo,expected", [
    ([1, -1, 3, -3, 5, -5], 2**30, 31, 0, [1, 0, 2, -1, 3, -2]),  # ties at m = 1/2 round toward +infinity
    ([2**31 - 1, -(2**31), 300, -300], 2**30, 1, 3, [127, -128, 127, -128]),  # saturation at both ends
    ([100, -100, 127, -128], 2**31 - 1, 31, 0, [100, -100, 127, -128]),  # the largest multiplier
    ([2**31 - 1, -(2**31)], 2**30, 62, 0, [0, 0]),  # the largest shift
    ([123456, -7], 0, 1, -4, [-4, -4]),  # M = 0
])
def test_requantization_edge_cases(acc, mult, shift, zo, expected):
    acc = torch.tensor(acc, dtype=torch.int32).view(-1, 1)
    args = (torch.zeros(1, dtype=torch.int64), torch.tensor([mult], dtype=torch.int32),
            torch.tensor([shift], dtype=torch.int8), zo, -128, 127, True)
    got = _triton_integer.requantize_int32(acc.to(DEVICE), *(a.to(DEVICE) for a in args[:3]), *args[3:])
    assert torch.equal(got.cpu(), _integer_reference.requantize_int32(acc, *args))
    assert got.view(-1).tolist() == expected
    assert expected == _oracle_requantize(acc.long(), [mult], [shift], zo, -128, 127, -1).view(-1).tolist()


def test_wrapping_products_stay_exact(monkeypatch):
    # Within the layer's bound (K * 128 * 127 < 2**31 with zx = 128) the signed-byte products
    # sum_k 127 * 127 (uint8 codes minus 128) stay exact, but the int8 offset and the int32 sums wrap:
    # 255 * 127 * K > 2**31. The result is the exact acc = 127 * 127 * K (+ bias).
    k, c = 70_000, 3
    assert 255 * 127 * k > 2**31 > k * 128 * 127
    mult, shift = quantize_multiplier(torch.full((c,), 1e-7, dtype=torch.float64))
    bq = torch.tensor([0, 5, -5])
    plan = plan_integer_gemm(torch.full((c, k), 127), None, torch.zeros(c, dtype=torch.bool), 8, False, 0, bq, mult,
                             shift, 128, 0, -128, 127, False, True)
    x = torch.full((2, k), 255, dtype=torch.uint8)
    expected = _oracle_requantize(torch.full((2, c), 127 * 127 * k) + bq, mult.tolist(), shift.tolist(), 0, -128, 127,
                                  -1)
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    assert torch.equal(integer_linear(x.to(DEVICE), on(DEVICE, plan)).cpu().long(), expected)
    assert expected.tolist()[0] == [113, 113, 113]  # 1.129e9 * 1e-7 = 112.9


def test_int16_weights_at_their_extremes(monkeypatch):
    # groups of 8 codes run from int16 Wi = q * r, split in the kernel into two int8 halves
    c, k = 4, 64
    q = torch.tensor([-128, 127, -1, 0]).repeat_interleave(k // 4).repeat(c, 1)
    r = torch.full((c, k // 8), 255)
    r[1] = 1
    zero = torch.zeros(c, dtype=torch.bool)
    mult, shift = quantize_multiplier(torch.full((c,), 3e-7, dtype=torch.float64))
    plan = plan_integer_gemm(q, r, zero, 8, False, 8, torch.zeros(c), mult, shift, 0, 0, -128, 127, True, True)
    assert plan.wide.numel() and int(plan.wide.min()) == -32640 and int(plan.wide.max()) == 32385
    x = torch.randint(-128, 128, (19, k), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    expected, got = reference_and_triton(monkeypatch, lambda d: integer_linear(x.to(d), on(d, plan)))
    assert torch.equal(got.cpu(), expected)
    assert len(set(expected.view(-1).tolist())) > 10  # not saturated: the products were exercised


def test_codes_on_another_device_than_the_plan():
    plan, _ = _plan(4, 64, 4, seed=1)
    with pytest.raises(ValueError, match="planned on cpu"):
        integer_linear(torch.zeros(2, 64, dtype=torch.uint8, device="meta"), plan)


@pytest.mark.parametrize("name", ["w8a8", "w4a8", "w4a4-mse", "w2a8-g8", "w1a8", "mixed"])
def test_converted_model_on_triton_equals_native(name, monkeypatch, triton_calls):
    torch.manual_seed(0)
    prepared, converted = _converted(Net().eval(), CONFIGS[name], _data())
    batch = _data(1, seed=7)[0]
    expected = converted(batch)
    assert torch.equal(expected, prepared(batch))
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    converted.to(DEVICE)
    assert all(m._gemm is None for m in converted.modules() if isinstance(m, IntegerLayer))  # planned again
    assert torch.equal(converted(batch.to(DEVICE)).cpu(), expected)
    assert sum(triton_calls.values()) == 4  # Net's 4 layers: the Triton GEMM or torch._int_mm + Triton epilogue


@pytest.mark.parametrize("preset,group", [("w8a8", None), ("w4a8", None), ("w2a8", 8)])
def test_lenet5_on_triton_equals_native_on_real_digits(preset, group, monkeypatch, triton_calls):
    x, y = load_mnist5k()
    cal, ev = mnist5k_split(y)
    prepared, converted = _converted(load_lenet5(), QuantConfig.preset(preset, group_size=group),
                                     [x[cal][:250], x[cal][250:]])
    sample = x[ev][::100]  # 50 digits, every class
    expected = converted(sample)
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    converted.to(DEVICE)
    assert torch.equal(converted(sample.to(DEVICE)).cpu(), expected)
    assert sum(triton_calls.values()) == 4  # LeNet-5's 2 convolutions and 2 Linear layers


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _weight_only_case(bits: int, group: int, seed: int, c: int = 9, k: int = 136):
    gen = torch.Generator().manual_seed(seed)
    sign = bits == 1
    q = _plan(c, k, bits, seed=seed)[1][0]
    r = torch.randint(1, 256, (c, k // group), generator=gen) if group else None
    zero = torch.rand(c, generator=gen) < 0.2
    scale = torch.rand(c, generator=gen) * 0.01
    wi = q if r is None else q * r.repeat_interleave(group, 1)
    return (q, r, zero, bits, sign, group, scale), torch.where(zero[:, None], 0, wi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, 0), (4, 8), (8, 0), (2, 0), (1, 0), (4, 68)])
@pytest.mark.parametrize("rows,with_bias", [(1, True), (21, False)])
def test_weight_only_linear_within_its_error_bound(dtype, bits, group, rows, with_bias, monkeypatch):
    """|y - y64| <= g + u (|y64| + g), g = (K + 3) 2**-24 (sum_k |x Wi| sw + |bias|): fp32 sums of exact
    products, the sub-scale, scale and bias steps, then one rounding to x's dtype (unit roundoff u)."""
    (q, r, zero, bits, sign, group, scale), wi = _weight_only_case(bits, group, seed=bits * 7 + group + rows)
    k = q.shape[1]
    bias = torch.randn(q.shape[0], generator=torch.Generator().manual_seed(rows)) if with_bias else None
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    plan = plan_weight_only(q, r, zero, bits, sign, group, scale, bias)
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    y = weight_only_linear(x.to(DEVICE), on(DEVICE, plan)).cpu()
    assert y.dtype == dtype and y.shape == (rows, q.shape[0])
    w64 = wi.double() * scale.double()[:, None]
    b64 = torch.zeros(q.shape[0], dtype=torch.float64) if bias is None else bias.double()
    exact = x.double() @ w64.T + b64
    g = (k + 3) * 2.0**-24 * (x.double().abs() @ w64.abs().T + b64.abs())
    bound = g + UNIT_ROUNDOFF[dtype] * (exact.abs() + g)
    assert ((y.double() - exact).abs() <= bound).all()
    assert (y.double() - exact).abs().max() > 0 or dtype == torch.float32  # the bound is not vacuous


def test_weight_only_linear_errors(monkeypatch):
    (q, r, zero, bits, sign, group, scale), _ = _weight_only_case(4, 0, seed=1)
    plan = plan_weight_only(q, r, zero, bits, sign, group, scale, None)
    x = torch.randn(2, q.shape[1])
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    with pytest.raises(ValueError, match="runs the Triton kernel"):
        weight_only_linear(x, plan)
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    with pytest.raises(TypeError, match="x must have dtype"):
        weight_only_linear(x.double(), plan)
    with pytest.raises(ValueError, match="planned for 136"):
        weight_only_linear(torch.randn(2, 135), plan)
    with pytest.raises(ValueError, match="layer's weights are on cpu"):
        weight_only_linear(torch.randn(2, 136, device="meta"), plan)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(96, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("preset,group", [("w4", None), ("w4", 32), ("w8", None), ("w8", 16)])
def test_weight_only_model_on_triton_agrees_with_eager(preset, group, monkeypatch, triton_calls):
    """Eager (F.linear with fp32 weights) and Triton compute the same exact sums in fp32: each hidden value
    within e1 = (K1 + 4) u S1 of the exact one (S1 = sum_k |x w1| + |b1|; the +1 is eager's weight
    rounding), each output within e2 = sum_j e1 |w2| + (K2 + 4) u ((|h| + e1) . |w2| + |b2|); so they
    differ by at most 2 e2."""
    torch.manual_seed(4)
    model = Mlp()
    _, converted = _converted(model, QuantConfig.preset(preset, group_size=group), [])
    x = torch.randn(5, 96)
    eager = converted(x)
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    converted.to(DEVICE)
    layers = [m for m in converted.modules() if isinstance(m, WeightOnlyLayer)]
    assert len(layers) == 2 and all(m._gemm is None for m in layers)  # planned again on the new device
    got = converted(x.to(DEVICE)).cpu()
    assert triton_calls == {"weight_only_linear": 2}
    u = 2.0**-24
    w1, w2 = (m.integer_weights().cpu().double() * m.weight_scale.cpu().double()[:, None] for m in layers)
    b1, b2 = model.fc1.bias.detach().double(), model.fc2.bias.detach().double()
    h = torch.relu(x.double() @ w1.T + b1)
    e1 = (96 + 4) * u * (x.double().abs() @ w1.abs().T + b1.abs())
    e2 = e1 @ w2.abs().T + (64 + 4) * u * ((h + e1) @ w2.abs().T + b2.abs())
    assert ((got.double() - eager.double()).abs() <= 2 * e2).all()
