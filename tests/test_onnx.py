"""export_onnx: onnxruntime (one thread, all graph optimizations) runs the exported QDQ graph and agrees
with gradq's integer model within one output quantization step (it requantizes with a float multiplier)."""

import onnxruntime as ort
import pytest
import torch
from torch import nn

import gradq
from benchmarks.quant_data import load_lenet5, load_mnist5k, mnist5k_split
from gradq.modelquant import Dequantize, QuantConfig
from gradq.scheme import QuantScheme
from tests.test_convert import Branchy, _converted
from tests.test_modelquant import Net, _data


def _run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _output_step(converted) -> float:
    return float([m for m in converted.modules() if isinstance(m, Dequantize)][-1].scale)


@pytest.mark.parametrize("preset,group", [("w8a8", None), ("w4a8", None), ("w2a8", 8)])
def test_lenet5_onnxruntime_agrees_within_one_step(tmp_path, preset, group):
    x, y = load_mnist5k()
    cal, ev = mnist5k_split(y)
    _, converted = _converted(load_lenet5(), QuantConfig.preset(preset, group_size=group), [x[cal]])
    gradq.export_onnx(converted, x[:1], tmp_path / "lenet.onnx")
    sample, labels = x[ev][::3], y[ev][::3]  # 1,500 digits
    ours, theirs = converted(sample), _run_onnx(tmp_path / "lenet.onnx", sample)
    within = ((ours - theirs).abs() <= _output_step(converted) * 1.001).float().mean().item()
    assert within >= 0.999, within
    acc_ours = (ours.argmax(1) == labels).float().mean().item()
    acc_theirs = (theirs.argmax(1) == labels).float().mean().item()
    assert abs(acc_ours - acc_theirs) <= 0.001, (acc_ours, acc_theirs)
    assert acc_ours > 0.97


SIGNED = QuantConfig(activation=QuantScheme.uniform(8))  # int8 symmetric activations: ReLU is not the clamp


@pytest.mark.parametrize("config", ["w1a8", "w4a4", "w4", SIGNED], ids=["w1a8", "w4a4", "w4", "signed-act"])
def test_small_models_export(tmp_path, config):
    torch.manual_seed(0)
    _, converted = _converted(Net().eval(), config, _data())
    gradq.export_onnx(converted, _data(1)[0], tmp_path / "net.onnx")
    x = _data(1, seed=6)[0]
    ours, theirs = converted(x), _run_onnx(tmp_path / "net.onnx", x)
    if config == "w4":  # weight-only: float compute on the same dequantized weights
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    else:
        assert ((ours - theirs).abs() <= _output_step(converted) * 1.001).float().mean().item() >= 0.999


def test_relu_on_codes_exports(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    _, converted = _converted(model, "w8a8", [torch.randn(4, 2, 8, 8) for _ in range(2)])
    gradq.export_onnx(converted, torch.randn(1, 2, 8, 8), tmp_path / "m.onnx")
    x = torch.randn(5, 2, 8, 8)
    assert ((converted(x) - _run_onnx(tmp_path / "m.onnx", x)).abs() <= _output_step(converted) * 1.001).all()


def test_unsupported_operations_and_models_are_named(tmp_path):
    torch.manual_seed(1)
    _, converted = _converted(Branchy(), "w4a8", [torch.randn(5, 3, 12)])
    with pytest.raises(ValueError, match="sigmoid"):
        gradq.export_onnx(converted, torch.randn(1, 3, 12), tmp_path / "b.onnx")
    with pytest.raises(ValueError, match="gradq.convert"):
        gradq.export_onnx(gradq.prepare(Net()), torch.randn(1, 1, 16, 16), tmp_path / "p.onnx")


def _outputs_at(path, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The exported graph's values ``names`` (code tensors) as onnxruntime computes them, all optimizations."""
    import onnx

    proto = onnx.load(str(path))
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(v) for v in session.run(names, {"input": x.numpy()})]


@pytest.mark.parametrize("config", ["w8a8", SIGNED], ids=["uint8", "int8"])
def test_average_pooling_exports_exactly(tmp_path, config):
    """Average pooling runs on the code values in the exported graph, so onnxruntime's codes equal gradq's
    (padding as the code of a real 0, ties to the even code), where a pooling on dequantized floats rounded
    about 2% of a residual CNN's pooled codes the other way."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.AvgPool2d(3, stride=2, padding=1),
                          nn.AvgPool2d((2, 3), stride=(1, 2), padding=(1, 0)),  # unequal padding along H and W
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))  # no ReLU: zero points inside
    _, converted = _converted(model, config, [torch.randn(8, 2, 13, 13) for _ in range(2)])
    gradq.export_onnx(converted, torch.randn(1, 2, 13, 13), tmp_path / "pool.onnx")
    pools = {n.name: converted.get_submodule(n.target) for n in converted.graph.nodes
             if n.op == "call_module" and type(converted.get_submodule(n.target)).__name__ == "IntegerAvgPool"}
    assert len(pools) == 3
    seen = {}
    for name, pool in pools.items():
        pool.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x = torch.randn(64, 2, 13, 13)
    converted(x)
    zero = int(next(iter(pools.values())).zero_point)
    assert zero != 0 or config is SIGNED  # uint8: a zero point the padding has to supply
    for name, theirs in zip(pools, _outputs_at(tmp_path / "pool.onnx", list(pools), x), strict=True):
        assert theirs.dtype == seen[name].dtype and torch.equal(theirs, seen[name]), name
