"""gradq as a DDP communication hook: ``comm_hooks.register(ddp_model, "onebit")``.

The hook returns the bucket's mean gradient. Until ``start_iter`` (and for buckets under ``min_numel``
elements) it is a plain fp32 allreduce; after that the bucket goes through gradq's compressed allreduce.

A bucket's whole reduction (compression, both phases' collectives, decoding) is one job. With
``overlap=True`` (the default, for CPU buckets) the hook hands the job to one background thread per hook
and returns at once, so backward goes on computing the next buckets' gradients meanwhile; DDP waits for
the jobs at the end of backward. Jobs run one at a time in the order DDP hands out buckets, the same on
every rank, so every rank issues its collectives in the same order whatever the timing (PyTorch's
PowerSGD and quantization hooks issue them from future callbacks, and crash on Gloo with several
buckets). ``overlap=False`` runs the job inside the hook call.
"""

import atexit
import datetime
import functools
import json
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradq._backend import uses_triton
from gradq._checks import copy_if_finite, deferred_checks, raise_recorded, selects_on_device
from gradq._validate import check_flag
from gradq.allreduce import CompressedAllreduce, Mode, ring_allreduce_bytes, through_host
from gradq.compressors import Compressor

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchTransport:
    """gradq's :class:`~gradq.allreduce.Transport` over a torch.distributed process group. CUDA payloads go
    over NCCL as they are; over Gloo, which has no CUDA all-to-all, they are staged through host memory."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._stage = dist.get_backend(group) == "gloo"

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """Equal-split all-to-all of a flat uint8 tensor; the result is on ``send``'s device."""
        return through_host(self._all_to_all, send, self._stage)

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        """All-gather of equal-size flat uint8 tensors, concatenated in rank order, on ``send``'s device."""
        return through_host(self._all_gather, send, self._stage)

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received

    def _all_gather(self, send: torch.Tensor) -> torch.Tensor:
        gathered = send.new_empty(self.world_size * send.numel())
        _all_gather_single(gathered, send, group=self.group)
        return gathered


@dataclass
class HookStats:
    """Traffic and time of the hook, per rank. "fp32 bytes" is what a ring allreduce of the same buckets
    in fp32 would send: 2 (W-1) / W x 4 bytes per element."""

    steps: int = 0
    buckets_last_step: int = 0
    bytes_sent_last_step: int = 0
    bytes_sent_total: int = 0
    fp32_bytes_last_step: int = 0
    fp32_bytes_total: int = 0
    codec_seconds_last_step: float = 0.0
    codec_seconds_total: float = 0.0
    _buckets_step: int = 0
    _bytes_step: int = 0
    _fp32_step: int = 0
    _codec_step: float = 0.0

    @property
    def compression_ratio(self) -> float:
        """fp32 allreduce bytes / bytes sent, over the last finished step (0 before the first)."""
        return self.fp32_bytes_last_step / self.bytes_sent_last_step if self.bytes_sent_last_step else 0.0

    def add(self, bytes_sent: int, fp32_bytes: int, codec_seconds: float) -> None:
        """Account one bucket."""
        self._buckets_step += 1
        self._bytes_step += bytes_sent
        self._fp32_step += fp32_bytes
        self._codec_step += codec_seconds

    def end_step(self) -> None:
        """Close the current step's totals."""
        self.steps += 1
        self.buckets_last_step, self._buckets_step = self._buckets_step, 0
        self.bytes_sent_last_step, self.fp32_bytes_last_step = self._bytes_step, self._fp32_step
        self.codec_seconds_last_step = self._codec_step
        self.bytes_sent_total += self._bytes_step
        self.fp32_bytes_total += self._fp32_step
        self.codec_seconds_total += self._codec_step
        self._bytes_step, self._fp32_step, self._codec_step = 0, 0, 0.0

    def as_dict(self) -> dict[str, float]:
        """Public figures, including the compression ratio."""
        figures = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        return {**figures, "compression_ratio": self.compression_ratio}


