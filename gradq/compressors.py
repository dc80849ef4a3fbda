"""Gradient compressors: a flat float tensor <-> a uint8 payload, registered by name.

A payload holds nothing but the values' encoding (docs/format.md): for the code books, the fp32 scales of
its blocks followed by the packed codes; for the float baselines, the raw little-endian values. Its size is
the pure function ``payload_nbytes(numel)``. Compressors are stateless: error feedback lives in
:class:`gradq.memory.ErrorFeedback`, randomness comes in through ``seed``/``offset``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from gradq import kernels
from gradq._registry import Registry
from gradq._validate import FLOAT_DTYPES, check_block, check_int, check_tensor


class Compressor(ABC):
    """Turns a flat contiguous float tensor into a payload and back.

    ``alignment``: split a tensor into chunks whose lengths are multiples of it, and each chunk compresses
    on its own. ``error_feedback_default``: whether hooks add error feedback unless told otherwise (biased
    compressors need it). ``fused_error_feedback`` is implemented by compressors with a fused kernel.
    """

    name: ClassVar[str]
    alignment: ClassVar[int] = 1
    error_feedback_default: ClassVar[bool] = False

    @abstractmethod
    def compress(self, x: torch.Tensor, *, seed: int = 0, offset: int = 0) -> torch.Tensor:
        """Payload (1-D uint8, ``payload_nbytes(x.numel())`` bytes) of flat float ``x``; x is not mutated."""

    @abstractmethod
    def decompress(
        self, payload: torch.Tensor, numel: int, *, out: torch.Tensor | None = None, accumulate: bool = False
    ) -> torch.Tensor:
        """The fp32 values (numel,) that ``payload`` encodes.

        With ``out`` (1-D contiguous fp32, numel values) they are written there, or added to it when
        ``accumulate`` (out += values, in fp32), and ``out`` is returned.
        """

    @abstractmethod
    def payload_nbytes(self, numel: int) -> int:
        """Exact payload size in bytes for ``numel`` values."""

    def fused_error_feedback(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """Payload of x + residual, updating ``residual`` in one pass; None when there is no fused kernel."""
        return None

    def fused_mean_compress(
        self, payloads: torch.Tensor, numel: int, residual: torch.Tensor | None, *, seed: int = 0, offset: int = 0
    ) -> torch.Tensor | None:
        """Payload of the mean of the W payloads (rows of ``payloads``) plus ``residual`` (updated), in one
        pass; None when there is no fused kernel for this case. Must equal decompress-sum-in-row-order / W,
        then :meth:`fused_error_feedback` (or :meth:`compress` with ``seed`` and ``offset`` without a
        residual)."""
        return None

    def config(self) -> dict[str, object]:
        """Name and options: equal configs give identical payloads (used to check ranks agree)."""
        return {"name": self.name, **vars(self)}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_tensor("x", x, dtypes=FLOAT_DTYPES, dim=1)

    def _check_payload(self, payload: torch.Tensor, numel: int) -> None:
        check_tensor("payload", payload, dtypes=(torch.uint8,), dim=1)
        expected = self.payload_nbytes(numel)
        if payload.numel() != expected:
            raise ValueError(
                f"payload has {payload.numel()} bytes but {self.name} needs {expected} for {numel} values; "
                "were both sides built with the same compressor options?"
            )


_REGISTRY: Registry[Compressor] = Registry("compressor", Compressor)


def register_compressor(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make ``cls`` available to :func:`get_compressor` under ``cls.name``."""
    return _REGISTRY.register(cls)


def available_compressors() -> list[str]:
    """Registered compressor names."""
    return _REGISTRY.names()


def get_compressor(name: str | Compressor, **options: object) -> Compressor:
    """The compressor registered as ``name``, built with ``options`` (an instance is returned as is)."""
    return _REGISTRY.get(name, **options)


class _Cast(Compressor):
    """Raw values in a floating dtype; payload = their little-endian bytes."""

    dtype: ClassVar[torch.dtype]

    def compress(self, x: torch.Tensor, *, seed: int = 0, offset: int = 0) -> torch.Tensor:
        return self._check_input(x).to(self.dtype).contiguous().view(torch.uint8)

    def decompress(
        self, payload: torch.Tensor, numel: int, *, out: torch.Tensor | None = None, accumulate: bool = False
    ) -> torch.Tensor:
        self._check_payload(payload, numel)
        values = payload.view(self.dtype)
        if out is None:
            return values.to(torch.float32)
        return out.add_(values) if accumulate else out.copy_(values)

    def payload_nbytes(self, numel: int) -> int:
        return check_int("numel", numel, lo=0) * self.dtype.itemsize


