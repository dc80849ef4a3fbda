"""prepare / calibrate / QAT / report: structure, learned step sizes, STE masks and clear errors."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import gradq
from gradq.modelquant import ActQuant, QuantConfig, QuantLayer, activation_scheme, learned_fake_quantize, weight_scheme
from gradq.modelquant.calibrate import _phase as float_phase
from gradq.scheme import QuantScheme


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def _data(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 1, 16, 16, generator=gen) for _ in range(n)]


def test_prepare_fuses_and_shares_quantizers():
    torch.manual_seed(0)
    model = Net().eval()
    model.bn1.running_mean.uniform_(-0.2, 0.2)
    model.bn1.running_var.uniform_(0.5, 1.5)
    prepared = gradq.prepare(model, "w8a8")
    assert isinstance(prepared, fx.GraphModule)
    layers = {m.name: m for m in prepared.modules() if isinstance(m, QuantLayer)}
    assert set(layers) == {"conv1", "conv2", "fc1", "fc2"}
    assert layers["conv1"].fused == ("BatchNorm", "ReLU") and layers["conv2"].fused == ("ReLU",)
    assert layers["fc1"].fused == ("ReLU",) and layers["fc2"].fused == ()
    # one rounding between layers: conv2 reads conv1's output codes through ReLU + max pool, etc.
    assert layers["conv2"].input_quantizer is layers["conv1"].output_quant
    assert layers["fc1"].input_quantizer is layers["conv2"].output_quant
    assert layers["fc2"].input_quantizer is layers["fc1"].output_quant
    assert layers["conv1"].input_quantizer is layers["conv1"].input_quant  # the model input
    assert len([m for m in prepared.modules() if isinstance(m, ActQuant)]) == 5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    # the original is untouched, and in float the prepared model computes what it computed
    assert isinstance(model.conv1, nn.Conv2d)
    x = torch.randn(2, 1, 16, 16)
    with float_phase(prepared, "minmax"):
        assert torch.allclose(prepared(x), model(x), atol=1e-5)


def test_calibrated_w8a8_is_close_to_float_and_report_lists_everything():
    torch.manual_seed(0)
    model = Net().eval()
    prepared = gradq.calibrate(gradq.prepare(model), _data(), progress=False)
    x = _data(1, seed=5)[0]
    ref, out = model(x), prepared.eval()(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    report = gradq.quant_report(prepared)
    names = [r.name for r in report.rows]
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    conv1 = report.rows[0]
    assert conv1.became == "integer conv2d+BatchNorm+ReLU" and conv1.weight.startswith("int8 per-channel")
    assert conv1.float_bytes == 4 * (4 * 9 + 4) and conv1.quant_bytes == 4 * 9 + 4 * 4 + 4 * 4
    assert "s=" in conv1.output_range and "input shares" in report.rows[1].note
    text = str(report)
    assert "conv1" in text and "fp32" in text


def test_overrides_mixed_precision_and_float():
    torch.manual_seed(0)
    config = QuantConfig.preset("w4a8").override("conv1", QuantConfig.preset("w8a8")).override("fc2", None)
    prepared = gradq.calibrate(gradq.prepare(Net().eval(), config), _data(), progress=False)
    layers = {m.name: m for m in prepared.modules() if isinstance(m, QuantLayer)}
    assert layers["conv1"].weight_quant.scheme.bits == 8 and layers["conv2"].weight_quant.scheme.bits == 4
    assert "fc2" not in layers and isinstance(prepared.get_submodule("fc2"), nn.Linear)
    rows = {r.name: r for r in gradq.quant_report(prepared).rows}
    assert rows["fc2"].became == "float" and "override 'fc2'" in rows["fc2"].note
    with pytest.warns(UserWarning, match="'nothing.here' matches no module"):
        gradq.prepare(Net(), QuantConfig().override("nothing.here", None))


def test_presets_and_group_size():
    assert QuantConfig.preset("w1a8").weight.codebook == "sign"
    assert QuantConfig.preset("w2a8").weight_range == "mse" and QuantConfig.preset("w2a8").weight.qmax == 1
    assert QuantConfig.preset("w4").activation is None
    assert QuantConfig.preset("w4a4", group_size=32).weight.granularity.group_size == 32
    assert QuantConfig.preset("w4a4", learn="lsq").learn == "lsq"


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: QuantConfig.preset("w3a3"), ValueError, "unknown preset 'w3a3'; choose one of w8a8"),
        (lambda: QuantConfig(calibrator="median"), ValueError, "minmax"),
        (lambda: QuantConfig(weight=QuantScheme.uniform(4, signed=False)), ValueError, "signed symmetric"),
        (lambda: QuantConfig(activation=QuantScheme.uniform(8, granularity=gradq.PerAxis(0))), ValueError,
         "per-tensor"),
        (lambda: weight_scheme(9), ValueError, "bits"),
        (lambda: QuantConfig(learn="adaround"), ValueError, "learn must be"),
        (lambda: QuantConfig.preset("w1a8", learn="lsq"), ValueError, "binary"),
        (lambda: gradq.prepare(Net(), 3), TypeError, "preset name"),
        (lambda: gradq.prepare("net"), TypeError, "nn.Module"),
        (lambda: gradq.prepare(gradq.prepare(Net())), ValueError, "already prepared"),
        (lambda: gradq.calibrate(Net(), _data()), ValueError, "call gradq.prepare"),
        (lambda: gradq.calibrate(gradq.prepare(Net()), [], progress=False), ValueError, "no batches"),
        (lambda: gradq.calibrate(gradq.prepare(Net(), "w4"), _data(), progress=False), ValueError, "weight-only"),
        (lambda: gradq.calibrate(gradq.prepare(Net(), QuantConfig(calibrator="mse")), iter(_data()),
                                 progress=False), TypeError, "list or a DataLoader"),
        (lambda: gradq.calibrate(gradq.prepare(Net()), [torch.full((2, 1, 16, 16), float("nan"))],
                                 progress=False), ValueError, "NaN or Inf"),
        (lambda: gradq.calibrate(gradq.prepare(Net()), ["text"], progress=False), TypeError, "input tensor"),
        (lambda: gradq.prepare(Net()).eval()(torch.randn(1, 1, 16, 16)), RuntimeError, "gradq.calibrate"),
        (lambda: gradq.quant_report(Net()), ValueError, "not prepared"),
    ],
)
def test_clear_errors(make, exc, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match):
            make()


def test_int32_overflow_is_refused():
    torch.manual_seed(0)
    config = QuantConfig(weight=weight_scheme(8, group_size=1024), activation=activation_scheme(8))
    prepared = gradq.calibrate(gradq.prepare(nn.Sequential(nn.Linear(4096, 2)), config), [torch.randn(4, 4096)],
                               progress=False)
    with pytest.raises(ValueError, match="int32 accumulator could overflow"):
        prepared.eval()(torch.randn(1, 4096))


def _lsq_formula(x, s, z, qmin, qmax, g, pact):
    """LSQ's published pseudo-code (grad_scale, round_pass) with a zero point; PACT: clip, then STE round."""
    if pact:
        y = torch.minimum(torch.maximum(x, (qmin - z) * s), (qmax - z) * s)
        return y + (s.detach() * torch.round(y.detach() / s.detach()) - y).detach()
    s = (s - s * g).detach() + s * g
    v = torch.clamp(x / s, qmin - z, qmax - z)
    return ((v.round() - v).detach() + v) * s


