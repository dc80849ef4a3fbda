"""Reductions that keep every rank's quantization parameters bitwise identical.

When ``torch.distributed`` is initialized with more than one rank, observer statistics are reduced
exactly: minima and maxima with MIN/MAX (order-free), histogram counts as float64 sums of integers below
2**53 (exact in any order). Every reduction first agrees on errors, so a problem seen by one rank (no
batch, NaN) raises on every rank instead of leaving the others waiting in a collective. Outside a
distributed job every function returns its input (or raises its own error).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _max_(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (float64, on the collective's device, returned on the CPU)."""
    t = t.to(_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()


def raise_together(error: str | None) -> None:
    """Raise ValueError on every rank if any rank has an ``error`` (its own message, or the first other's)."""
    if not active():
        if error:
            raise ValueError(error)
        return
    flag = _max_(torch.tensor([1.0 if error else 0.0], dtype=torch.float64))
    if flag[0] > 0:
        raise ValueError(error or "another rank failed while reducing quantization statistics; see its error")


def reduce_batch_ranges(ranges: torch.Tensor, name: str, error: str | None = None) -> torch.Tensor:
    """Per-batch (min, max) rows (B, 2) float64 -> the same rows reduced over ranks (min of mins, max of
    maxes, batch by batch). Raises the same ValueError on every rank when a rank saw no batch, had an
    ``error`` (e.g. NaN), or ranks saw different batch counts."""
    if error is None and len(ranges) == 0:
        error = f"activation quantizer {name!r} saw no batch: calibration needs at least one batch"
    raise_together(error)
    if not active():
        return ranges
    count = _max_(torch.tensor([len(ranges), -len(ranges)], dtype=torch.float64))
    if count[0] != -count[1]:
        raise ValueError(
            f"ranks calibrated on different numbers of batches ({int(-count[1])} to {int(count[0])}); give every "
            "rank the same number of calibration batches"
        )
    signed = _max_(torch.stack((-ranges[:, 0], ranges[:, 1]), dim=1).contiguous())
    return torch.stack((-signed[:, 0], signed[:, 1]), dim=1)


def reduce_range(lo: float, hi: float, name: str) -> tuple[float, float]:
    """(min, max) of one batch -> the min and max over all ranks' batches; NaN/Inf on any rank raises on all."""
    finite = math.isfinite(lo) and math.isfinite(hi)
    bad = None if finite else f"activation quantizer {name!r} saw NaN or Inf; QAT needs finite activations"
    if not active():
        raise_together(bad)
        return lo, hi
    t = _max_(torch.tensor([-lo if finite else 0.0, hi if finite else 0.0, 0.0 if finite else 1.0],
                           dtype=torch.float64))
    if t[2] > 0:
        raise ValueError(bad or "another rank saw NaN or Inf activations in QAT; see its error")
    return -float(t[0]), float(t[1])


def sum_counts(counts: torch.Tensor | None, error: str | None = None) -> torch.Tensor:
    """Histogram counts (float64) summed over ranks; an ``error`` or a missing histogram on any rank raises on all."""
    if error is None and counts is None:
        error = "no histogram was collected: calibration's second pass saw no batch"
    raise_together(error)
    if active():
        device = counts.device
        counts = counts.to(_device(), copy=True)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        counts = counts.to(device)
    return counts