@register_compressor
class NoCompression(_Cast):
    """fp32 values as they are: the exact baseline."""

    name = "none"
    dtype = torch.float32


@register_compressor
class FP16(_Cast):
    """IEEE half precision (overflows to ±inf above 65504, like PyTorch's fp16 hook)."""

    name = "fp16"
    dtype = torch.float16


@register_compressor
class BF16(_Cast):
    """bfloat16: fp32's range with 8 bits of mantissa."""

    name = "bf16"
    dtype = torch.bfloat16


class _Blocked(Compressor):
    """Payload = fp32 scale per block of ``block`` elements, then the packed codes."""

    alignment = 8
    bits: int

    def __init__(self, block: int) -> None:
        self.block = check_block(block)

    def payload_nbytes(self, numel: int) -> int:
        return self._scale_nbytes(check_int("numel", numel, lo=0)) + self._packed_nbytes(numel)

    def _scale_nbytes(self, numel: int) -> int:
        return 4 * -(-numel // self.block)

    def _packed_nbytes(self, numel: int) -> int:
        return kernels.packed_nbytes(numel, self.bits)

    def _join(self, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return torch.cat((scales.view(torch.uint8), packed))

    def _split(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_payload(payload, numel)
        nscale_bytes = self._scale_nbytes(numel)
        return payload[nscale_bytes:], payload[:nscale_bytes].clone().view(torch.float32)

    def _split_rows(self, payloads: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """W payloads (rows) as contiguous (packed rows, fp32 scale rows)."""
        for row in payloads:
            self._check_payload(row, numel)
        nscale_bytes = self._scale_nbytes(numel)
        # fresh copies: a one-row slice counts as contiguous with its parent's row stride, which a byte ->
        # fp32 view rejects unless it is a multiple of 4 (the world-size-1 case)
        scales = payloads[:, :nscale_bytes].clone(memory_format=torch.contiguous_format)
        return payloads[:, nscale_bytes:].contiguous(), scales.view(torch.float32)

    def _as_fp32(self, x: torch.Tensor) -> torch.Tensor:
        return self._check_input(x).to(torch.float32)


ONEBIT_SCALES = ("mean", "rms")


@register_compressor
class OneBit(_Blocked):
    """1-bit sign per value and one scale per block: ``scale="rms"`` (default), sqrt(mean x^2) rounded up to
    fp32 and capped at 1.5 mean |x|, DeepSpeed's choice, with which the decoded block keeps the l2 norm of x
    unless capped (the cap keeps error feedback contracting on sparse blocks, docs/quantization.md); or
    ``scale="mean"``, mean |x|, the scale minimizing ||x - s sign(x)||2. The payload is the same either way
    (:class:`QuantScheme.sign` with ``scale_from="rms"`` or ``"mean_abs"``).

    Biased, so hooks pair it with error feedback by default (Seide et al. 2014; Karimireddy et al. 2019).
    """

    name = "onebit"
    bits = 1
    error_feedback_default = True

    def __init__(self, block: int = 512, scale: str = "rms") -> None:
        super().__init__(block)
        if scale not in ONEBIT_SCALES:
            raise ValueError(f"onebit's scale is one of {', '.join(map(repr, ONEBIT_SCALES))}, got {scale!r}")
        self.scale = scale

    def compress(self, x: torch.Tensor, *, seed: int = 0, offset: int = 0) -> torch.Tensor:
        return self._sign(x, None)

    def fused_error_feedback(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._sign(x, residual)

    def _sign(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        rms = self.scale == "rms"
        return self._join(*kernels.sign_compress(self._as_fp32(x), residual, block=self.block, rms=rms))

    def decompress(
        self, payload: torch.Tensor, numel: int, *, out: torch.Tensor | None = None, accumulate: bool = False
    ) -> torch.Tensor:
        packed, scales = self._split(payload, numel)
        return kernels.sign_decompress(packed, scales, block=self.block, numel=numel, out=out, accumulate=accumulate)

    def fused_mean_compress(
        self, payloads: torch.Tensor, numel: int, residual: torch.Tensor | None, *, seed: int = 0, offset: int = 0
    ) -> torch.Tensor:
        packed_rows, scale_rows = self._split_rows(payloads, numel)
        rms = self.scale == "rms"
        return self._join(
            *kernels.sign_mean_compress(packed_rows, scale_rows, residual, block=self.block, numel=numel, rms=rms)
        )


class _SignMagnitude(_Blocked):
    levels: int
    rule: str
    clip: float
    escape: bool = False

    def _packed_nbytes(self, numel: int) -> int:
        return kernels.signmag_packed_nbytes(numel, self.levels, self.block, escape=self.escape)

    def _code(self, seed: int, offset: int) -> dict[str, object]:
        """Keyword arguments of the sign-magnitude compress kernels for this code and random stream."""
        return {"levels": self.levels, "block": self.block, "rule": self.rule, "seed": seed, "offset": offset,
                "clip": self.clip, "escape": self.escape}  # fmt: skip

    def compress(self, x: torch.Tensor, *, seed: int = 0, offset: int = 0) -> torch.Tensor:
        return self._join(*kernels.signmag_compress(self._as_fp32(x), **self._code(seed, offset)))

    def decompress(
        self, payload: torch.Tensor, numel: int, *, out: torch.Tensor | None = None, accumulate: bool = False
    ) -> torch.Tensor:
        packed, scales = self._split(payload, numel)
        return kernels.signmag_decompress(
            packed,
            scales,
            levels=self.levels,
            block=self.block,
            numel=numel,
            out=out,
            accumulate=accumulate,
            escape=self.escape,
        )

    def fused_mean_compress(
        self, payloads: torch.Tensor, numel: int, residual: torch.Tensor | None, *, seed: int = 0, offset: int = 0
    ) -> torch.Tensor | None:
        if residual is not None:  # error feedback (off by default here) takes the unfused path
            return None
        rows = self._split_rows(payloads, numel)
        return self._join(*kernels.signmag_mean_compress(*rows, numel=numel, **self._code(seed, offset)))


@register_compressor
class TernGrad(_SignMagnitude):
    """TernGrad (Wen et al. 2017): {-1, 0, +1} x scale per block, stochastic; 2 bits per value, plus an
    fp32 scale per block of 512 (1/15.5 of fp32).

    The scale is max |x| of the block, lowered to ``clip`` x its RMS when that is smaller: the paper's
    gradient clipping at 2.5 standard deviations, the default. It cuts the variance (about 10x on real
    gradients) at the price of a bias on the clipped values; on Fashion-MNIST at momentum 0.9 it lifts
    compressed-gradient training from 73.6% to 87.2% (fp32: 87.3%). ``clip=0`` gives max |x|, unbiased:
    the better choice with the momentum in the hook (88.5% against 84.8% clipped; benchmarks/RESULTS.md).
    Blocks of 512 rather than one scale per 65536 values: a long block spans layers whose gradients
    differ 3-26x in RMS, and one clip for all of them shrinks the expected update of the steep layers'
    weights to 0.2-0.5 of their gradient (0.7-0.8 in blocks of 512; benchmarks/terngrad_block.py). On
    ``gradq-bench --workload fmnist`` over 10 seeds, 512 ended 0.3 point under fp32, 65536 1.2 points.
    """

    name = "terngrad"
    bits = 2
    levels = 1
    rule = "absmax"

    def __init__(self, block: int = 512, clip: float = 2.5) -> None:
        super().__init__(block)
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 <= clip < float("inf"):
            raise ValueError(f"clip must be a finite number >= 0 (0 disables clipping), got {clip!r}")
        self.clip = float(clip)


@register_compressor
class QSGD(_SignMagnitude):
    """QSGD (Alistarh et al. 2017): ``levels`` levels of |x| / ||x||2 per block, stochastic, unbiased.

    Packed with whichever fixed-size code is smaller for (levels, block): bit_length(levels) + 1 bits
    per value, or the escape code (2 bits per value, plus room for the at most levels**2 values of a
    block at level >= 2). The default 7 levels in blocks of 512 take 2.5 bits per value with the scales
    (1/12.8 of fp32), where the plain code takes 4.06. 7 rather than the 4 of QuantScheme.qsgd: with the
    compressed momentum of CompressedAdamW on ``gradq-bench --workload charlm`` 4 levels ended 2.5% above
    fp32's perplexity (2 seeds), 7 levels 0.3% below (benchmarks/RESULTS.md); QSGD's variance bound
    sqrt(block) / levels is 5.7 at 4 levels, 3.2 at 7.
    """

    name = "qsgd"
    rule = "l2"
    clip = 0.0

    def __init__(self, levels: int = 7, block: int = 512) -> None:
        self.bits = kernels.signmag_bits(levels)
        self.levels = levels
        super().__init__(block)
        plain = kernels.signmag_packed_nbytes(block, levels, block)
        self.escape = kernels.signmag_packed_nbytes(block, levels, block, escape=True) < plain

    def config(self) -> dict[str, object]:
        return {"name": self.name, "levels": self.levels, "block": self.block}

    def __repr__(self) -> str:
        return f"QSGD(levels={self.levels}, block={self.block})"
