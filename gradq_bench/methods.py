"""What gradq-bench compares: PyTorch's own DDP communication (the baselines) and gradq's hook.

Every method is attached to a DDP model and then reports, per finished step, the bytes this rank's
collectives carried and the seconds spent compressing. gradq's figures come from its hook statistics.
For PyTorch's hooks the bytes are those of a bandwidth-optimal ring allreduce of what they hand to
allreduce (2 (W-1) / W x message bytes), which is what Gloo's ring sends; the wire counters measure it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks, default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import comm_hooks
from gradq.allreduce import MODES, ring_allreduce_bytes
from gradq.compressors import available_compressors, get_compressor
from gradq_bench.workloads import Workload

FLOOR = "noop"
TORCH_METHODS = {
    FLOOR: "no communication (noop_hook)",
    "fp32": "fp32 allreduce (DDP default)",
    "torch-fp16": "PyTorch fp16_compress_hook",
    "powersgd": "PyTorch PowerSGD rank 1",
}
DEFAULT_METHODS = ("fp32", "torch-fp16", "powersgd", "onebit", "terngrad", "qsgd")
START_ITER = 2  # gradq and PowerSGD run plain allreduce for steps 0 and 1 (DDP rebuilds buckets after step 0)


def known_methods() -> list[str]:
    """Every method name --compressors accepts (gradq ones take :mode and :option=value suffixes)."""
    return [*[m for m in TORCH_METHODS if m != FLOOR], *available_compressors()]


SYNC = "sync"  # method suffix: run the hook's reductions inside the hook call (register(overlap=False))
MOMENTUM = "momentum"  # method suffix: compress the optimizer's momentum (SGD: in the hook; AdamW: CompressedAdamW)
ERROR_FEEDBACK = "error_feedback"  # method option: the hook's (or CompressedAdamW's) error_feedback


@dataclass(frozen=True)
class GradqMethod:
    """A gradq method name, parsed: what :func:`comm_hooks.register` is called with."""

    compressor: str
    mode: str
    overlap: bool
    options: dict[str, int | float | str]
    hook_momentum: bool = False
    error_feedback: bool | None = None  # None: the compressor's default


def _option_value(text: str) -> int | float | str:
    """An option's value: an int, else a float, else the word itself (the compressor checks it)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_gradq_method(name: str) -> GradqMethod:
    """``compressor[:mode][:sync][:momentum][:option=value ...]`` -> :class:`GradqMethod`, e.g.
    ``qsgd:levels=2`` or ``onebit:scale=rms``; ``:momentum`` compresses the ranks' SGD momentum instead of their
    gradients; ``:error_feedback=0`` or ``=1`` overrides the compressor's default error feedback.

    Raises ValueError naming the accepted methods, modes or the compressor's complaint about an option.
    """
    compressor, *suffixes = name.split(":")
    if compressor not in available_compressors():
        raise ValueError(
            f"unknown compressor {name!r}; choose from {', '.join(known_methods())} (gradq ones may add "
            f":{' or :'.join(MODES)}, :{SYNC} and :option=value, e.g. qsgd:levels=2); the no-communication floor "
            "always runs"
        )
    mode, overlap, options, hook_momentum, error_feedback = "two_phase", True, {}, False, None
    for suffix in suffixes:
        key, eq, value = suffix.partition("=")
        if not eq:
            if suffix == SYNC:
                overlap = False
            elif suffix == MOMENTUM:
                hook_momentum = True
            elif suffix in MODES:
                mode = suffix
            else:
                raise ValueError(
                    f"{name!r}: {suffix!r} is neither a mode ({', '.join(MODES)}), {SYNC!r}, {MOMENTUM!r} nor "
                    "option=value"
                )
            continue
        if key == ERROR_FEEDBACK:
            if value not in ("0", "1"):
                raise ValueError(f"{name!r}: {ERROR_FEEDBACK} is 0 or 1, got {value!r}")
            error_feedback = value == "1"
            continue
        options[key] = _option_value(value)
    try:
        get_compressor(compressor, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name!r}: {exc}") from None
    return GradqMethod(compressor, mode, overlap, options, hook_momentum, error_feedback)


