"""Compressed allreduce (the mean over ranks) over any engine that can all-to-all and all-gather bytes.

Two-phase (DeepSpeed's 1-bit scheme, for any compressor): the tensor is zero-padded and split into W
equal chunks; every rank compresses each chunk (worker error feedback), all-to-all sends chunk c to
rank c; rank c decompresses the W versions, averages them in rank order, adds its server residual and
re-compresses; all-gather; every rank decompresses all W chunks. Each rank sends 2 (W-1) chunk payloads,
about 2 (W-1) / W of one full payload: flat in W.

Allgather: every rank sends its whole payload to every other ((W-1) payloads, growing with W), then
decompresses and averages the W of them locally.

Engines plug in through :class:`Transport`; ``comm_hooks`` holds the ones for torch.distributed and MPI.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from gradq._validate import check_int
from gradq._version import __version__
from gradq.compressors import Compressor, get_compressor
from gradq.memory import ErrorFeedback
from gradq.payload import FORMAT_VERSION

Mode = Literal["two_phase", "allgather"]
MODES = ("two_phase", "allgather")
_MASK64 = 2**64 - 1


class Transport(Protocol):
    """Collectives on flat uint8 tensors among ``world_size`` ranks; every rank calls them in the same order."""

    world_size: int
    rank: int

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """Split ``send`` in W equal parts, send part j to rank j; returns the W received parts in rank order."""

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        """Concatenation in rank order of every rank's ``send`` (all of the same size)."""


def through_host(collective: Callable[[torch.Tensor], torch.Tensor], send: torch.Tensor, stage: bool) -> torch.Tensor:
    """``collective(send)``; with ``stage`` and ``send`` on a device, run on a host copy of it and the result
    moved back to that device: how a Transport whose engine has no device collectives takes GPU payloads."""
    if not stage or send.device.type == "cpu":
        return collective(send)
    return collective(send.cpu()).to(send.device)


@dataclass(frozen=True)
class ReduceResult:
    """Mean over ranks (the input's dtype and shape), bytes this rank sent, seconds spent (de)compressing."""

    mean: torch.Tensor
    bytes_sent: int
    codec_seconds: float


def ensure_same_settings(settings: dict[str, object], gather: Callable[[str], list[str]], what: str) -> None:
    """Collective: raise on every rank unless all ranks have equal ``settings``.

    ``gather`` is the engine's all-gather of one string per rank (in rank order); ``what`` names the
    engine in the message.
    """
    text = json.dumps(settings, sort_keys=True, default=str)
    digests = gather(hashlib.sha256(text.encode()).hexdigest())
    differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        raise RuntimeError(
            f"gradq {what} settings differ across ranks (ranks {differing} disagree with rank 0); this rank has "
            f"{text}. Use the same compressor, options and gradq version on every rank."
        )


def ring_allreduce_bytes(message_bytes: int, world: int) -> int:
    """Bytes one rank sends in a bandwidth-optimal ring allreduce of ``message_bytes``: 2 (W-1) / W of them."""
    return 2 * (world - 1) * message_bytes // world


def rank_seed(seed: int, rank: int) -> int:
    """Philox key of ``rank``: distinct per rank, reproducible from ``seed``."""
    return (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + 1) & _MASK64


def stream_id(key: Hashable) -> int:
    """A 20-bit id of ``key`` that every process computes alike (Python's hash() is salted per process)."""
    return zlib.crc32(repr(key).encode()) & 0xFFFFF


def stream_offset(step: int, key: Hashable, chunk: int, phase: int) -> int:
    """Philox stream of one compression, distinct per (step, key, chunk < 2**10, phase < 2)."""
    return (((step << 20 | stream_id(key)) << 10 | chunk) << 1 | phase) & _MASK64


def _zero_padded(x: torch.Tensor, length: int) -> torch.Tensor:
    padded = torch.zeros(length, dtype=torch.float32, device=x.device)
    padded[: x.numel()] = x
    return padded


