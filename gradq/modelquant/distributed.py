"""Reductions that keep every rank's quantization parameters bitwise identical.

When ``torch.distributed`` is initialized with more than one rank, observer statistics are reduced
exactly: minima and maxima with MIN/MAX (order-free), histogram counts as float64 sums of integers below
2**53 (exact in any order). Outside a distributed job every function returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _max_(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def reduce_batch_ranges(ranges: torch.Tensor, name: str) -> torch.Tensor:
    """Per-batch (min, max) rows (B, 2) float64 -> the same rows reduced over ranks (min of mins, max of
    maxes, batch by batch). Raises the same ValueError on every rank when ranks saw different batch counts."""
    if ranges.numel() == 0:
        raise ValueError(f"activation quantizer {name!r} saw no batch: calibration needs at least one batch")
    if not active():
        return ranges
    count = torch.tensor([len(ranges), -len(ranges)], dtype=torch.float64)
    _max_(count)
    if count[0] != -count[1]:
        raise ValueError(
            f"ranks calibrated on different numbers of batches ({int(-count[1])} to {int(count[0])}); give every "
            "rank the same number of calibration batches"
        )
    signed = torch.stack((-ranges[:, 0], ranges[:, 1]), dim=1).contiguous()
    _max_(signed)
    return torch.stack((-signed[:, 0], signed[:, 1]), dim=1)


def reduce_range(lo_hi: tuple[float, float]) -> tuple[float, float]:
    """(min, max) of one batch -> the min and max over all ranks' batches."""
    if not active():
        return lo_hi
    t = torch.tensor([-lo_hi[0], lo_hi[1]], dtype=torch.float64)
    _max_(t)
    return -float(t[0]), float(t[1])


def sum_counts(counts: torch.Tensor | None) -> torch.Tensor:
    """Histogram counts (float64) summed over ranks."""
    if counts is None:
        raise ValueError("no histogram was collected: calibration's second pass saw no batch")
    if active():
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts
