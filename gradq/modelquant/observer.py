"""Activation quantizer: observes ranges (calibration, QAT), fixes (scale, zero point), fake-quantizes.

One ``ActQuant`` sits at each quantization point of a prepared model: the output of every quantized
layer, and the input of a layer whose input does not already come from one. Its phases:

- ``"minmax"`` (calibration pass 1): records each batch's min and max; passes ``x`` through unchanged.
- ``"histogram"`` (calibration pass 2): adds ``x`` to a histogram over the pass-1 range; passes ``x``.
- ``None``: in ``train()`` updates the range (moving average of batch min/max, reduced across ranks) or
  uses the learned step (LSQ/PACT), and fake-quantizes with a straight-through gradient; in ``eval()``
  fake-quantizes with the fixed parameters, and refuses to run uncalibrated.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradq.modelquant import distributed
from gradq.modelquant.calibrators import CalibrationStats, get_calibrator, histogram
from gradq.modelquant.learned import learned_fake_quantize
from gradq.quantize import choose_qparams, fake_quantize, quantize
from gradq.scheme import QuantScheme

EMA_MOMENTUM = 0.01
HISTOGRAM_BINS = 2048


class ActQuant(nn.Module):
    """Per-tensor activation quantizer for ``scheme`` with the named calibrator and optional learning."""

    def __init__(
        self, scheme: QuantScheme, calibrator: str, calibrator_options: dict, learn: str | None, name: str
    ) -> None:
        super().__init__()
        self.scheme, self.calibrator, self.learn, self.name = scheme, calibrator, learn, name
        self._calibrator = get_calibrator(calibrator, **calibrator_options)
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("ema_lo", torch.tensor(0.0))
        self.register_buffer("ema_hi", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("calibrated", torch.tensor(False))
        self.step = nn.Parameter(torch.tensor(1.0)) if learn else None
        self.phase: str | None = None
        self.gridded_in_eval = False  # set by an integer layer whose output this is: eval() passes x through
        self._batch_ranges: list[tuple[float, float]] = []
        self._counts: torch.Tensor | None = None
        self._error: str | None = None  # raised on every rank at the next reduction, not on this one alone

    @property
    def needs_histogram(self) -> bool:
        """Whether calibration needs the second (histogram) pass for this quantizer."""
        return self._calibrator.needs_histogram

    @property
    def learned(self) -> bool:
        """True when the step size is a trained parameter (LSQ, or PACT on a ReLU output)."""
        return self.step is not None

    def qparams(self) -> tuple[torch.Tensor, int]:
        """(fp32 scale, integer zero point) in force: the learned step or the calibrated scale."""
        if not bool(self.calibrated):
            raise RuntimeError(
                f"activation quantizer {self.name!r} has no range yet: run gradq.calibrate(model, batches) "
                "or train the model (QAT) before evaluating it"
            )
        if self.learned:
            return self.step.detach().clamp_min(torch.finfo(torch.float32).tiny), int(self.zero_point)
        return self.scale, int(self.zero_point)

    def _set_range(self, lo: float, hi: float) -> None:
        scale, zero_point = choose_qparams(torch.tensor([lo, hi], dtype=torch.float32), self.scheme)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point if zero_point is not None else torch.tensor(0))
        if self.step is not None and not bool(self.calibrated):
            with torch.no_grad():
                self.step.copy_(scale)
        self.calibrated.fill_(True)

    def begin_calibration(self) -> None:
        """Forget earlier batch ranges and histograms (the calibrated parameters stay until finish)."""
        self._batch_ranges, self._counts, self._error = [], None, None

    def finish_minmax(self) -> None:
        """End pass 1: reduce the batch ranges across ranks, set lo/hi and their moving averages."""
        ranges = torch.tensor(self._batch_ranges, dtype=torch.float64).reshape(-1, 2)
        ranges = distributed.reduce_batch_ranges(ranges, self.name, self._error)
        lo, hi = ranges[:, 0], ranges[:, 1]
        ema_lo, ema_hi = float(lo[0]), float(hi[0])
        for b_lo, b_hi in zip(lo[1:].tolist(), hi[1:].tolist(), strict=True):
            ema_lo += EMA_MOMENTUM * (b_lo - ema_lo)
            ema_hi += EMA_MOMENTUM * (b_hi - ema_hi)
        self.lo.fill_(float(lo.min()))
        self.hi.fill_(float(hi.max()))
        self.ema_lo.fill_(ema_lo)
        self.ema_hi.fill_(ema_hi)

    def finish(self) -> None:
        """End calibration: sum histograms across ranks and fix (scale, zero point) from the calibrator."""
        counts = None
        if self.needs_histogram:
            counts = distributed.sum_counts(self._counts, self._error)
        stats = CalibrationStats(
            float(self.lo), float(self.hi), float(self.ema_lo), float(self.ema_hi), counts
        )
        self.calibrated.fill_(False)
        lo, hi = self._calibrator.range(stats, self.scheme)
        self._set_range(lo, hi)
        self.ema_lo.fill_(lo)  # QAT's moving average starts from the calibrated range
        self.ema_hi.fill_(hi)
        self._batch_ranges, self._counts, self._error = [], None, None

    def _observe_training(self, x: torch.Tensor) -> None:
        lo, hi = distributed.reduce_range(*_range(x), self.name)
        if not bool(self.calibrated):
            self.ema_lo.fill_(lo)
            self.ema_hi.fill_(hi)
        else:
            self.ema_lo.add_(EMA_MOMENTUM * (lo - float(self.ema_lo)))
            self.ema_hi.add_(EMA_MOMENTUM * (hi - float(self.ema_hi)))
        self._set_range(float(self.ema_lo), float(self.ema_hi))

    def _record(self, error: str) -> None:
        self._error = self._error or f"activation quantizer {self.name!r}: {error}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.phase == "minmax":
            lo, hi = _range(x)
            if math.isfinite(lo) and math.isfinite(hi):
                self._batch_ranges.append((lo, hi))
            else:
                self._record("saw NaN or Inf (or an empty tensor); calibration needs finite activations")
            return x
        if self.phase == "histogram":
            if self.needs_histogram and self._error is None:
                try:
                    counts = histogram(x.detach(), float(self.lo), float(self.hi), HISTOGRAM_BINS)
                except ValueError as exc:
                    self._record(str(exc))
                    return x
                self._counts = counts if self._counts is None else self._counts + counts
            return x
        if self.training and (self.step is None or not bool(self.calibrated)):
            self._observe_training(x)
        if self.training and self.learned:
            zp = int(self.zero_point)
            return learned_fake_quantize(x, self.step, float(zp), self.scheme.qmin, self.scheme.qmax, rule=self.learn)
        scale, zp = self.qparams()
        if not self.training and self.gridded_in_eval:
            return x  # already s * (q - z): quantizing again would give back the same codes (docs/integer.md)
        zero_point = self.zero_point if self.scheme.has_zero_point else None
        if self.training:
            return fake_quantize(x, self.scheme, scale=scale.detach(), zero_point=zero_point)
        with torch.no_grad():
            qt = quantize(x, self.scheme, scale=scale, zero_point=zero_point)
            return (qt.codes.to(torch.float32) - zp) * scale

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) of ``x`` under the parameters in force, as ``gradq.quantize`` computes them."""
        scale, _ = self.qparams()
        zero_point = self.zero_point if self.scheme.has_zero_point else None
        return quantize(x.detach(), self.scheme, scale=scale, zero_point=zero_point).codes.to(torch.int64)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.scheme.bits}-bit, calibrator={self.calibrator}, learn={self.learn}"


def _range(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of ``x``; NaN for an empty tensor or one holding NaN (inf stays inf): callers check."""
    x = x.detach()
    if x.numel() == 0 or bool(torch.isnan(x).any()):
        return math.nan, math.nan
    return float(x.min()), float(x.max())
