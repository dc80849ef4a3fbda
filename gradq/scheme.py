"""Quantization schemes: what a code means (docs/quantization.md has the math).

A :class:`QuantScheme` is a small frozen dataclass; one scheme describes both weight quantization for
deployment and gradient codes for the wire. Granularities say which elements share a scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gradq._validate import check_bits, check_int


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerAxis:
    """One scale per index along ``axis`` (per output channel for weights)."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive elements along ``axis`` (which must divide evenly)."""

    group_size: int
    axis: int = -1

    def __post_init__(self) -> None:
        check_int("group_size", self.group_size, lo=1)


@dataclass(frozen=True)
class PerBucket:
    """One scale per ``bucket_size`` consecutive elements of the flattened tensor (last may be short)."""

    bucket_size: int

    def __post_init__(self) -> None:
        check_int("bucket_size", self.bucket_size, lo=1)


Granularity = PerTensor | PerAxis | PerGroup | PerBucket
Rounding = Literal["nearest", "stochastic"]
ScaleFrom = Literal["minmax", "norm", "mean_abs", "rms"]
Codebook = Literal["uniform", "sign", "sign_magnitude"]

_ALLOWED_SCALES = {"uniform": ("minmax", "norm"), "sign": ("mean_abs", "rms"), "sign_magnitude": ("minmax", "norm")}


