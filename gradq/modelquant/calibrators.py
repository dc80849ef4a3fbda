"""Activation-range calibrators for post-training quantization (docs/model_quantization.md, "Calibrators").

An observer collects :class:`CalibrationStats` over calibration batches: the exact min/max, moving averages
of the per-batch min/max and a :func:`histogram`. A :class:`Calibrator`, registered by name, turns them into
the clipping range (lo', hi') that ``gradq.choose_qparams(torch.tensor([lo', hi']), scheme)`` makes qparams of.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from gradq._registry import Registry
from gradq._validate import FLOAT_DTYPES, check_int, check_tensor
from gradq.scheme import QuantScheme

_NONFINITE = "calibration data contained NaN or Inf"
_KL_EPS = 1e-10  # stands in for q = 0 where p > 0 in KL(P || Q)
_HISTOGRAM_CHUNK = 1 << 22  # histogram: values binned per step
_TIE = 1e-12  # scores this close to the minimum (relative for MSE, in nats for KL) are ties: summation order
_KL_BLOCK = 256  # entropy: candidate thresholds per vectorized step (bounds memory to 256 x bins)


def _check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{_NONFINITE} ({name}={value}); find the non-finite inputs or activations")
    return float(value)


def _check_range(lo: object, hi: object) -> tuple[float, float]:
    lo, hi = _check_finite("lo", lo), _check_finite("hi", hi)
    if lo > hi:
        raise ValueError(f"lo must be <= hi, got lo={lo}, hi={hi}")
    return lo, hi


@dataclass(frozen=True)
class CalibrationStats:
    """What an observer collected: the exact ``lo``/``hi`` of all values, the moving averages ``ema_lo`` /
    ``ema_hi`` of the per-batch min/max and, when collected, ``counts``: the float64 :func:`histogram` of all
    values over [lo, hi].

    Checked on construction: finite numbers with lo <= hi (ValueError "calibration data contained NaN or Inf"
    otherwise); counts 1-D float64, finite, >= 0, with a positive total.
    """

    lo: float
    hi: float
    ema_lo: float
    ema_hi: float
    counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_range(self.lo, self.hi)
        _check_finite("ema_lo", self.ema_lo)
        _check_finite("ema_hi", self.ema_hi)
        if self.counts is None:
            return
        check_tensor("counts", self.counts, dtypes=(torch.float64,), dim=1, contiguous=False)
        if not bool(torch.isfinite(self.counts).all()):
            raise ValueError(f"{_NONFINITE}: counts has NaN or Inf")
        if bool((self.counts < 0).any()) or not float(self.counts.sum()) > 0:
            raise ValueError("counts must be >= 0 with a positive total: a histogram of at least one value")


def histogram(x: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """float64 counts (bins,), on x's device, of the values of ``x`` (any shape, float dtype) over [lo, hi].

    With w = (hi - lo) / bins and edges e_i = lo + i*w in float64, bin i holds e_i <= v < e_(i+1); values
    below e_1 go in bin 0 and values >= e_(bins-1) (v == hi, and above hi) in the last bin. lo == hi: all
    values go in bin 0. Deterministic, and exact, so histograms of batches or ranks add. Raises ValueError
    when ``x`` holds NaN or Inf.
    """
    check_tensor("x", x, dtypes=(*FLOAT_DTYPES, torch.float64), contiguous=False)
    lo, hi = _check_range(lo, hi)
    check_int("bins", bins, lo=1)
    values = x.detach().reshape(-1)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{_NONFINITE}: the tensor passed to histogram has NaN or Inf values")
    counts = torch.zeros(bins, dtype=torch.int64, device=values.device)
    if lo == hi:
        counts[0] = values.numel()
        return counts.to(torch.float64)
    edges = lo + torch.arange(1, bins, dtype=torch.float64, device=values.device) * ((hi - lo) / bins)
    for chunk in values.split(_HISTOGRAM_CHUNK):  # bounds the float64 copy and the bin indices
        counts += torch.bincount(torch.bucketize(chunk.to(torch.float64), edges, right=True), minlength=bins)
    return counts.to(torch.float64)


class Calibrator(ABC):
    """Turns :class:`CalibrationStats` into the clipping range (lo', hi') for a uniform ``scheme``.

    :meth:`range` returns Python floats with lo <= lo' <= hi' <= hi, and (lo, hi) when lo == hi. A calibrator
    that ``needs_histogram`` raises ValueError when stats.counts is None.
    """

    name: ClassVar[str]
    needs_histogram: ClassVar[bool]

    @abstractmethod
    def range(self, stats: CalibrationStats, scheme: QuantScheme) -> tuple[float, float]:
        """The range (lo', hi') to quantize with: ``choose_qparams(torch.tensor([lo', hi']), scheme)``."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


