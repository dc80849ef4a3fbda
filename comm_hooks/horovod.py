"""gradq for Horovod: a ``DistributedOptimizer`` that moves bit-packed payloads with alltoall/allgather.

Horovod's own ``Compression`` API compresses, then *sums* the compressed tensors with allreduce, which is
meaningless for packed bits with per-rank scales. This optimizer instead runs gradq's compressed allreduce
(the same algorithm, compressors and payloads as the DDP hook) over ``hvd.alltoall``/``hvd.allgather``:

    import horovod.torch as hvd
    import comm_hooks.horovod as ghvd
    hvd.init()
    opt = ghvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compressor="onebit")
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

Like ``hvd.DistributedOptimizer`` it averages gradients over ranks in ``step()`` (or an explicit
``synchronize()``), supports ``skip_synchronize()`` and ``backward_passes_per_step`` (gradients accumulate
locally over that many backward passes, then one exchange), and is an instance of the wrapped optimizer's
class. Gradients are exchanged together, as one buffer keyed by the parameter names.
"""

import contextlib
from collections.abc import Iterable, Iterator

import horovod.torch as hvd
import torch

from gradq.allreduce import CompressedAllreduce, Mode, ensure_same_settings, through_host
from gradq.compressors import Compressor


class HorovodTransport:
    """gradq's :class:`~gradq.allreduce.Transport` over Horovod's collectives. CUDA payloads go as they are
    where Horovod was built with NCCL, else through host memory; results come back on the payload's device."""

    def __init__(self) -> None:
        self.world_size = hvd.size()
        self.rank = hvd.rank()
        self._stage = not hvd.nccl_built()

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """Equal-split all-to-all of a flat uint8 tensor."""
        return through_host(_alltoall, send, self._stage)

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        """All-gather of equal-size flat uint8 tensors, concatenated in rank order."""
        return through_host(hvd.allgather, send, self._stage)


def _alltoall(send: torch.Tensor) -> torch.Tensor:
    received = hvd.alltoall(send)
    return received[0] if isinstance(received, tuple) else received


class _GradqDistributedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, named_parameters, reducer, backward_passes_per_step):  # noqa: ANN001
        super(self.__class__, self).__init__(params)
        all_params = [p for group in self.param_groups for p in group["params"]]
        if named_parameters is not None:
            named = list(named_parameters)
            names = {id(p): name for name, p in named}
            if len(names) != len(named) or len(set(names.values())) != len(named):
                raise ValueError("named_parameters has duplicate parameters or names")
            unnamed = [p for p in all_params if id(p) not in names]
            if unnamed:
                raise ValueError(f"{len(unnamed)} optimizer parameters are missing from named_parameters")
        else:
            names = {id(p): f"param.{i}" for i, p in enumerate(all_params)}
        self._gradq_names = names
        self._gradq_reducer = reducer
        self._gradq_transport = HorovodTransport()
        self._gradq_passes = backward_passes_per_step
        self._gradq_steps = 0
        self._gradq_sync = True
        self._gradq_synchronized = False
        self._gradq_agreed = False

    def _gradq_check_agreement(self) -> None:
        settings = {**self._gradq_reducer.settings(), "backward_passes_per_step": self._gradq_passes}
        ensure_same_settings(settings, hvd.allgather_object, "Horovod")
        self._gradq_agreed = True

    def synchronize(self) -> None:
        """Replace every gradient by its mean over the ranks, sent compressed (one exchange for all)."""
        if not self._gradq_agreed:
            self._gradq_check_agreement()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if params:
            key = tuple(self._gradq_names[id(p)] for p in params)
            flat = torch.cat([p.grad.reshape(-1).to(torch.float32) for p in params])
            mean = self._gradq_reducer(flat, self._gradq_transport, key=key, step=self._gradq_steps, out=flat).mean
            for p, piece in zip(params, mean.split([p.numel() for p in params]), strict=True):
                p.grad.copy_(piece.view_as(p.grad))
        self._gradq_steps += 1
        self._gradq_synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Within this block, ``step()`` does not synchronize (call ``synchronize()`` yourself first)."""
        self._gradq_sync = False
        try:
            yield
        finally:
            self._gradq_sync = True

    def step(self, closure=None):  # noqa: ANN001, ANN201
        if self._gradq_sync and not self._gradq_synchronized:
            self.synchronize()
        self._gradq_synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._gradq_synchronized = False
        super(self.__class__, self).zero_grad(set_to_none=set_to_none)


def DistributedOptimizer(  # noqa: N802 - named after hvd.DistributedOptimizer, which it stands in for
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    compressor: str | Compressor = "onebit",
    backward_passes_per_step: int = 1,
    *,
    mode: Mode = "two_phase",
    error_feedback: bool | None = None,
    seed: int = 0,
    **compressor_options: object,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` first averages gradients over Horovod ranks through gradq.

    ``compressor`` is a registered name (with ``compressor_options``) or an instance; ``mode`` is
    ``"two_phase"`` or ``"allgather"``; ``error_feedback`` defaults to the compressor's choice. With
    ``backward_passes_per_step=N`` call ``step()`` after every N backward passes: the gradients summed over
    them are averaged over ranks once.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int):
        raise TypeError("backward_passes_per_step must be an int")
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
    reducer = CompressedAllreduce(compressor, mode=mode, error_feedback=error_feedback, seed=seed, **compressor_options)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_GradqDistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, reducer, backward_passes_per_step)