@dataclass(frozen=True)
class QuantScheme:
    """How values become ``bits``-wide integer codes and back.

    codebook ``uniform``: integer grid, real = scale * (q - zero_point). ``symmetric`` fixes zero_point
    at 0 (signed codes then use the narrow range [-(2**(bits-1) - 1), 2**(bits-1) - 1]); otherwise the
    range [min(x, 0), max(x, 0)] is mapped affinely. ``scale_from``: ``minmax`` (min/max, or max |x| when
    symmetric) or ``norm`` (||x||2, symmetric only; never clips a signed code).

    codebook ``sign``: 1 bit per value, +scale or -scale (0 maps to +scale), scale = mean |x| (``mean_abs``,
    the least-squares scale) or sqrt(mean x^2) rounded up to fp32 and capped at 1.5 mean |x| (``rms``,
    DeepSpeed's 1-bit scale, with which the decoded block keeps the input's l2 norm unless capped; PerTensor
    or PerBucket only; docs/quantization.md).

    codebook ``sign_magnitude``: a sign bit plus a level in [0, levels]; value = ±level * (scale / levels);
    scale = max |x| (``minmax``, lowered to ``clip`` x RMS when ``clip > 0``) or ||x||2 (``norm``);
    stochastic rounding only. TernGrad is levels=1 with max, QSGD is s levels with the norm.
    ``sign`` and ``sign_magnitude`` need PerTensor or PerBucket with a bucket size that is a multiple of 8;
    ``sign`` also takes PerAxis or PerGroup (binary weights: mean |x| per channel or group).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = PerTensor()
    rounding: Rounding = "nearest"
    scale_from: ScaleFrom = "minmax"
    codebook: Codebook = "uniform"
    levels: int | None = None
    clip: float = 0.0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not isinstance(self.granularity, (PerTensor, PerAxis, PerGroup, PerBucket)):
            raise TypeError(f"granularity must be PerTensor, PerAxis, PerGroup or PerBucket, got {self.granularity!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if self.codebook not in _ALLOWED_SCALES:
            raise ValueError(f"codebook must be one of {tuple(_ALLOWED_SCALES)}, got {self.codebook!r}")
        if self.scale_from not in _ALLOWED_SCALES[self.codebook]:
            raise ValueError(
                f"scale_from={self.scale_from!r} does not apply to codebook {self.codebook!r}; "
                f"use one of {_ALLOWED_SCALES[self.codebook]}"
            )
        if self.codebook == "uniform":
            self._check_uniform()
        else:
            self._check_gradient_codebook()

    def _check_uniform(self) -> None:
        if self.levels is not None or self.clip:
            raise ValueError("levels and clip apply to codebook='sign_magnitude' only")
        if self.signed and self.symmetric and self.bits < 2:
            raise ValueError("a signed symmetric uniform scheme needs bits >= 2; use codebook='sign' for 1 bit")
        if self.scale_from == "norm" and not self.symmetric:
            raise ValueError("scale_from='norm' needs symmetric=True")

    def _check_gradient_codebook(self) -> None:
        gran = self.granularity
        if self.codebook == "sign" and isinstance(gran, (PerAxis, PerGroup)):
            if self.scale_from != "mean_abs":
                raise ValueError("binary weights (sign per channel or group) take scale_from='mean_abs', the "
                                 "least-squares scale; 'rms' is for gradient buckets (PerTensor or PerBucket)")
            gran = PerTensor()  # binary weights: mean |x| per channel or group, computed in torch
        if not isinstance(gran, (PerTensor, PerBucket)) or (isinstance(gran, PerBucket) and gran.bucket_size % 8):
            raise ValueError(
                f"codebook {self.codebook!r} needs PerTensor() or PerBucket(n) with n a multiple of 8, "
                f"got {self.granularity!r}"
            )
        if not (self.signed and self.symmetric):
            raise ValueError(f"codebook {self.codebook!r} is signed and symmetric by construction")
        if self.codebook == "sign":
            if self.bits != 1 or self.rounding != "nearest" or self.levels is not None or self.clip:
                raise ValueError("codebook='sign' means bits=1, rounding='nearest', no levels or clip")
            return
        check_int("levels", self.levels, lo=1, hi=127)
        if self.bits != self.levels.bit_length() + 1:
            raise ValueError(
                f"levels={self.levels} needs bits={self.levels.bit_length() + 1} (level bits + sign), got {self.bits}"
            )
        if self.rounding != "stochastic":
            raise ValueError("codebook='sign_magnitude' is unbiased by stochastic rounding: use rounding='stochastic'")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not 0 <= self.clip < float("inf"):
            raise ValueError(f"clip must be a finite number >= 0 (0 disables clipping), got {self.clip!r}")
        if self.clip and self.scale_from != "minmax":
            raise ValueError("clip applies to scale_from='minmax' only")

    @property
    def qmin(self) -> int:
        """Smallest code of a uniform scheme."""
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        """Largest code of a uniform scheme."""
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def has_zero_point(self) -> bool:
        """True for affine uniform schemes, whose payload carries zero points."""
        return self.codebook == "uniform" and not self.symmetric

    @classmethod
    def uniform(
        cls,
        bits: int,
        *,
        signed: bool = True,
        symmetric: bool = True,
        granularity: Granularity = PerTensor(),
        rounding: Rounding = "nearest",
        scale_from: ScaleFrom = "minmax",
    ) -> QuantScheme:
        """A uniform integer scheme."""
        return cls(bits, signed, symmetric, granularity, rounding, scale_from)

    @classmethod
    def sign(cls, bucket_size: int | None = None, scale_from: ScaleFrom = "mean_abs") -> QuantScheme:
        """1-bit sign with scale mean |x| (or with ``scale_from="rms"`` sqrt(mean x^2), capped at 1.5 mean |x|)
        per bucket (or per tensor)."""
        gran = PerTensor() if bucket_size is None else PerBucket(bucket_size)
        return cls(1, granularity=gran, scale_from=scale_from, codebook="sign")

    @classmethod
    def ternary(cls, bucket_size: int | None = None, clip: float = 0.0) -> QuantScheme:
        """TernGrad: {-1, 0, +1} x max |x| (optionally clipped at clip x RMS), stochastic, 2 bits."""
        gran = PerTensor() if bucket_size is None else PerBucket(bucket_size)
        return cls(2, granularity=gran, rounding="stochastic", codebook="sign_magnitude", levels=1, clip=clip)

    @classmethod
    def qsgd(cls, levels: int = 4, bucket_size: int = 512) -> QuantScheme:
        """QSGD: ``levels`` levels of |x| / ||x||2 per bucket, stochastic, plus a sign bit."""
        check_int("levels", levels, lo=1, hi=127)
        return cls(
            levels.bit_length() + 1,
            granularity=PerBucket(bucket_size),
            rounding="stochastic",
            scale_from="norm",
            codebook="sign_magnitude",
            levels=levels,
        )