class GradqState:
    """State of a registered gradq hook: settings, step count, residuals and statistics.

    Checkpoint it with :meth:`state_dict` / :meth:`load_state_dict` (residuals included, process group
    excluded): a resumed run continues exactly as an uninterrupted one. Residuals are keyed by the names of
    a bucket's parameters rather than by bucket index: a new process runs its first iteration with DDP's
    initial buckets (parameters in definition order) and only then rebuilds them (gradient-ready order).
    A bucket whose parameters arrive in another order than the one its residuals were made in is
    reordered into that layout, reduced, and put back, so residuals and random streams line up exactly.
    """

    def __init__(
        self,
        allreduce: CompressedAllreduce,
        *,
        start_iter: int,
        min_numel: int,
        overlap: bool,
        process_group: dist.ProcessGroup | None,
        momentum: float = 0.0,
        parameter_names: dict[int, str],
        parameter_numels: dict[str, int],
        own_group_key: tuple | None = None,
    ) -> None:
        self.allreduce = allreduce
        self.parameter_names = parameter_names
        self.parameter_numels = parameter_numels
        self.layouts: dict[frozenset[str], tuple[str, ...]] = {}
        self.start_iter = start_iter
        self.min_numel = min_numel
        self.momentum = momentum
        self.momenta: dict[tuple[str, ...], torch.Tensor] = {}  # M or m per bucket layout (reduce_bucket)
        self.overlap = overlap
        self.jobs = _JobThread()
        self.process_group = process_group
        self._own_group_key = own_group_key  # set when process_group is the hook's own (see _own_group)
        self.closed = False
        self.transport = TorchTransport(process_group)
        self.iteration = 0
        self.stats = HookStats()
        self._compressed_in_step = False
        self._said_uncompressed = False
        self._recorded_checks: list = []

    def close(self) -> None:
        """Release what the hook holds: its background thread (after the jobs already handed to it) and the
        process group that ``register`` made for it, which goes back to gradq for the next overlapped hook over
        the same ranks (a group the caller passed in is left alone). Call it on every rank of the group, in the
        same order as ``register``. Idempotent. DDP cannot remove a comm hook, so a backward through the model
        after ``close`` raises; register on a new DDP model instead.
        """
        if self.closed:
            return
        self.closed = True
        self.jobs.close()
        if self._own_group_key is not None:
            _release_group(self._own_group_key, self.process_group)
        self.process_group = None

    def bucket_key(self, bucket: dist.GradBucket) -> tuple[str, ...]:
        """The names of ``bucket``'s parameters in bucket order: its identity across steps and processes."""
        return tuple(self.parameter_names[id(p)] for p in bucket.parameters())

    def layout(self, key: tuple[str, ...]) -> tuple[str, ...]:
        """The order in which this set of parameters was first reduced (or checkpointed)."""
        return self.layouts.setdefault(frozenset(key), key)

    def reorder(self, flat: torch.Tensor, source: tuple[str, ...], target: tuple[str, ...]) -> torch.Tensor:
        """``flat`` (parameters concatenated in ``source`` order) with its parameters in ``target`` order."""
        pieces, offset = {}, 0
        for name in source:
            pieces[name] = flat[offset : offset + self.parameter_numels[name]]
            offset += self.parameter_numels[name]
        return torch.cat([pieces[name] for name in target])

    def settings(self) -> dict[str, object]:
        """Everything that must be identical on all ranks."""
        return {**self.allreduce.settings(), "start_iter": self.start_iter, "min_numel": self.min_numel,
                "momentum": self.momentum}

    def state_dict(self) -> dict[str, object]:
        """Picklable state of this rank: settings, rank and world size, iteration, bucket layouts, statistics
        and residuals (on the CPU). Residuals are per rank: save one file per rank."""
        return {
            "settings": self.settings(),
            "rank": self.transport.rank,
            "world_size": self.transport.world_size,
            "iteration": self.iteration,
            "layouts": sorted(self.layouts.values()),
            "stats": asdict(self.stats),
            "residuals": self.allreduce.state_dict(),
            "momenta": [(list(k), v.cpu()) for k, v in sorted(self.momenta.items())],
        }

    def _checkpoint_problem(self, state: dict[str, object]) -> str:
        """Why this rank cannot load ``state`` ('' when it can)."""
        if state["settings"] != self.settings():
            return (f"checkpoint was made with gradq hook settings {state['settings']}, this hook has "
                    f"{self.settings()}; register the same compressor and options before loading")
        world, rank = self.transport.world_size, self.transport.rank
        if "world_size" in state and state["world_size"] != world:
            return (f"the gradq hook checkpoint was made by {state['world_size']} ranks, this job has {world}: "
                    "its residuals are split per rank and cannot be re-chunked; resume with "
                    f"{state['world_size']} ranks, or load only the model and optimizer (the hook then starts "
                    "its error feedback from zero)")
        if "rank" in state and state["rank"] != rank:
            return (f"this gradq hook checkpoint holds rank {state['rank']}'s residuals, loaded on rank {rank}; "
                    "save one file per rank (e.g. f'ckpt{dist.get_rank()}.pt') and load each rank's own")
        return ""

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s output of this same rank. Collective: call it on every rank; if any
        rank's checkpoint does not fit (settings, world size, another rank's file), every rank raises."""
        problem = self._checkpoint_problem(state)
        verdicts: list[str] = [""] * self.transport.world_size
        dist.all_gather_object(verdicts, problem, group=self.process_group)
        bad = [(r, v) for r, v in enumerate(verdicts) if v]
        if bad:
            rank, first = bad[0]
            raise ValueError(first if rank == self.transport.rank else f"rank {rank}: {first}")
        self.iteration = int(state["iteration"])
        self.stats = HookStats(**state["stats"])
        self.layouts = {frozenset(key): tuple(key) for key in state["layouts"]}
        device = "cuda" if dist.get_backend(self.process_group) == "nccl" else "cpu"
        self.allreduce.load_state_dict(state["residuals"], device)
        self.momenta = {tuple(k): v.to(device) for k, v in state.get("momenta", [])}

    def reduce_bucket(self, buffer: torch.Tensor, key: tuple[str, ...], iteration: int, last: bool) -> torch.Tensor:
        """One bucket's job: the mean of ``buffer`` (DDP's flat bucket, overwritten) over the process group.

        With ``momentum`` and error feedback, every rank sends ``momentum * M + buffer``, where M is the
        bucket's previous result, identical on all ranks (1-bit Adam's momentum): the residual carries what
        M's compression missed into the next step. Without error feedback each rank keeps its own exact
        ``m = momentum * m + buffer`` and sends that: a compression error folded into a shared M would be
        fed back every step, and TernGrad's or QSGD's variance makes that grow. NaN/Inf never enter M or m.

        On the Triton kernels (CUDA buckets) nothing here reads the device: the kernels' checks are recorded
        and read once, at the end of the step, and the NaN/Inf rules are device-side selects.
        """
        canonical = self.layout(key)
        with deferred_checks() if uses_triton(buffer) else nullcontext() as got:
            if not self.momentum:
                mean = self._reduce(buffer, key, canonical, iteration)
            elif self.allreduce.error_feedback:
                mean = self._reduce_shared_momentum(buffer, key, canonical, iteration)
            else:
                mean = self._reduce_local_momentum(buffer, key, canonical, iteration)
        self._recorded_checks += got or []
        if last:
            self._end_step(iteration)
        return mean

    def _reduce_shared_momentum(self, buffer: torch.Tensor, key: tuple[str, ...], canonical: tuple[str, ...],
                                iteration: int) -> torch.Tensor:  # fmt: skip
        shared = self.momenta.get(canonical)
        if shared is not None:
            buffer.add_(shared if canonical == key else self.reorder(shared, canonical, key), alpha=self.momentum)
        mean = self._reduce(buffer, key, canonical, iteration)
        ordered = mean if canonical == key else self.reorder(mean, key, canonical)
        if shared is None:  # a NaN/Inf on any rank reaches every rank's mean: M stays 0 then
            shared = self.momenta[canonical] = torch.zeros_like(ordered)
        copy_if_finite(shared, ordered)
        return mean

    def _reduce_local_momentum(self, buffer: torch.Tensor, key: tuple[str, ...], canonical: tuple[str, ...],
                               iteration: int) -> torch.Tensor:  # fmt: skip
        flat = buffer if canonical == key else self.reorder(buffer, key, canonical)
        m = self.momenta.get(canonical)
        if m is None:
            m = self.momenta[canonical] = torch.zeros_like(flat)
        if selects_on_device(buffer):  # the same rule without a host read: a NaN/Inf buffer leaves m alone
            finite = torch.isfinite(flat).all()
            m.copy_(torch.where(finite, m * self.momentum + flat, m))
            send = torch.where(finite, m, flat)
        elif not bool(torch.isfinite(flat).all()):  # passes through, leaving m alone
            send = flat
        else:
            send = m.mul_(self.momentum).add_(flat)
        if canonical == key:  # reduce a copy of m in the bucket itself: m stays this rank's own
            return self._reduce(buffer.copy_(send), key, canonical, iteration)
        send = send.clone() if send is m else send
        return self.reorder(self._reduce(send, canonical, canonical, iteration), canonical, key)

    def _reduce(self, buffer: torch.Tensor, key: tuple[str, ...], canonical: tuple[str, ...], iteration: int
                ) -> torch.Tensor:
        """The mean of ``buffer`` (parameters in ``key`` order, overwritten) over the process group."""
        world = self.transport.world_size
        fp32_bytes = ring_allreduce_bytes(4 * buffer.numel(), world)
        if iteration < self.start_iter or buffer.numel() < self.min_numel:
            dist.all_reduce(buffer, group=self.process_group)
            self.stats.add(ring_allreduce_bytes(buffer.element_size() * buffer.numel(), world), fp32_bytes, 0.0)
            mean = buffer.div_(world)
        else:
            if canonical == key:  # the mean overwrites the bucket in place
                out = self.allreduce(buffer, self.transport, key=key, step=iteration, out=buffer)
                mean = out.mean
            else:
                flat = self.reorder(buffer, key, canonical)
                out = self.allreduce(flat, self.transport, key=canonical, step=iteration, out=flat)
                mean = self.reorder(out.mean, canonical, key)
            self.stats.add(out.bytes_sent, fp32_bytes, out.codec_seconds)
            self._compressed_in_step = True
        return mean

    def _end_step(self, iteration: int) -> None:
        """Close the step's statistics; raise what the step's deferred kernel checks found; say once if
        nothing was compressed because of min_numel."""
        self.stats.end_step()
        raise_recorded(self._recorded_checks)
        if iteration >= self.start_iter and not self._compressed_in_step and not self._said_uncompressed:
            self._said_uncompressed = True
            warnings.warn(
                f"gradq hook: every gradient bucket of this model is below min_numel={self.min_numel} elements, "
                "so each goes through plain fp32 allreduce and nothing is compressed; pass a smaller "
                "min_numel to comm_hooks.register (e.g. min_numel=0) to compress them",
                RuntimeWarning,
                stacklevel=3,
            )
        self._compressed_in_step = False


class _JobThread:
    """A daemon thread that runs submitted jobs one at a time in submission order. Started on the first job;
    it ends on :meth:`close` or when this object is garbage-collected (with the hook state that owns it)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        """Wait for the submitted jobs to finish, then end the thread. Idempotent."""
        if self._thread is not None:
            self._stop()  # the finalizer's call, run now: it runs once
            self._thread.join()
            self._thread = None

    def submit(self, job: Callable[[], torch.Tensor]) -> torch.futures.Future[torch.Tensor]:
        """A future of ``job()``'s result; if the job raises, waiting on the future raises its message (DDP
        raises it from backward)."""
        done: torch.futures.Future[tuple[torch.Tensor | None, BaseException | None]] = torch.futures.Future()
        if self._thread is None:
            self._thread = threading.Thread(target=_run_jobs, args=(self._jobs,), name="gradq-ddp-hook", daemon=True)
            self._thread.start()
            self._stop = weakref.finalize(self, self._jobs.put, None)
        self._jobs.put((job, done))
        # An exception raised in a then() callback marks the chained future failed for C++ waiters too;
        # Future.set_exception would instead hand DDP the exception object as the bucket's value.
        return done.then(_unwrap)


