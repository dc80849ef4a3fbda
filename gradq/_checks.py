"""Checks of kernel results that need a host read, at once or deferred.

A check is a 0-dim bool tensor on the device of the data (True: the error happened) and the error to raise.
By default :func:`check` reads it at once (one host synchronization on a GPU). Inside
:func:`deferred_checks`, it is only recorded, and the caller raises the recorded errors later with
:func:`raise_recorded` (one host read for all of them): the DDP hook records a step's checks bucket by
bucket and reads them once at the end of the step. :func:`copy_if_finite` is the same idea for the rule
"NaN/Inf never enter a residual or a momentum": a device-side select where a host branch would synchronize.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_local = threading.local()


def _recording() -> list[tuple[torch.Tensor, Exception]] | None:
    return getattr(_local, "recorded", None)


def check(failed: torch.Tensor, error: Exception) -> None:
    """Raise ``error`` if the 0-dim bool tensor ``failed`` is True: now, or, inside :func:`deferred_checks`,
    when the recorded checks are raised."""
    recorded = _recording()
    if recorded is not None:
        recorded.append((failed, error))
    elif bool(failed):
        raise error


@contextmanager
def deferred_checks() -> Iterator[list[tuple[torch.Tensor, Exception]]]:
    """Within this block (in this thread), :func:`check` records instead of reading; yields the list of
    recorded ``(failed, error)`` pairs, to pass to :func:`raise_recorded`."""
    previous = _recording()
    _local.recorded = recorded = []
    try:
        yield recorded
    finally:
        _local.recorded = previous


def raise_recorded(recorded: list[tuple[torch.Tensor, Exception]]) -> None:
    """Raise the first recorded error whose check failed (one host read per device); clears ``recorded``."""
    pending, recorded[:] = list(recorded), []
    if not pending:
        return
    by_device: dict[torch.device, list[int]] = {}
    for i, (failed, _) in enumerate(pending):
        by_device.setdefault(failed.device, []).append(i)
    failed_at = []
    for indices in by_device.values():
        flags = torch.stack([pending[i][0] for i in indices]).cpu()
        failed_at += [i for i, f in zip(indices, flags.tolist(), strict=True) if f]
    if failed_at:
        raise pending[min(failed_at)][1]


def selects_on_device(t: torch.Tensor) -> bool:
    """Whether finiteness rules on ``t`` run as device-side selects (CUDA, or while checks are deferred)
    rather than host branches."""
    return t.device.type == "cuda" or _recording() is not None


def copy_if_finite(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` unless ``src`` holds a NaN or Inf (then ``dst`` is left as it is): a host branch on
    the CPU, a device-side select on CUDA (no synchronization)."""
    if selects_on_device(src):
        torch.where(torch.isfinite(src).all(), src, dst, out=dst)
    elif bool(torch.isfinite(src).all()):
        dst.copy_(src)


def norm_overflow_error() -> ValueError:
    """The error for finite values whose block l2 norm no fp32 scale can hold."""
    return ValueError(
        "a block's l2 norm exceeds the fp32 maximum (3.4e38): its values are too large for any fp32 scale, "
        "and decoding would give NaN. Gradients this large have diverged: lower the learning rate, clip the "
        "gradients or scale the loss down"
    )