@pytest.mark.parametrize("rule", ["lsq", "pact"])
@pytest.mark.parametrize(("qmin", "qmax", "z"), [(0, 15, 3), (-7, 7, 0), (0, 255, 0)])
def test_learned_step_gradients_match_autograd_of_the_formula(rule, qmin, qmax, z):
    gen = torch.Generator().manual_seed(qmax + z)
    x = (torch.randn(64, 5, generator=gen, dtype=torch.float64) * 3)
    step = torch.rand(1, 5, generator=gen, dtype=torch.float64) * 0.3 + 0.1
    g = 1.0 if rule == "pact" else 1.0 / (64 * qmax) ** 0.5
    x1, s1 = x.clone().requires_grad_(), step.clone().requires_grad_()
    out = learned_fake_quantize(x1, s1, float(z), qmin, qmax, rule=rule)
    x2, s2 = x.clone().requires_grad_(), step.clone().requires_grad_()
    ref = _lsq_formula(x2, s2, float(z), qmin, qmax, g, rule == "pact")
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    weights = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-14, atol=0)  # the formula multiplies by s / s
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-12, atol=1e-12)
    clipped = (x / step + z < qmin) | (x / step + z > qmax)
    assert clipped.any() and (~clipped).any()
    assert torch.equal(x1.grad, weights * (~clipped))