def _run_jobs(jobs: queue.SimpleQueue) -> None:
    while (item := jobs.get()) is not None:
        job, done = item
        try:
            outcome = (job(), None)
        except BaseException as exc:  # noqa: BLE001 - re-raised by _unwrap for whoever waits
            outcome = (None, exc)
        del job, item  # the job holds the hook state: keep no reference to it while waiting for the next one
        done.set_result(outcome)
        del done, outcome


def _unwrap(done: torch.futures.Future) -> torch.Tensor:
    result, exc = done.value()
    if exc is not None:
        raise exc
    return result


# register's rendezvous: every rank of a group calls register in the same order, so (group ranks, call number)
# names one registration; each rank publishes its settings (or its error) in the default store under it.
_register_calls: dict[tuple[int, ...], int] = {}
REGISTER_TIMEOUT_ENV = "GRADQ_REGISTER_TIMEOUT"
REGISTER_TIMEOUT_S = 300.0


def _registration_key(group_ranks: tuple[int, ...], call: int, rank: int) -> str:
    return f"gradq/register/{','.join(map(str, group_ranks))}/{call}/{rank}"


def _publish_registration(group_ranks: tuple[int, ...], call: int, outcome: dict) -> None:
    """Tell the group's other ranks how this rank's register call went (its settings, or its error)."""
    if dist.is_initialized() and dist.get_rank() in group_ranks:
        store = dist.distributed_c10d._get_default_store()
        store.set(_registration_key(group_ranks, call, dist.get_rank()), json.dumps(outcome, default=str))