_REGISTRY: Registry[Calibrator] = Registry(
    "calibrator", Calibrator, listing="available",
    hint=". Pass one of these names, or register a Calibrator subclass with @register_calibrator",
)


def register_calibrator(cls: type[Calibrator]) -> type[Calibrator]:
    """Class decorator: make ``cls`` available to :func:`get_calibrator` under ``cls.name``."""
    return _REGISTRY.register(cls)


def available_calibrators() -> list[str]:
    """Registered calibrator names."""
    return _REGISTRY.names()


def get_calibrator(name: str | Calibrator, **options: object) -> Calibrator:
    """The calibrator registered as ``name``, built with ``options`` (an instance is returned as is)."""
    return _REGISTRY.get(name, **options)


def _check_call(calibrator: Calibrator, stats: CalibrationStats, scheme: QuantScheme) -> torch.Tensor | None:
    """Check the arguments of ``range``; the histogram as float64 on the CPU when the calibrator needs one."""
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"stats must be CalibrationStats, got {type(stats).__name__}")
    if not isinstance(scheme, QuantScheme) or scheme.codebook != "uniform" or scheme.scale_from != "minmax":
        raise ValueError(f"calibrators are for uniform schemes with scale_from='minmax', got {scheme!r}")
    if not calibrator.needs_histogram:
        return None
    if stats.counts is None:
        raise ValueError(
            f"calibrator {calibrator.name!r} needs a histogram: collect CalibrationStats.counts with histogram()"
        )
    return stats.counts.detach().to("cpu")


def _within(new_lo: float, new_hi: float, lo: float, hi: float) -> tuple[float, float]:
    """(new_lo, new_hi) clamped into [lo, hi] with new_lo <= new_hi."""
    new_lo = min(max(float(new_lo), lo), hi)
    return new_lo, min(max(float(new_hi), new_lo), hi)


def _centers(lo: float, hi: float, bins: int) -> torch.Tensor:
    """Bin centers lo + (b + 1/2) * w of a histogram over [lo, hi], float64."""
    return lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * ((hi - lo) / bins)


@register_calibrator
class MinMax(Calibrator):
    """(lo, hi): the exact range of the calibration data."""

    name = "minmax"
    needs_histogram = False

    def range(self, stats: CalibrationStats, scheme: QuantScheme) -> tuple[float, float]:
        _check_call(self, stats, scheme)
        return float(stats.lo), float(stats.hi)


@register_calibrator
class MovingAverage(Calibrator):
    """(ema_lo, ema_hi): moving averages of the per-batch min/max (Jacob et al. 2018)."""

    name = "moving_average"
    needs_histogram = False

    def range(self, stats: CalibrationStats, scheme: QuantScheme) -> tuple[float, float]:
        _check_call(self, stats, scheme)
        return _within(stats.ema_lo, stats.ema_hi, float(stats.lo), float(stats.hi))


class _HistogramCalibrator(Calibrator):
    """A calibrator computed from the histogram; subclasses implement :meth:`_clip`."""

    needs_histogram = True

    def range(self, stats: CalibrationStats, scheme: QuantScheme) -> tuple[float, float]:
        counts = _check_call(self, stats, scheme)
        lo, hi = float(stats.lo), float(stats.hi)
        if lo == hi:
            return lo, hi
        return _within(*self._clip(counts, lo, hi, scheme), lo, hi)

    @abstractmethod
    def _clip(self, counts: torch.Tensor, lo: float, hi: float, scheme: QuantScheme) -> tuple[float, float]:
        """The range before the final clamp into [lo, hi], from float64 CPU ``counts`` over [lo, hi], lo < hi."""


@register_calibrator
class Percentile(_HistogramCalibrator):
    """Clips the tails beyond the ``percentile``-th percentile (only the upper tail when lo >= 0)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
            raise TypeError(f"percentile must be a number in (50, 100], got {type(percentile).__name__}")
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _clip(self, counts: torch.Tensor, lo: float, hi: float, scheme: QuantScheme) -> tuple[float, float]:
        if self.percentile == 100:
            return lo, hi
        cumulative = torch.cumsum(counts, 0)
        total, width = float(cumulative[-1]), (hi - lo) / counts.numel()

        def quantile(target: float) -> float:  # the smallest x where the cumulative count reaches target > 0
            b = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)))
            before = float(cumulative[b - 1]) if b else 0.0
            return lo + width * (b + (target - before) / float(counts[b]))

        upper = quantile(self.percentile / 100 * total)
        return (lo if lo >= 0 else quantile((100 - self.percentile) / 100 * total)), upper


def _qparams(lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """choose_qparams' scale and zero point for each range [lo_k, hi_k], in float64 (zero point 0 if symmetric)."""
    if scheme.symmetric:
        top = torch.maximum(lo.abs(), hi.abs()) if scheme.signed else hi.clamp(min=0)
        scale = top / scheme.qmax
        return torch.where(scale == 0, 1.0, scale), torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / (scheme.qmax - scheme.qmin)
    scale = torch.where(scale == 0, 1.0, scale)
    return scale, (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax)