def check_method(name: str) -> str:
    """``name`` if it is a method, else ValueError naming the accepted ones."""
    if name not in TORCH_METHODS or name == FLOOR:
        parse_gradq_method(name)
    return name


def describe(name: str) -> str:
    """A short human label for the table."""
    if name in TORCH_METHODS:
        return TORCH_METHODS[name]
    method = parse_gradq_method(name)
    settings = [method.mode.replace("_", "-"), *([] if method.overlap else [SYNC])]
    settings += [MOMENTUM] if method.hook_momentum else []
    settings += [f"{k}={v}" for k, v in method.options.items()]
    if method.error_feedback is not None:
        settings += ["error feedback" if method.error_feedback else "no error feedback"]
    return f"gradq {method.compressor} ({', '.join(settings)})"


def single_bucket(name: str) -> bool:
    """PowerSGD issues collectives from future callbacks and crashes on Gloo with several buckets."""
    return name == "powersgd"


@dataclass
class StepFigures:
    """A method's figures for one finished step: bytes this rank sent, seconds (de)compressing (None: n/a)."""

    bytes_sent: int
    codec_seconds: float | None


class Meter:
    """Attaches a method to a DDP model and builds the workload's optimizer (:attr:`optimizer`); ``step()``
    after each optimizer step gives its :class:`StepFigures`. A ``:momentum`` method compresses the
    optimizer's momentum: SGD's moves into the hook (the optimizer's is then 0), AdamW becomes
    :class:`comm_hooks.CompressedAdamW`."""

    def __init__(self, ddp: DDP, name: str, *, seed: int, workload: Workload) -> None:
        self.name = name
        world = dist.get_world_size()
        numel = sum(p.numel() for p in ddp.module.parameters() if p.requires_grad)
        self._world, self._numel = world, numel
        self.fp32_bytes_per_step = ring_allreduce_bytes(4 * numel, world)
        self._gradq = None
        self._powersgd = None
        self._sent_numel = 0
        method = None if name in TORCH_METHODS else parse_gradq_method(name)
        in_hook = method is not None and method.hook_momentum
        if in_hook and workload.optimizer == "adamw":
            self._gradq = self.optimizer = comm_hooks.CompressedAdamW(
                ddp, lr=workload.lr, weight_decay=workload.weight_decay, warmup_steps=workload.momentum_warmup_steps,
                compressor=method.compressor, mode=method.mode, seed=seed, error_feedback=method.error_feedback,
                **method.options,
            )  # fmt: skip
            return
        self.optimizer = workload.make_optimizer(ddp.parameters(), 0.0 if in_hook else workload.momentum)
        if name == FLOOR:
            ddp.register_comm_hook(None, debugging_hooks.noop_hook)
        elif name == "torch-fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif name == "powersgd":
            self._powersgd = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=START_ITER, random_seed=seed
            )
            ddp.register_comm_hook(self._powersgd, powerSGD_hook.powerSGD_hook)
        elif name != "fp32":
            self._gradq = comm_hooks.register(
                ddp,
                method.compressor,
                mode=method.mode,
                start_iter=START_ITER,
                seed=seed,
                overlap=method.overlap,
                momentum=workload.momentum if in_hook else 0.0,
                error_feedback=method.error_feedback,
                **method.options,
            )

    def step(self) -> StepFigures:
        """Figures of the step that just finished."""
        if self._gradq is not None:
            stats = self._gradq.stats
            return StepFigures(stats.bytes_sent_last_step, stats.codec_seconds_last_step)
        if self.name == FLOOR:
            return StepFigures(0, None)
        if self.name == "torch-fp16":
            return StepFigures(ring_allreduce_bytes(2 * self._numel, self._world), None)
        if self._powersgd is not None:
            sent = self._powersgd.total_numel_after_compression - self._sent_numel
            self._sent_numel = self._powersgd.total_numel_after_compression
            # Before start_powerSGD_iter it allreduces the fp32 buckets and counts nothing.
            return StepFigures(ring_allreduce_bytes(4 * sent, self._world) if sent else self.fp32_bytes_per_step, None)
        return StepFigures(self.fp32_bytes_per_step, None)

    def close(self) -> None:
        """Release the method's resources (a gradq hook's thread and process group); collective."""
        if isinstance(self._gradq, comm_hooks.GradqState):
            self._gradq.close()