class CompressedAllreduce:
    """The mean of a flat tensor over ranks, sent compressed; holds the error-feedback memories.

    ``compressor`` is a registered name (built with ``compressor_options``) or an instance; ``mode`` is
    ``"two_phase"`` or ``"allgather"``; ``error_feedback`` defaults to the compressor's choice (on for
    onebit); ``seed`` (< 2**64) keys the stochastic compressors' per-rank random streams. ``key``
    (hashable with a stable repr, e.g. the names of a bucket's parameters) names the tensor across steps:
    residuals are kept per key. ``step`` picks fresh random streams.
    """

    def __init__(
        self,
        compressor: str | Compressor,
        *,
        mode: Mode = "two_phase",
        error_feedback: bool | None = None,
        seed: int = 0,
        **compressor_options: object,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.compressor = get_compressor(compressor, **compressor_options)
        self.mode = mode
        self.error_feedback = self.compressor.error_feedback_default if error_feedback is None else bool(error_feedback)
        self.seed = check_int("seed", seed, lo=0, hi=_MASK64)
        self.worker_memory = ErrorFeedback()
        self.server_memory = ErrorFeedback()

    def __call__(
        self,
        x: torch.Tensor,
        transport: Transport,
        *,
        key: Hashable,
        step: int,
        out: torch.Tensor | None = None,
    ) -> ReduceResult:
        """Mean of the 1-D contiguous tensor ``x`` over all ranks of ``transport``.

        The mean is written into ``out`` when given (same shape and dtype as x; it may be x itself, which
        is read completely before it is written), else into a new tensor.
        """
        if x.dim() != 1 or not x.is_contiguous():
            raise ValueError(f"x must be 1-D and contiguous, got shape {tuple(x.shape)}")
        if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
            raise ValueError("out must match x in shape, dtype and device")
        if x.numel() == 0:
            return ReduceResult(x.clone() if out is None else out, 0, 0.0)
        src = x if x.dtype == torch.float32 else x.to(torch.float32)
        reduce = self._two_phase if self.mode == "two_phase" else self._allgather
        mean, sent, codec = reduce(src, transport, key, step, out if out is not None and src is x else None)
        if out is not None and mean is not out:
            out.copy_(mean)
            mean = out
        return ReduceResult(mean if mean.dtype == x.dtype else mean.to(x.dtype), sent, codec)

    def _compress(self, memory: ErrorFeedback, x: torch.Tensor, key: Hashable, seed: int, offset: int) -> torch.Tensor:
        if self.error_feedback:
            return memory.compress(self.compressor, x, key, seed=seed, offset=offset)
        return self.compressor.compress(x, seed=seed, offset=offset)

    def _mean_of_payloads(self, payloads: torch.Tensor, world: int, numel: int, out: torch.Tensor) -> torch.Tensor:
        """Decode the W payloads into ``out``, summed in rank order, then divided by W."""
        parts = payloads.view(world, -1)
        self.compressor.decompress(parts[0], numel, out=out)
        for part in parts[1:]:
            self.compressor.decompress(part, numel, out=out, accumulate=True)
        return out.div_(world)

    def _two_phase(
        self, x: torch.Tensor, transport: Transport, key: Hashable, step: int, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, int, float]:
        world, rank, n = transport.world_size, transport.rank, x.numel()
        align = self.compressor.alignment
        chunk = -(-n // (world * align)) * align
        bounds = [(c * chunk, min((c + 1) * chunk, n)) for c in range(world)]
        seed = rank_seed(self.seed, rank)

        start = time.perf_counter()
        payloads = []
        for c, (lo, hi) in enumerate(bounds):
            piece = x[lo:hi] if hi - lo == chunk else _zero_padded(x[lo : max(lo, hi)], chunk)
            payloads.append(self._compress(self.worker_memory, piece, (key, c), seed, stream_offset(step, key, c, 0)))
        send = torch.cat(payloads)
        codec = time.perf_counter() - start
        received = transport.all_to_all(send)

        start = time.perf_counter()
        residual = self.server_memory.residual(key, (chunk,), x.device) if self.error_feedback else None
        offset = stream_offset(step, key, rank, 1)
        reply = self.compressor.fused_mean_compress(received.view(world, -1), chunk, residual, seed=seed, offset=offset)
        if reply is None:
            mine = self._mean_of_payloads(received, world, chunk, torch.empty(chunk, device=x.device))
            reply = self._compress(self.server_memory, mine, key, seed, offset)
        codec += time.perf_counter() - start
        gathered = transport.all_gather(reply).view(world, -1)

        start = time.perf_counter()
        result = out if out is not None else torch.empty(n, device=x.device)
        for part, (lo, hi) in zip(gathered, bounds, strict=True):
            if hi - lo == chunk:
                self.compressor.decompress(part, chunk, out=result[lo:hi])
            elif hi > lo:
                result[lo:hi] = self.compressor.decompress(part, chunk)[: hi - lo]
        codec += time.perf_counter() - start
        return result, 2 * (world - 1) * reply.numel(), codec

    def _allgather(
        self, x: torch.Tensor, transport: Transport, key: Hashable, step: int, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, int, float]:
        world = transport.world_size
        start = time.perf_counter()
        seed = rank_seed(self.seed, transport.rank)
        payload = self._compress(self.worker_memory, x, key, seed, stream_offset(step, key, 0, 0))
        codec = time.perf_counter() - start
        gathered = transport.all_gather(payload)
        start = time.perf_counter()
        result = out if out is not None else torch.empty(x.numel(), device=x.device)
        self._mean_of_payloads(gathered, world, x.numel(), result)
        codec += time.perf_counter() - start
        return result, (world - 1) * payload.numel(), codec

    def settings(self) -> dict[str, object]:
        """What must be identical on all ranks for the payloads to mean the same thing."""
        return {
            "gradq": __version__,
            "format": FORMAT_VERSION,
            "compressor": self.compressor.config(),
            "mode": self.mode,
            "error_feedback": self.error_feedback,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, object]:
        """Residuals of both memories (CPU copies)."""
        return {"worker": self.worker_memory.state_dict(), "server": self.server_memory.state_dict()}

    def load_state_dict(self, state: dict[str, object], device: torch.device | str = "cpu") -> None:
        """Restore the residuals saved by :meth:`state_dict`."""
        self.worker_memory.load_state_dict(state["worker"], device)
        self.server_memory.load_state_dict(state["server"], device)
