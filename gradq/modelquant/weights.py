"""Weight quantization of a layer (docs/integer.md, section 2): scales, two-level group scales, integer
weights, and the fake-quantized weights QAT trains through."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradq.modelquant.learned import learned_fake_quantize
from gradq.quantize import QTensor, quantize
from gradq.scheme import PerAxis, PerGroup, PerTensor, QuantScheme

SUB_SCALE_MAX = 255
_MSE_STEPS = 100


def _rows(w2: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """(C, K) weights as (C, G, K/G) blocks that share a scale (G = 1 unless per group; per tensor: (1, 1, C*K))."""
    gran = scheme.granularity
    if isinstance(gran, PerTensor):
        return w2.reshape(1, 1, -1)
    if isinstance(gran, PerGroup):
        return w2.reshape(w2.shape[0], -1, gran.group_size)
    return w2.unsqueeze(1)


def _uniform_error(blocks: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    q = torch.round(blocks / scale.unsqueeze(-1)).clamp(-qmax, qmax)
    return (q * scale.unsqueeze(-1) - blocks).square().sum(-1)


def block_scales(w2: torch.Tensor, scheme: QuantScheme, weight_range: str) -> torch.Tensor:
    """fp32 scale of each block of :func:`_rows` (shape (C, G), or (1, 1) per tensor).

    sign: mean |w| (float64 mean). uniform minmax: max |w| / qmax; mse: the ratio t/100 (t = 1..100) of
    max |w| / qmax with the least squared error, ties to the larger t. An all-zero block gets scale 1.
    """
    blocks = _rows(w2.detach().to(torch.float32), scheme)
    if scheme.codebook == "sign":
        return _sign_blocks(blocks).scale.reshape(blocks.shape[:2])
    qmax = scheme.qmax
    top = blocks.abs().amax(-1) / qmax
    top = torch.where(top == 0, torch.ones_like(top), top)
    if weight_range == "minmax":
        return top
    best, best_err = top, _uniform_error(blocks, top, qmax)
    for t in range(_MSE_STEPS - 1, 0, -1):
        cand = top * (t / _MSE_STEPS)
        err = _uniform_error(blocks, cand, qmax)
        better = err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return best


def two_level(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group scales (C, G) -> channel scale S (C,), 8-bit sub-scales r (C, G) int64 and the groups'
    effective scales fp32(S * r) / 255 (C, G). A channel whose scales are all 0 keeps S = 0, r = 1."""
    top = scales.amax(1)
    safe = torch.where(top == 0, torch.ones_like(top), top)
    r = torch.ceil(SUB_SCALE_MAX * scales / safe.unsqueeze(1)).clamp(1, SUB_SCALE_MAX).to(torch.int64)
    effective = (top.unsqueeze(1) * r.to(torch.float32)) / SUB_SCALE_MAX
    return top, r, effective


def _sign_blocks(blocks: torch.Tensor) -> QTensor:
    """The core's sign code book with one mean |w| per block (row of the flattened blocks)."""
    flat = blocks.reshape(-1, blocks.shape[-1])
    return quantize(flat, QuantScheme(1, granularity=PerAxis(0), scale_from="mean_abs", codebook="sign"))


def _codes(w2: torch.Tensor, scheme: QuantScheme, effective: torch.Tensor) -> torch.Tensor:
    """Integer codes (C, K) int64 of the weights under per-block ``effective`` scales (C, G); sign: +1/-1."""
    blocks = _rows(w2.detach().to(torch.float32), scheme)
    if scheme.codebook == "sign":
        return (1 - 2 * _sign_blocks(blocks).codes.to(torch.int64)).reshape(w2.shape)
    flat = blocks.reshape(-1, blocks.shape[-1])
    rows_scheme = QuantScheme.uniform(scheme.bits, granularity=PerAxis(0))
    codes = quantize(flat, rows_scheme, scale=effective.reshape(-1)).codes
    return codes.to(torch.int64).reshape(w2.shape)


