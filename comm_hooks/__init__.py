"""Adapters from gradq's compressed allreduce to engines: the DDP hook (here), ``comm_hooks.mpi``,
``comm_hooks.horovod``, ``comm_hooks.launch`` (torch.distributed from mpirun) and ``comm_hooks.cluster``
(emulated hosts).

Every engine's entry point is importable from here: ``register`` (DDP), ``CompressedAdamW`` (1-bit Adam
on DDP: the momentum compressed instead of the gradient), ``init_from_mpi`` and
``find_mpirun`` (launch), and, loaded on first use because they import mpi4py or Horovod,
``mpi_allreduce``/``MPIState`` (``comm_hooks.mpi``) and ``HorovodDistributedOptimizer``
(``comm_hooks.horovod.DistributedOptimizer``).
"""

import importlib

from comm_hooks.compressed_adam import CompressedAdamW
from comm_hooks.ddp import GradqState, HookStats, TorchTransport, gradq_hook, register
from comm_hooks.launch import find_mpirun, init_from_mpi

_LAZY = {
    "mpi_allreduce": ("comm_hooks.mpi", "allreduce"),
    "MPIState": ("comm_hooks.mpi", "MPIState"),
    "HorovodDistributedOptimizer": ("comm_hooks.horovod", "DistributedOptimizer"),
}

__all__ = ["CompressedAdamW", "GradqState", "HookStats", "TorchTransport", "find_mpirun", "gradq_hook",
           "init_from_mpi", "register", *_LAZY]


def __getattr__(name: str) -> object:
    """The engine entry points that need mpi4py or Horovod, imported when first asked for."""
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'comm_hooks' has no attribute {name!r}")
