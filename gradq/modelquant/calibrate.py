"""``gradq.calibrate``: run calibration batches through a prepared model and fix activation ranges (PTQ)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from gradq.modelquant import distributed
from gradq.modelquant.modules import QuantLayer
from gradq.modelquant.observer import ActQuant


def act_quantizers(model: nn.Module) -> list[ActQuant]:
    """The distinct activation quantizers of a prepared model, in module order."""
    return [m for m in model.modules() if isinstance(m, ActQuant)]


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """The quantized layers of a prepared model; ValueError naming the fix if there are none."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("this model is not prepared for quantization: call gradq.prepare(model, config) first")
    return layers


@contextlib.contextmanager
def _phase(model: nn.Module, phase: str) -> Iterator[None]:
    layers, quants = quant_layers(model), act_quantizers(model)
    for layer in layers:
        layer.calibrating = True
    for q in quants:
        q.phase = phase
    try:
        yield
    finally:
        for layer in layers:
            layer.calibrating = False
        for q in quants:
            q.phase = None


def _inputs(batch: object) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    raise TypeError(
        f"a calibration batch must be the model's input tensor or a (input, target, ...) tuple, got "
        f"{type(batch).__name__}"
    )


def _run(model: nn.Module, batches: Iterable, desc: str, progress: bool) -> int:
    from tqdm.auto import tqdm

    count = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            model(*_inputs(batch))
            count += 1
    return count


def calibrate(model: nn.Module, batches: Iterable, *, progress: bool = True) -> nn.Module:
    """Fix the activation ranges of a prepared ``model`` from ``batches`` (PTQ); returns ``model``.

    Each batch is the model's input tensor, or a tuple whose first element is. Pass 1 records every
    batch's min/max; calibrators that need a histogram (``percentile``, ``mse``, ``entropy``) make a
    second pass, so ``batches`` must then be re-iterable (a list or a DataLoader, not a generator).
    Layers compute in float while calibrating (observed ranges are those of the float model). Inside an
    initialized ``torch.distributed`` job every rank must call this with the same number of batches and
    ends with bitwise-identical scales. Mutates the model's quantizers; keeps its train/eval mode.
    """
    quants = act_quantizers(model)
    quant_layers(model)
    if not quants:
        raise ValueError("this model has no activation quantizers (weight-only config): there is nothing to calibrate")
    needs_histogram = any(q.needs_histogram for q in quants)
    if needs_histogram and isinstance(batches, Iterator):
        raise TypeError(
            "this calibrator makes two passes over the batches: pass a list or a DataLoader, not an iterator"
        )
    training = model.training
    model.eval()
    try:
        for q in quants:
            q.begin_calibration()
        with _phase(model, "minmax"):
            count = _run(model, batches, "calibrate (min/max)", progress)
        if count == 0 and not distributed.active():  # in a job, every rank raises together in finish_minmax
            raise ValueError("calibrate got no batches: pass at least one batch of representative inputs")
        for q in quants:
            q.finish_minmax()
        if needs_histogram:
            with _phase(model, "histogram"):
                _run(model, batches, "calibrate (histograms)", progress)
        for q in quants:
            q.finish()
    finally:
        model.train(training)
    return model
