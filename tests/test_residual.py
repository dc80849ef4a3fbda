"""The residual add and average pooling on codes (docs/integer.md section 5): the arithmetic against
oracles, a residual block whose converted model is integer end to end and equals the prepared model's
eval() bit for bit on real MNIST digits, QAT through them, save/load and onnxruntime."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradq
import gradq.integer_kernels
from benchmarks.quant_data import ResidualNet, load_mnist5k, mnist5k_split
from gradq.modelquant import (
    Dequantize,
    IntegerAdd,
    IntegerAvgPool,
    IntegerLayer,
    QuantAdd,
    QuantAvgPool,
    QuantConfig,
    QuantizeInput,
)
from gradq.modelquant.integer_ops import add_multipliers, integer_add, integer_avg_pool


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = ResidualNet(channels=8)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding matters
        for bn in (model.bn0, model.b1, model.b2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    images, labels = load_mnist5k()
    calibration, test = mnist5k_split(labels)
    return [images[calibration][i : i + 100] for i in range(0, 500, 100)], images[test][:300]


# --- arithmetic --------------------------------------------------------------------------------------


def test_add_multipliers_share_one_shift():
    for sa, sb, so in [(0.02, 0.05, 0.07), (0.3, 0.001, 0.1), (1e-3, 1e-3, 1e-3), (0.5, 0.25, 2.0)]:
        ma, mb, n = add_multipliers(*(torch.tensor(v) for v in (sa, sb, so)))
        real_a = float(torch.tensor(sa)) / float(torch.tensor(so))
        real_b = float(torch.tensor(sb)) / float(torch.tensor(so))
        assert 2**30 <= max(ma, mb) < 2**31
        assert abs(ma - math.ldexp(real_a, n)) <= 0.5 and abs(mb - math.ldexp(real_b, n)) <= 0.5
    with pytest.raises(ValueError, match="2\\*\\*30"):
        add_multipliers(torch.tensor(2.0**31), torch.tensor(1.0), torch.tensor(1.0))


def test_integer_add_against_python_integers_and_real_sum():
    gen = torch.Generator().manual_seed(5)
    sa, sb, so = torch.tensor(0.031), torch.tensor(0.017), torch.tensor(0.045)
    ma, mb, n = add_multipliers(sa, sb, so)
    p = {"za": 7, "zb": 130, "Ma": ma, "Mb": mb, "n": n, "zo": 11, "lo": 11, "hi": 255}
    qa = torch.randint(0, 256, (4000,), generator=gen)
    qb = torch.randint(0, 256, (4000,), generator=gen)
    out = integer_add(qa, qb, p)
    oracle = [min(max((((a - 7) * ma + (b - 130) * mb + (1 << (n - 1))) >> n) + 11, 11), 255)
              for a, b in zip(qa.tolist(), qb.tolist(), strict=True)]
    assert out.tolist() == oracle
    # against the exactly rounded real sum: the multipliers are within 2**-(n+1) of the real ones, so the
    # result can differ from it by one step only where the real value lies within ~512 * 2**-31 of a tie
    fa, fb = Fraction(float(sa)) / Fraction(float(so)), Fraction(float(sb)) / Fraction(float(so))
    exact = [min(max(math.floor(fa * (a - 7) + fb * (b - 130) + Fraction(1, 2)) + 11, 11), 255)
             for a, b in zip(qa.tolist(), qb.tolist(), strict=True)]
    diff = (out - torch.tensor(exact)).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) >= 0.999


@pytest.mark.parametrize("kernel,stride,padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 1), (1, 1)),
                                                   ((3, 2), (1, 2), (1, 0)), (None, (), ())])
def test_integer_avg_pool_rounds_the_mean_code_ties_to_even(kernel, stride, padding):
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 128, (2, 3, 7, 6), generator=gen)
    z = 5
    out = integer_avg_pool(q, z, kernel, stride, padding)
    k = kernel or (7, 6)
    means = F.avg_pool2d((q - z).double(), k, stride or k, padding or 0, count_include_pad=True)
    assert torch.equal(out, torch.round(means + z).long())  # the mean code, ties to the even code (exact here)
    if kernel is not None:  # ties occur with even windows (and are exact in float64)
        assert bool(((means * 2) % 2 == 1).any()) == (math.prod(k) % 2 == 0)
    # 1-D pooling is the 2-D one of height 1
    one = integer_avg_pool(q[:, :, 0], z, None if kernel is None else (3,), (2,), (1,))
    two = integer_avg_pool(q[:, :, :1], z, None if kernel is None else (1, 3), (1, 2), (0, 1))
    assert torch.equal(one, two.squeeze(2))


# --- the residual block ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,group", [("w8a8", None), ("w4a8", None), ("w2a8", None), ("w4a8", 8)])
def test_residual_block_is_integer_end_to_end_and_bit_exact(preset, group, digits):
    calibration, test = digits
    prepared = gradq.prepare(_model(), QuantConfig.preset(preset, group_size=group))
    adds = [m for m in prepared.modules() if isinstance(m, QuantAdd)]
    pools = [m for m in prepared.modules() if isinstance(m, QuantAvgPool)]
    assert len(adds) == 1 and adds[0].relu and len(pools) == 2 and all(p.grid is not None for p in pools)
    gradq.calibrate(prepared, calibration, progress=False)
    prepared.eval()
    converted = gradq.convert(prepared)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(IntegerAdd) == 1 and kinds.count(IntegerAvgPool) == 2 and kinds.count(IntegerLayer) == 4
    assert kinds.count(QuantizeInput) == 1 and kinds.count(Dequantize) == 1  # only at the input and the output
    for batch in test.split(100):
        assert torch.equal(converted(batch), prepared(batch))
    report = str(gradq.quant_report(prepared))
    assert "integer add+ReLU" in report and report.count("integer average pool") == 2


def test_float_operation_is_reported_and_bracketed(digits):
    class WithSigmoid(ResidualNet):
        def forward(self, x):
            x = F.relu(self.bn0(self.stem(x)))
            return self.fc(self.gap(torch.sigmoid(self.c1(x))).flatten(1))

    torch.manual_seed(0)
    prepared = gradq.prepare(WithSigmoid(channels=8).eval(), "w8a8")
    gradq.calibrate(prepared, digits[0], progress=False)
    rows = {r.name: r for r in gradq.quant_report(prepared).rows}
    assert rows["sigmoid"].became == "float" and "between a dequantize and a quantize" in rows["sigmoid"].note
    converted = gradq.convert(prepared.eval())
    assert sum(isinstance(m, Dequantize) for m in converted.modules()) == 2  # before sigmoid, at the output
    assert torch.equal(converted(digits[1][:50]), prepared(digits[1][:50]))


def test_qat_trains_through_add_and_pools_with_eval_values(digits):
    calibration, test = digits
    prepared = gradq.prepare(_model(), QuantConfig.preset("w4a8", learn="lsq"))
    gradq.calibrate(prepared, calibration, progress=False)
    prepared.train()
    pool = next(m for m in prepared.modules() if isinstance(m, QuantAvgPool) and m.spec.kernel is not None)
    seen = {}
    pool.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0].detach(), y=out.detach()))
    loss = prepared(test[:32]).square().mean()
    loss.backward()
    assert float(prepared.stem.weight.grad.abs().sum()) > 0 and float(prepared.c2.weight.grad.abs().sum()) > 0
    pool.eval()
    assert torch.equal(pool(seen["x"]), seen["y"])  # training used the integer pooling's values


def test_residual_save_load_and_onnxruntime(tmp_path, digits):
    calibration, test = digits
    prepared = gradq.prepare(_model(), "w8a8")
    gradq.calibrate(prepared, calibration, progress=False)
    converted = gradq.convert(prepared.eval())
    path = tmp_path / "residual.safetensors"
    gradq.save_quantized(converted, path)
    loaded = gradq.load_quantized(path, _model())
    x = test[:200]
    expected = converted(x)
    assert torch.equal(loaded(x), expected)
    import onnxruntime as ort

    onnx_path = tmp_path / "residual.onnx"
    gradq.export_onnx(converted, x[:1], onnx_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    step = float(converted.get_submodule(_output_dequantize(converted)).scale)
    steps = ((got - expected).abs() / step).round()
    # onnxruntime requantizes the layers and the add in float (ties to even), so a code inside may differ
    # by one step where the real value lies within float rounding of a tie; the poolings run on the code
    # values, exactly as gradq's (measured on this block: every output equal)
    assert float(steps.max()) <= 1 and float((steps == 0).float().mean()) >= 0.99


def _output_dequantize(model: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if isinstance(m, Dequantize))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("a_dtype,b_dtype,out_signed", [
    (torch.uint8, torch.uint8, False), (torch.int8, torch.uint8, True), (torch.uint8, torch.int8, True),
    (torch.int8, torch.int8, False)])  # the native kernel: 8 codes per step and a scalar tail (630 = 78 x 8 + 6)
def test_add_kernel_equals_the_arithmetic(layout, a_dtype, b_dtype, out_signed, monkeypatch):
    gen = torch.Generator().manual_seed(9)

    def codes(dtype):
        lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
        return torch.randint(lo, hi, (3, 5, 7, 6), generator=gen).to(dtype).contiguous(memory_format=layout)

    a, b = codes(a_dtype), codes(b_dtype)
    ma, mb, n = add_multipliers(torch.tensor(0.02), torch.tensor(0.05), torch.tensor(0.06))
    lo, hi = (-128, 127) if out_signed else (0, 255)
    p = {"za": 3, "zb": -2 if b_dtype == torch.int8 else 120, "Ma": ma, "Mb": mb, "n": n, "zo": 1, "lo": lo, "hi": hi}
    expected = integer_add(a, b, p)
    args = (p["za"], p["zb"], ma, mb, n, p["zo"], lo, hi, out_signed)
    for choice in ("native", "reference"):
        monkeypatch.setenv("GRADQ_KERNELS", choice)
        out = gradq.integer_kernels.add_codes(a, b, *args)
        assert out.dtype == (torch.int8 if out_signed else torch.uint8)
        assert torch.equal(out.long(), expected), choice
    broadcast = gradq.integer_kernels.add_codes(a, b[:1], *args)  # shapes differ: the reference broadcasts
    assert torch.equal(broadcast.long(), integer_add(a, b[:1], p))
