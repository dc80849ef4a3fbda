"""gradq.convert: the integer model equals the prepared model's eval() bit for bit, runs on codes, stores
packed weights; on random models and on the pretrained LeNet-5 with real MNIST digits."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradq
from benchmarks.quant_data import load_lenet5, load_mnist5k, mnist5k_split
from gradq.modelquant import ActQuant, IntegerLayer, QuantConfig, QuantLayer, WeightOnlyLayer
from tests.test_modelquant import Net, _data


def _converted(model: nn.Module, config, batches):
    prepared = gradq.prepare(model, config)
    if any(isinstance(m, ActQuant) for m in prepared.modules()):  # weight-only models need no calibration
        gradq.calibrate(prepared, batches, progress=False)
    prepared.eval()
    return prepared, gradq.convert(prepared)


CONFIGS = {
    "w8a8": QuantConfig.preset("w8a8"),
    "w4a8": QuantConfig.preset("w4a8"),
    "w4a4-mse": QuantConfig.preset("w4a4", calibrator="mse"),
    "w2a8-g8": QuantConfig.preset("w2a8", group_size=8),
    "w1a8": QuantConfig.preset("w1a8"),
    "mixed": QuantConfig.preset("w4a4").override("conv1", QuantConfig.preset("w8a8")),
    "w4-weight-only": QuantConfig.preset("w4"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_convert_equals_eval_and_runs_on_codes(name):
    torch.manual_seed(0)
    prepared, converted = _converted(Net().eval(), CONFIGS[name], _data())
    x = _data(2, seed=7)
    seen = []
    for m in converted.modules():
        if isinstance(m, IntegerLayer):
            m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    for batch in x:
        assert torch.equal(converted(batch), prepared(batch))
    integer = CONFIGS[name].activation is not None
    codes = (torch.uint8, torch.int8)
    assert bool(seen) == integer and all(i in codes and o in codes for i, o in seen)
    assert not any(isinstance(m, (QuantLayer, ActQuant)) for m in converted.modules())
    for layer in (m for m in prepared.modules() if isinstance(m, QuantLayer)):
        stored = converted.get_submodule(layer.name)
        bits = layer.weight_quant.scheme.bits
        assert isinstance(stored, IntegerLayer if integer else WeightOnlyLayer)
        assert stored.packed_weight.numel() == math.ceil(layer.weight.numel() * bits / 8)
        assert torch.equal(stored.integer_weights(), layer.weight_quant.integer(layer.weight)[0])


class Branchy(nn.Module):
    """A residual add and a sigmoid (float between dequantize/quantize), a weight-only layer, a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6 * 12, 5)
        self.tail = nn.Linear(5, 4)

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = y + torch.sigmoid(self.c2(y))
        y = self.head(torch.flatten(y, 1))
        return self.tail(y)


def test_convert_brackets_float_operations_and_keeps_weight_only_layers():
    torch.manual_seed(1)
    config = QuantConfig.preset("w4a8").override("tail", QuantConfig.preset("w8"))
    batches = [torch.randn(5, 3, 12) for _ in range(3)]
    prepared, converted = _converted(Branchy(), config, batches)
    x = torch.randn(7, 3, 12)
    assert torch.equal(converted(x), prepared(x))
    assert isinstance(converted.get_submodule("tail"), WeightOnlyLayer)  # packed weights, float compute
    assert isinstance(converted.get_submodule("c2"), IntegerLayer)
    code = converted.code
    assert "sigmoid" in code and "dequantize" in code and "quantize" in code


def test_convert_after_qat_with_lsq():
    torch.manual_seed(2)
    prepared = gradq.calibrate(gradq.prepare(Net(), QuantConfig.preset("w4a4", learn="lsq")), _data(),
                               progress=False)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    prepared.train()
    for x in _data(3, seed=5):
        loss = prepared(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    prepared.eval()
    converted = gradq.convert(prepared)
    x = _data(1, seed=11)[0]
    assert torch.equal(converted(x), prepared(x))


@pytest.mark.parametrize("preset,group", [("w8a8", None), ("w4a8", None), ("w2a8", 8)])
def test_lenet5_converted_equals_eval_on_real_digits(preset, group):
    x, y = load_mnist5k()
    cal, ev = mnist5k_split(y)
    model = load_lenet5()
    prepared, converted = _converted(model, QuantConfig.preset(preset, group_size=group), [x[cal][:250], x[cal][250:]])
    sample = x[ev][::9]  # 500 digits, every class
    out_prepared, out_converted = prepared(sample), converted(sample)
    assert torch.equal(out_converted, out_prepared)
    agree = (out_converted.argmax(1) == model(sample).argmax(1)).float().mean().item()
    assert agree > 0.97, agree  # and it is still LeNet-5


def test_convert_errors():
    with pytest.raises(ValueError, match="gradq.prepare"):
        gradq.convert(Net())
    with pytest.raises(RuntimeError, match="gradq.calibrate"):
        gradq.convert(gradq.prepare(Net()))


def test_relu_that_is_not_fused_runs_on_codes():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(4, 3, 2))
    prepared, converted = _converted(model, "w8a8", [torch.randn(4, 2, 9, 9) for _ in range(2)])
    relus = [m for m in converted.modules() if isinstance(m, gradq.modelquant.CodeReLU)]
    assert len(relus) == 1 and relus[0].zero_point > 0  # the conv output is affine: ReLU is max(q, z)
    x = torch.randn(3, 2, 9, 9)
    assert torch.equal(converted(x), prepared(x))