class WeightQuantizer(nn.Module):
    """Quantizes one layer's weight (any shape whose dim 0 is the output channel) under ``scheme``.

    ``learn=True`` (LSQ) holds the block scales as a parameter ``step`` (initialized from the range rule
    when :meth:`init_step` runs); otherwise scales follow the current weight through ``weight_range``.
    """

    def __init__(self, scheme: QuantScheme, weight_range: str, weight_shape: torch.Size, learn: bool) -> None:
        super().__init__()
        self.scheme, self.weight_range = scheme, weight_range
        channels, reduction = weight_shape[0], math.prod(weight_shape[1:])
        gran = scheme.granularity
        if isinstance(gran, PerGroup) and reduction % gran.group_size:
            raise ValueError(
                f"PerGroup({gran.group_size}) needs the reduction length ({reduction}) to be a multiple of it; "
                "choose a group size that divides it, or per-channel weights for this layer"
            )
        groups = reduction // gran.group_size if isinstance(gran, PerGroup) else 1
        shape = (1, 1) if isinstance(gran, PerTensor) else (channels, groups)
        self.step = nn.Parameter(torch.ones(shape)) if learn else None

    def init_step(self, weight: torch.Tensor) -> None:
        """Set the learned step sizes from the weight range rule (LSQ's initialization here)."""
        if self.step is not None:
            with torch.no_grad():
                self.step.copy_(block_scales(self._2d(weight), self.scheme, self.weight_range))

    @staticmethod
    def _2d(weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _scales(self, w2: torch.Tensor) -> torch.Tensor:
        if self.step is not None:
            return self.step.detach().clamp_min(torch.finfo(torch.float32).tiny)
        return block_scales(w2, self.scheme, self.weight_range)

    def _effective(self, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(channel scale sw (C,) or (1,), sub-scales r or None, effective block scales)."""
        if isinstance(self.scheme.granularity, PerGroup):
            top, r, effective = two_level(scales)
            return top / SUB_SCALE_MAX, r, effective
        return scales.reshape(-1), None, scales

    def stored(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """What the integer model stores: codes q (C, K) int64 (sign: +1/-1), 8-bit sub-scales r (C, G) int64
        or None, scales sw fp32 (C,), and the mask (C,) of channels whose scale was 0 (binary weights that
        are all 0), which compute as Wi = 0 with scale 1: the same zero weights."""
        return self._stored(self._2d(weight))[:4]

    def _stored(self, w2: torch.Tensor) -> tuple:
        """:meth:`stored` of the (C, K) weights, and the effective block scales it used."""
        sw, r, effective = self._effective(self._scales(w2))
        q = _codes(w2, self.scheme, effective)
        sw = sw.expand(w2.shape[0]).contiguous()
        zero = sw == 0
        return q, r, torch.where(zero, torch.ones_like(sw), sw), zero, effective

    def integer(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Wi, sw)``: integer weights (C, K) int64 (``r * q`` per group) and fp32 scales (C,)."""
        q, r, sw, zero = self.stored(weight)
        return integer_weights(q, r, zero, self.scheme), sw

    def dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        """fp32(fp64(sw) * Wi) in ``weight``'s shape: the value every path (eval, convert) computes with."""
        wi, sw = self.integer(weight)
        return dequantized_weight(wi, sw, weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight for training: the value of :meth:`dequantized`, gradients by the STE
        (uniform: zero where a code was clipped; sign: identity) or by LSQ for ``step``."""
        w2 = self._2d(weight)
        tiny = torch.finfo(torch.float32).tiny
        if self.step is not None and isinstance(self.scheme.granularity, (PerAxis, PerTensor)):
            step = self.step.clamp_min(tiny)
            out = learned_fake_quantize(_rows(w2, self.scheme), step.unsqueeze(-1), 0.0, -self.scheme.qmax,
                                        self.scheme.qmax)
            return out.reshape(weight.shape)
        q, r, sw, zero, effective = self._stored(w2)  # the scales (an MSE search, maybe) once per step
        value = dequantized_weight(integer_weights(q, r, zero, self.scheme), sw, weight.shape)
        if self.scheme.codebook == "sign":
            return weight + (value - weight).detach()
        blocks = _rows(w2, self.scheme)
        if self.step is not None:  # per group: LSQ through the effective (two-level) scales
            step = self.step.clamp_min(tiny)
            step = step + (effective - step).detach()
            out = learned_fake_quantize(blocks, step.unsqueeze(-1), 0.0, -self.scheme.qmax, self.scheme.qmax)
            out = out.reshape(weight.shape)
            return out + (value - out).detach()
        inside = (blocks.detach().abs() / effective.unsqueeze(-1)).round() <= self.scheme.qmax
        return value + (weight - weight.detach()) * inside.reshape(weight.shape).to(weight.dtype)


def integer_weights(q: torch.Tensor, r: torch.Tensor | None, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Wi (C, K) int64 from stored codes, sub-scales and zero-channel mask (docs/integer.md, section 2)."""
    wi = q if r is None else q * r.repeat_interleave(scheme.granularity.group_size, dim=1)
    return torch.where(zero.unsqueeze(1), 0, wi)


def dequantized_weight(wi: torch.Tensor, sw: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    """fp32(fp64(sw) * Wi) shaped ``shape``: the real weights of integer weights (C, K) and scales (C,)."""
    return (sw.to(torch.float64).unsqueeze(1) * wi.to(torch.float64)).to(torch.float32).view(shape)
