"""save_quantized / load_quantized: bit-identical round trips, file sizes, and clear errors for bad files."""

import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import gradq
from benchmarks.quant_data import LeNet5, load_lenet5, load_mnist5k, mnist5k_split
from gradq.modelquant import QuantConfig
from gradq.modelquant.serialize import config_from_json, config_to_json
from tests.test_convert import _converted
from tests.test_modelquant import Net, _data


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig.preset("w4a8"),
        QuantConfig.preset("w2a8", group_size=8, learn="lsq"),
        QuantConfig.preset("w1a8").override("fc2", None),
        QuantConfig.preset("w4a4", calibrator="percentile", calibrator_options=(("percentile", 99.5),))
        .override("conv1", QuantConfig.preset("w8a8")),
        QuantConfig.preset("w4"),
    ],
    ids=["w4a8", "w2a8-g8-lsq", "w1a8-float-fc2", "mixed", "w4-weight-only"],
)
def test_round_trip_is_bit_identical(tmp_path, config):
    torch.manual_seed(0)
    _, converted = _converted(Net().eval(), config, _data())
    path = tmp_path / "model.safetensors"
    size = gradq.save_quantized(converted, path)
    assert size == path.stat().st_size > 0
    torch.manual_seed(123)  # a skeleton with other (random) weights: they are not used
    loaded = gradq.load_quantized(path, Net())
    for x in _data(2, seed=8):
        assert torch.equal(loaded(x), converted(x))
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config


def _state_dict_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


@pytest.mark.parametrize(("preset", "most"), [("w4a8", 1 / 7), ("w2a8", 1 / 12)])
def test_lenet5_file_sizes(tmp_path, preset, most):
    x, y = load_mnist5k()
    cal, ev = mnist5k_split(y)
    model = load_lenet5()
    _, converted = _converted(model, preset, [x[cal]])
    size = gradq.save_quantized(converted, tmp_path / "lenet.safetensors")
    fp32 = _state_dict_bytes(model)
    assert size <= most * fp32, (size, fp32, size / fp32)
    loaded = gradq.load_quantized(tmp_path / "lenet.safetensors", LeNet5())
    assert torch.equal(loaded(x[ev][:300]), converted(x[ev][:300]))


def _saved(tmp_path):
    torch.manual_seed(0)
    _, converted = _converted(Net().eval(), "w4a8", _data())
    path = tmp_path / "m.safetensors"
    gradq.save_quantized(converted, path)
    return path


def test_truncated_file_is_rejected(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gradq.load_quantized(path, Net())


@pytest.mark.parametrize("change", ["dtype", "shape", "missing", "version", "foreign"])
def test_wrong_contents_are_rejected_by_name(tmp_path, change):
    path = _saved(tmp_path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    key = "conv2.packed_weight"
    if change == "dtype":
        tensors[key] = tensors[key].to(torch.int16)
    elif change == "shape":
        tensors[key] = tensors[key][:-1].clone()
    elif change == "missing":
        del tensors[key]
    elif change == "version":
        metadata["format_version"] = "99"
    else:
        metadata["format"] = "something-else"
    save_file(tensors, str(path), metadata=metadata)
    match = {"dtype": "conv2.packed_weight' is torch.int16", "shape": "conv2.packed_weight", "missing": "missing",
             "version": "format version '99'", "foreign": "not a gradq integer model"}[change]
    with pytest.raises(ValueError, match=match):
        gradq.load_quantized(path, Net())


def test_save_needs_a_converted_model(tmp_path):
    prepared = gradq.calibrate(gradq.prepare(Net()), _data(), progress=False)
    with pytest.raises(ValueError, match="gradq.convert"):
        gradq.save_quantized(prepared, tmp_path / "x.safetensors")