class Relu6Net(nn.Module):
    """Conv-BN-ReLU6 and Linear-ReLU6 (MobileNet's activation), fused as the clamp [zo, code of 6]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Linear(6 * 8 * 8, 12), nn.Linear(12, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu6(self.bn(self.conv(x))), 2)
        return self.fc2(nn.functional.relu6(self.fc1(torch.flatten(x, 1))))


def test_relu6_is_fused_as_the_clamp_at_the_code_of_six(tmp_path):
    torch.manual_seed(0)
    model = Relu6Net().eval()
    with torch.no_grad():
        model.fc1.weight.mul_(8)  # many fc1 pre-activations pass 6
    x = torch.randn(64, 1, 16, 16) * 4
    prepared = gradq.prepare(model, "w8a8")
    assert prepared.conv.fused == ("BatchNorm", "ReLU6") and prepared.fc1.relu6
    gradq.calibrate(prepared, [x], progress=False)
    prepared.fc1.output_quant.scale.fill_(0.04)  # a range past 6: the clamp is the code of 6, 150, not 255
    prepared.eval()
    p = prepared.fc1.integer_parameters()
    assert p["hi"] == 150 and p["lo"] == p["zo"] == 0
    converted = gradq.convert(prepared)
    seen = []
    converted.fc1.register_forward_hook(lambda m, i, out: seen.append(out))
    assert torch.equal(converted(x), prepared(x))
    assert int(seen[0].max()) == 150  # saturated at 6.0 exactly
    with torch.no_grad():
        reference, quantized = model(x), prepared(x)
    assert float((quantized - reference).abs().mean()) < 0.1 * float(reference.abs().mean())
    gradq.export_onnx(converted, x[:1], tmp_path / "relu6.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "relu6.onnx"), providers=["CPUExecutionProvider"])
    theirs = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    outputs = [m for m in converted.modules() if isinstance(m, gradq.modelquant.Dequantize)]
    step = float(outputs[-1].scale)
    assert float((theirs - converted(x)).abs().max()) <= step * 1.001


def test_planned_calls_follow_shapes_parameters_and_kernel_choice(monkeypatch):
    """Each integer module plans its kernel call once per input signature; other shapes, new parameters
    (load_state_dict), GRADQ_KERNELS and copies plan again, and every planned call computes eval()'s codes."""
    import copy
    import pickle

    from gradq.modelquant import integer_modules

    torch.manual_seed(0)
    prepared, converted = _converted(Net().eval(), CONFIGS["w8a8"], _data())
    _, other = _converted(Net().eval(), CONFIGS["w8a8"], _data(seed=3))  # other weights and scales
    planned = [m for m in converted.modules() if isinstance(m, integer_modules._Planned)]
    x = torch.cat(_data(2, seed=7))
    for batch in (x[:5], x[:1], x[:5], x[1:3]):  # two signatures seen twice
        assert torch.equal(converted(batch), prepared(batch))
    assert all(len(m._calls) == 3 for m in planned)  # batches of 5, 1 and 2
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    assert torch.equal(converted(x[:5]), prepared(x[:5]))
    assert all(len(m._calls) == 4 for m in planned)
    monkeypatch.delenv("GRADQ_KERNELS")
    clone = copy.deepcopy(converted)  # planned closures are not state: not copied, not pickled
    assert not any("_calls" in vars(m) for m in clone.modules())
    assert all(pickle.loads(pickle.dumps(m)).__dict__.keys() == vars(m).keys() - {"_calls"} for m in planned)
    assert torch.equal(clone(x), prepared(x))
    assert not torch.equal(converted(x[:5]), other(x[:5]))
    converted.load_state_dict(other.state_dict())  # new parameters: the old plans are forgotten
    assert not any("_calls" in vars(m) for m in planned)
    assert torch.equal(converted(x[:5]), other(x[:5]))
    for n in range(1, integer_modules.MAX_PLANS + 3):  # many shapes: at most MAX_PLANS plans each
        converted(x[:n])
    assert all(0 < len(m._calls) <= integer_modules.MAX_PLANS for m in planned)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return y, self.b(y)