@register_calibrator
class MSE(_HistogramCalibrator):
    """The range (k/K * lo, k/K * hi), k = 1..K, whose quantization of the histogram has the least squared error."""

    name = "mse"

    def __init__(self, candidates: int = 100) -> None:
        self.candidates = check_int("candidates", candidates, lo=1)

    def _clip(self, counts: torch.Tensor, lo: float, hi: float, scheme: QuantScheme) -> tuple[float, float]:
        centers = _centers(lo, hi, counts.numel())
        shrink = torch.arange(1, self.candidates + 1, dtype=torch.float64) / self.candidates
        cand_lo, cand_hi = shrink * lo, shrink * hi
        scale, zero_point = (t[:, None] for t in _qparams(cand_lo, cand_hi, scheme))
        codes = (torch.round(centers / scale) + zero_point).clamp(scheme.qmin, scheme.qmax)
        error = ((centers - scale * (codes - zero_point)).square() * counts).sum(1)
        error[(cand_hi < lo) | (cand_lo > hi)] = math.inf  # ranges that miss the data (lo > 0 or hi < 0)
        k = int(torch.nonzero(error <= error.min() * (1 + _TIE))[-1])  # ties: the largest k
        return float(cand_lo[k]), float(cand_hi[k])


def _fold(counts: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, float]:
    """Histogram of |x| for lo < 0, and where it starts: bins of width w from a = max(0, -hi), as many as
    reach max(-lo, hi) (at most len(counts)); source bin b goes to bin floor((|c_b| - a) / w), clamped."""
    width = (hi - lo) / counts.numel()
    start = max(0.0, -hi)
    bins = min(counts.numel(), math.ceil((max(-lo, hi) - start) / width))
    index = torch.floor((_centers(lo, hi, counts.numel()).abs() - start) / width).clamp(0, bins - 1).long()
    return torch.zeros(bins, dtype=torch.float64).index_add_(0, index, counts), start


def _kl_divergences(hist: torch.Tensor, sizes: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) of the TensorRT calibration for each candidate size i in ``sizes`` (levels <= i <= len(hist))."""
    cumulative = torch.cat((hist.new_zeros(1), hist.cumsum(0)))
    nonzero = torch.cat((hist.new_zeros(1), (hist != 0).to(torch.float64).cumsum(0)))
    i = sizes[:, None]
    b = torch.arange(hist.numel())[None]
    merged = i // levels
    chunk = torch.clamp(b // merged, max=levels - 1)
    first = chunk * merged
    end = torch.where(chunk == levels - 1, i, first + merged)
    spread = (cumulative[end] - cumulative[first]) / (nonzero[end] - nonzero[first])
    q = torch.where((b < i) & (hist != 0), spread, 0.0)
    q_total = q.sum(1, keepdim=True)
    q = q / torch.where(q_total > 0, q_total, 1.0)
    p = torch.where(b < i, hist, 0.0) + torch.where(b == i - 1, cumulative[-1] - cumulative[i], 0.0)
    p = p / cumulative[-1]
    terms = p * torch.log(p / torch.where(q > 0, q, _KL_EPS))
    return torch.where(p > 0, terms, 0.0).sum(1)


@register_calibrator
class Entropy(_HistogramCalibrator):
    """The threshold T minimizing KL(P || Q) as in TensorRT (Migacz 2017); range (max(lo, -T), min(hi, T))."""

    name = "entropy"

    def __init__(self, target_bins: int | None = None) -> None:
        self.target_bins = None if target_bins is None else check_int("target_bins", target_bins, lo=1)

    def _clip(self, counts: torch.Tensor, lo: float, hi: float, scheme: QuantScheme) -> tuple[float, float]:
        levels = scheme.qmax - scheme.qmin + 1
        if self.target_bins is not None:
            levels = self.target_bins
        elif lo < 0:
            levels //= 2
        hist, start = (counts, lo) if lo >= 0 else _fold(counts, lo, hi)
        if lo == 0 and hist.numel() > 1:  # the spike of exact zeros of ReLU outputs (pytorch-quantization)
            hist = torch.cat((hist[1:2], hist[1:]))
        if hist.numel() <= levels:
            return lo, hi
        sizes = torch.arange(levels, hist.numel() + 1)
        divergence = torch.cat([_kl_divergences(hist, block, levels) for block in sizes.split(_KL_BLOCK)])
        i = int(sizes[divergence <= divergence.min() + _TIE][0])  # ties: the smallest i
        if i == hist.numel():
            return lo, hi
        threshold = start + i * ((hi - lo) / counts.numel())
        return max(lo, -threshold), min(hi, threshold)
