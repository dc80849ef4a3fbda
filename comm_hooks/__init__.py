"""Adapters from gradq's compressed allreduce to communication engines (DDP now; MPI, Horovod next)."""

from comm_hooks.ddp import GradqState, HookStats, TorchTransport, gradq_hook, register

__all__ = ["GradqState", "HookStats", "TorchTransport", "gradq_hook", "register"]