def test_integer_model_runs_a_program_of_planned_calls_equal_to_its_modules(monkeypatch):
    """From the second call with a signature, convert's model runs its program (no planned_call lookups);
    it computes what the module-by-module forward computes, falls back where hooks must run, and a new
    parameter anywhere (load_state_dict on one layer), a copy or a new graph makes a new program."""
    import copy

    from gradq.modelquant import integer_modules
    from gradq.modelquant.integer_model import IntegerModel

    torch.manual_seed(0)
    prepared, converted = _converted(Net().eval(), CONFIGS["w8a8"], _data())
    _, other = _converted(Net().eval(), CONFIGS["w8a8"], _data(seed=3))
    assert isinstance(converted, IntegerModel)
    x = torch.cat(_data(2, seed=7))
    lookups = []
    planned_call = integer_modules._Planned.planned_call
    monkeypatch.setattr(integer_modules._Planned, "planned_call",
                        lambda self, *a: lookups.append(self) or planned_call(self, *a))
    for batch in (x[:1], x[:5]):
        assert torch.equal(converted(batch), prepared(batch))  # recorded: every integer module planned
        assert lookups
        lookups.clear()
        assert torch.equal(converted(batch), prepared(batch))  # the program
        assert not lookups
    seen = []
    handle = converted.fc1.register_forward_hook(lambda m, i, out: seen.append(out.shape))
    assert torch.equal(converted(x[:5]), prepared(x[:5])) and seen == [(5, 16)]  # hooks run: module by module
    handle.remove()
    converted.fc2.load_state_dict(other.fc2.state_dict())  # one layer's new parameters: every program is stale
    mixed = converted.forward(x[:5])  # the module-by-module forward
    assert not torch.equal(mixed, prepared(x[:5]))
    assert torch.equal(converted(x[:5]), mixed) and torch.equal(converted(x[:5]), mixed)
    clone = copy.deepcopy(converted)
    assert "_programs" not in vars(clone) and torch.equal(clone(x[:5]), mixed)
    converted.recompile()
    assert "_programs" not in vars(converted) and torch.equal(converted(x[:5]), mixed)

    torch.manual_seed(1)
    prepared, converted = _converted(TwoHeads().eval(), "w8a8", [torch.randn(16, 8)])
    x = torch.randn(5, 8)
    for _ in range(2):  # recorded, then the program: a tuple of outputs
        got, want = converted(x), prepared(x)
        assert isinstance(got, tuple) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


LAYOUT = {"channels_last": False}


@torch.fx.wrap
def _relayout(x):
    """A float operation whose output layout the test switches between calls."""
    return x.contiguous(memory_format=torch.channels_last) if LAYOUT["channels_last"] else x.contiguous()


class Relayout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 16, 3), nn.Conv2d(16, 16, 3)

    def forward(self, x):
        return self.conv2(_relayout(torch.relu(self.conv1(x))))


def test_integer_model_programs_follow_replaced_modules_changed_values_and_copies():
    import copy
    import pickle

    from gradq.modelquant.integer_model import IntegerModel

    torch.manual_seed(0)
    _, converted = _converted(Net().eval(), CONFIGS["w8a8"], _data())
    _, other = _converted(Net().eval(), CONFIGS["w8a8"], _data(seed=3))
    x = torch.cat(_data(2, seed=7))[:5]
    before = converted(x)
    assert torch.equal(converted(x), before)  # the program
    converted.fc2 = other.fc2  # a module the program calls is replaced: a new program
    assert not torch.equal(converted(x), before) and torch.equal(converted(x), converted.forward(x))
    for clone in (copy.copy(converted), pickle.loads(pickle.dumps(converted))):
        assert isinstance(clone, IntegerModel) and hasattr(clone, "gradq_info")
        assert torch.equal(clone(x), converted.forward(x)) and torch.equal(clone(x), converted.forward(x))

    torch.manual_seed(1)
    prepared, converted = _converted(Relayout().eval(), "w8a8", [torch.randn(4, 2, 10, 10) for _ in range(2)])
    x = torch.randn(3, 2, 10, 10)
    try:
        for channels_last in (False, False, True, True):  # recorded on contiguous values, then switched
            LAYOUT["channels_last"] = channels_last
            assert torch.equal(converted(x), prepared(x)), channels_last
    finally:
        LAYOUT["channels_last"] = False