def test_ste_masks_of_weights_and_activations():
    torch.manual_seed(0)
    w = torch.randn(6, 40).requires_grad_()
    mse = gradq.modelquant.weights.WeightQuantizer(weight_scheme(2), "mse", w.shape, learn=False)
    out = mse(w)
    out.sum().backward()
    wi, sw = mse.integer(w)
    assert torch.equal(out.detach(), (sw[:, None].double() * wi).float())
    clipped = (w.detach().abs() / sw[:, None]).round() > 1
    assert clipped.any() and torch.equal(w.grad, (~clipped).float())
    binary = gradq.modelquant.weights.WeightQuantizer(weight_scheme(1), "minmax", w.shape, learn=False)
    w.grad = None
    binary(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # sign: straight through
    q = ActQuant(activation_scheme(4), "minmax", {}, None, "t").train()
    x = torch.linspace(-1, 3, 50).requires_grad_()
    q(x)  # first batch fixes the range [-1, 3]
    y = torch.linspace(-2, 4, 50).requires_grad_()
    q(y).sum().backward()
    # QAT observer: the range moved 1% (EMA momentum 0.01) toward the second batch's [-2, 4]
    assert abs(float(q.ema_lo) - -1.01) < 1e-6 and abs(float(q.ema_hi) - 3.01) < 1e-6
    assert torch.equal(q.scale, gradq.choose_qparams(torch.tensor([-1.01, 3.01]), q.scheme)[0])
    inside = (y.detach() / q.scale).round() + q.zero_point
    assert torch.equal(y.grad, ((inside >= 0) & (inside <= 15)).float())


def test_qat_trains_lsq_steps_and_eval_stays_integer():
    torch.manual_seed(0)
    model = Net()
    config = QuantConfig.preset("w4a4", learn="lsq")
    prepared = gradq.prepare(model, config)
    gradq.calibrate(prepared, _data(), progress=False)
    steps = {n: p.detach().clone() for n, p in prepared.named_parameters() if n.endswith("step")}
    assert len(steps) == 4 + 5  # one per weight quantizer, one per activation quantizer
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    prepared.train()
    for x in _data(5, seed=3):
        loss = F.cross_entropy(prepared(x), torch.randint(0, 10, (8,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [n for n, p in prepared.named_parameters() if n.endswith("step") and not torch.equal(p, steps[n])]
    assert len(moved) == len(steps)
    prepared.eval()
    x = _data(1, seed=9)[0]
    out = prepared(x)
    fc2 = prepared.get_submodule("fc2")
    so, zo = fc2.output_quant.qparams()
    codes = out / so + zo
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15


def test_group_size_that_does_not_divide_falls_back_to_per_channel_and_says_so():
    prepared = gradq.prepare(nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 2)), QuantConfig.preset("w4a8", group_size=4))
    first, second = (m for m in prepared.modules() if isinstance(m, QuantLayer))
    assert isinstance(first.weight_quant.scheme.granularity, gradq.PerAxis)
    assert second.weight_quant.scheme.granularity == gradq.PerGroup(4, axis=1)
    rows = gradq.quant_report(prepared).rows
    assert "group size 4 does not divide K=10: per-channel" in rows[0].note and "group" not in rows[1].note


def test_eval_skips_requantizing_integer_outputs_only_because_it_is_exact():
    torch.manual_seed(0)
    prepared = gradq.calibrate(gradq.prepare(Net().eval(), "w4a4"), _data(), progress=False).eval()
    x = _data(1, seed=4)[0]
    fast = prepared(x)
    quants = [m for m in prepared.modules() if isinstance(m, ActQuant)]
    assert sum(q.gridded_in_eval for q in quants) == 4  # every layer's output; not the model input
    for q in quants:
        q.gridded_in_eval = False
    assert torch.equal(prepared(x), fast)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_lsq_weights_forward_the_value_eval_computes_and_train_their_steps(granularity):
    from gradq.modelquant.weights import WeightQuantizer

    torch.manual_seed(3)
    w = torch.randn(5, 3, 2, 2).requires_grad_()
    scheme = {"tensor": QuantScheme.uniform(4), "channel": weight_scheme(4), "group": weight_scheme(4, 6)}[granularity]
    wq = WeightQuantizer(scheme, "minmax", w.shape, learn=True)
    wq.init_step(w)
    with torch.no_grad():
        wq.step.mul_(0.7)  # clip some weights, so both gradient branches occur
    out = wq(w)
    assert torch.equal(out.detach(), wq.dequantized(w))
    out.pow(2).sum().backward()
    assert wq.step.grad is not None and bool((wq.step.grad != 0).all())
    assert bool((w.grad == 0).any()) and bool((w.grad != 0).any())


def test_a_module_called_twice_is_refused_by_name():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(F.relu(self.fc(x)))

    with pytest.raises(ValueError, match=r"\['fc'\] are called more than once"):
        gradq.prepare(Twice())
    with pytest.warns(UserWarning, match="found no Linear"):
        left_float = gradq.prepare(Twice(), QuantConfig().override("fc", None))
    assert isinstance(left_float.get_submodule("fc"), nn.Linear)


def test_qat_moving_average_starts_from_the_calibrated_range():
    torch.manual_seed(0)
    data = [torch.randn(8, 1, 16, 16) for _ in range(4)]
    data[0][0, 0, 0, 0] = 80.0  # one outlier that the percentile calibrator clips
    config = QuantConfig(calibrator="percentile", calibrator_options=(("percentile", 99.0),))
    prepared = gradq.calibrate(gradq.prepare(Net(), config), data, progress=False)
    q = prepared.get_submodule("conv1").input_quant
    lo, hi = float(q.ema_lo), float(q.ema_hi)
    assert hi < 10 and torch.equal(q.scale, gradq.choose_qparams(torch.tensor([lo, hi]), q.scheme)[0])
    batch = torch.randn(8, 1, 16, 16)
    prepared.train()(batch)
    assert abs(float(q.ema_hi) - (hi + 0.01 * (float(batch.max()) - hi))) < 1e-5


def test_binary_channel_of_zeros_and_unbatched_conv_input_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight[1] = 0
    prepared = gradq.calibrate(gradq.prepare(model, "w1a8"), [torch.randn(4, 2, 6, 6)], progress=False)
    x = torch.randn(2, 2, 6, 6)
    out = prepared.eval()(x)
    so, zo = prepared.get_submodule("0").output_quant.qparams()
    bias = prepared.get_submodule("0").bias[1]
    expected = torch.clamp(torch.round(bias / so) + zo, min=zo, max=255) - zo  # channel 1 is its bias alone
    assert torch.allclose(out[:, 1], (expected * so).expand_as(out[:, 1]), atol=float(so))
    assert torch.equal(prepared(x[0]), out[0])  # an unbatched input gives the batched result


def test_eval_recomputes_integer_parameters_when_their_tensors_change():
    torch.manual_seed(0)
    prepared = gradq.calibrate(gradq.prepare(Net().eval(), "w4a8"), _data(), progress=False).eval()
    x = _data(1, seed=2)[0]
    before = prepared(x)
    assert torch.equal(prepared(x), before)  # the cached parameters give the same result
    with torch.no_grad():
        prepared.get_submodule("fc1").weight.mul_(-1.5)  # in place, as an optimizer step would
    after = prepared(x)
    fresh = copy.deepcopy(prepared)  # a copy starts with nothing cached
    fresh.get_submodule("fc1")._integer_cache = None
    assert not torch.equal(after, before) and torch.equal(after, fresh(x))
    prepared.get_submodule("conv2").output_quant.scale.mul_(2)  # a recalibrated scale
    assert torch.equal(prepared(x), copy.deepcopy(prepared)(x)) and not torch.equal(prepared(x), after)