def _register_timeout() -> datetime.timedelta:
    raw = os.environ.get(REGISTER_TIMEOUT_ENV, str(REGISTER_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{REGISTER_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def _agree_on_registration(group_ranks: tuple[int, ...], call: int, settings: dict) -> None:
    """Wait (at most GRADQ_REGISTER_TIMEOUT seconds, default 300) for every rank of the group to reach this
    register call, before any collective; raise on every rank if one failed or the settings differ."""
    store = dist.distributed_c10d._get_default_store()
    keys = [_registration_key(group_ranks, call, r) for r in group_ranks]
    timeout = _register_timeout()
    try:
        store.wait(keys, timeout)
    except Exception:  # the store's timeout error type differs across torch versions
        missing = [r for r, key in zip(group_ranks, keys, strict=True) if not store.check([key])]
        raise RuntimeError(
            f"comm_hooks.register: ranks {missing} did not reach their register call within "
            f"{timeout.total_seconds():g} s (did they fail before it, or call register in another order?); "
            f"set {REGISTER_TIMEOUT_ENV} to wait longer"
        ) from None
    outcomes = {r: json.loads(store.get(key)) for r, key in zip(group_ranks, keys, strict=True)}
    failed = {r: o["error"] for r, o in outcomes.items() if "error" in o}
    if failed:
        rank, error = next(iter(failed.items()))
        raise RuntimeError(f"comm_hooks.register failed on rank {rank} ({error}); fix it there and register again")
    mine = json.loads(json.dumps(settings, default=str))
    differing = [r for r, o in outcomes.items() if o["settings"] != outcomes[group_ranks[0]]["settings"]]
    if differing:
        raise RuntimeError(
            f"gradq hook settings differ across ranks (ranks {differing} disagree with rank {group_ranks[0]}); "
            f"this rank has {mine}. Use the same compressor, options (overlap included) and gradq version on "
            "every rank."
        )


# Groups of closed hooks, for reuse by later ones: (default group, parent ranks, backend, timeout) -> groups.
# They are not destroyed because a locally synchronized group made after a destroyed one takes its name, and
# so reads the destroyed group's stale rendezvous keys from the store. torch.distributed destroys them with
# the default group; entries made under an earlier default group are dropped. At exit they are dropped
# before the interpreter shuts down: the last reference to a group joins its Gloo threads with the GIL
# released (torch's no-GIL holder), so a thread still dropping a finished collective's tensors can take
# the GIL. Left to interpreter teardown, such a thread dies in pthread_exit and aborts the process.
_spare_groups: dict[tuple, list[dist.ProcessGroup]] = {}
atexit.register(_spare_groups.clear)


def _group_key(group: dist.ProcessGroup | None) -> tuple:
    """What an own group over ``group`` (None: the default group) is made from, and reused by."""
    group = group or dist.group.WORLD
    options = getattr(group._get_backend(torch.device("cpu")), "options", None)
    timeout = getattr(options, "_timeout", None)
    return dist.group.WORLD, tuple(dist.get_process_group_ranks(group)), dist.get_backend(group), timeout


def _own_group(key: tuple) -> dist.ProcessGroup:
    """A process group over the ranks of the group that ``key`` (from ``_group_key``) describes, made by
    them alone, with its backend and timeout, used by no other hook: the overlapped hook's collectives run on
    it, so they never interleave with DDP's own collectives on the user's group (e.g. the unused-parameter
    allreduce of ``find_unused_parameters=True``) in a rank-dependent order. A closed hook's group with the
    same key is reused."""
    for stale in [k for k in _spare_groups if k[0] is not key[0]]:
        del _spare_groups[stale]
    spare = _spare_groups.get(key)
    if spare:
        return spare.pop(0)
    _, ranks, backend, timeout = key
    return dist.new_group(list(ranks), timeout=timeout, backend=backend, use_local_synchronization=True)


def _release_group(key: tuple, group: dist.ProcessGroup) -> None:
    """Hand a closed hook's own group (made by ``_own_group(key)``) back for reuse."""
    if dist.is_initialized() and key[0] is dist.group.WORLD:
        _spare_groups.setdefault(key, []).append(group)


def gradq_hook(state: "GradqState", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean of ``bucket``'s gradients over the process group."""
    if state.closed:
        raise RuntimeError(
            "this model's gradq hook was closed (GradqState.close()) and DDP cannot remove a comm hook; "
            "wrap the module in a new DistributedDataParallel and register gradq on that"
        )
    buffer = bucket.buffer()
    job = functools.partial(state.reduce_bucket, buffer, state.bucket_key(bucket), state.iteration, bucket.is_last())
    if bucket.is_last():
        state.iteration += 1
    if state.overlap:
        return state.jobs.submit(job)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(job())
    return future


def register(
    ddp_model: DistributedDataParallel,
    compressor: str | Compressor = "onebit",
    *,
    mode: Mode = "two_phase",
    start_iter: int = 2,
    min_numel: int = 1024,
    error_feedback: bool | None = None,
    seed: int = 0,
    overlap: bool = True,
    momentum: float = 0.0,
    process_group: dist.ProcessGroup | None = None,
    **compressor_options: object,
) -> GradqState:
    """Register gradq's compressed allreduce as ``ddp_model``'s communication hook; returns its state.

    ``compressor``: a registered name (``gradq.available_compressors()``) with ``compressor_options``, or an
    instance. ``mode``: ``"two_phase"`` (traffic flat in world size) or ``"allgather"``. ``start_iter``
    (>= 1: DDP rebuilds its buckets after iteration 0): plain fp32 allreduce before it. ``min_numel``:
    smaller buckets go uncompressed. ``error_feedback``: default on for onebit (biased but contractive); off
    for terngrad/qsgd, which are unbiased but not contractive, so a residual can grow without bound.
    ``seed`` keys the stochastic compressors' random streams (per rank). ``momentum`` > 0 moves SGD's
    momentum into the hook (use an optimizer without it: ``torch.optim.SGD(..., momentum=0)``); uncompressed,
    the result is exactly SGD's momentum of the mean gradient. With error feedback (onebit) every rank holds
    the same momentum M per bucket, the hook's previous result, and sends ``momentum * M + grad``, as 1-bit
    Adam compresses Adam's momentum: that makes 1-bit converge at momentum 0.9. Without it (terngrad, qsgd)
    each rank sends its own ``m = momentum * m + grad``: fed back through a shared M, their variance would
    grow. NaN/Inf never enter M or m and pass through, so AMP's GradScaler still sees them (benchmarks/RESULTS.md
    has the measurements). ``overlap`` (CPU models): reduce
    buckets on a background thread while backward goes on, over a process group of the hook's own made
    here (same results, bit for bit); a CUDA model's work is already asynchronous on its streams, and runs
    in the hook call. Call ``register`` on every rank of ``process_group``, in the same order, before the first
    backward: the ranks meet there (in the default store, before any collective) and compare every setting,
    so a bad option or a different setting on one rank raises on every rank at once; a rank that does not
    arrive within ``GRADQ_REGISTER_TIMEOUT`` seconds (default 300) makes the others raise.
    ``state.close()`` ends the hook's thread and hands its own process group on to the next overlapped
    hook over the same ranks (for a process that goes on to build more models).
    """
    group_ranks = tuple(dist.get_process_group_ranks(process_group or dist.group.WORLD))
    call = _register_calls.get(group_ranks, 0)
    _register_calls[group_ranks] = call + 1
    try:
        if not isinstance(ddp_model, DistributedDataParallel):
            raise TypeError(
                f"register needs a torch.nn.parallel.DistributedDataParallel model, got {type(ddp_model).__name__}; "
                "wrap the model with DistributedDataParallel first"
            )
        if getattr(ddp_model, "_gradq_state", None) is not None:
            raise RuntimeError("a gradq hook is already registered on this model; DDP allows one comm hook per model")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 1:
            raise ValueError(
                f"start_iter must be an int >= 1 (DDP rebuilds buckets after iteration 0), got {start_iter!r}"
            )
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be an int >= 0, got {min_numel!r}")
        overlap = check_flag("overlap", overlap) and ddp_model.device_type == "cpu"
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        allreduce = CompressedAllreduce(compressor, mode=mode, error_feedback=error_feedback, seed=seed,
                                        **compressor_options)
    except Exception as exc:
        _publish_registration(group_ranks, call, {"error": f"{type(exc).__name__}: {exc}"})
        raise
    settings = {**allreduce.settings(), "start_iter": start_iter, "min_numel": min_numel, "overlap": overlap,
                "momentum": float(momentum)}
    _publish_registration(group_ranks, call, {"settings": settings})
    _agree_on_registration(group_ranks, call, settings)
    own_key = _group_key(process_group) if overlap else None
    state = GradqState(
        allreduce,
        start_iter=start_iter,
        min_numel=min_numel,
        overlap=overlap,
        momentum=float(momentum),
        process_group=_own_group(own_key) if own_key else process_group,
        own_group_key=own_key,
        parameter_names={id(p): name for name, p in ddp_model.module.named_parameters()},
        parameter_numels={name: p.numel() for name, p in ddp_model.module.named_parameters()},
    )
    ddp_model.register_comm_hook(state, gradq_hook)
    ddp_model._gradq_state = state
    return state
