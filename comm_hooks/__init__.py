"""Adapters from gradq's compressed allreduce to engines: the DDP hook (here), ``comm_hooks.mpi``,
``comm_hooks.horovod``, ``comm_hooks.launch`` (torch.distributed from mpirun) and ``comm_hooks.cluster``
(emulated hosts)."""

from comm_hooks.ddp import GradqState, HookStats, TorchTransport, gradq_hook, register

__all__ = ["GradqState", "HookStats", "TorchTransport", "gradq_hook", "register"]
