"""Quantized residual add and average pooling of a prepared model (docs/integer.md section 5).

``train()`` (and calibration) compute in float; ``eval()`` computes the integer arithmetic of
``integer_ops`` on the input codes, exactly as the converted model does. ``QuantAdd`` has its own output
quantizer (a fused ReLU is its lower clamp) and takes its inputs' codes from the quantizers that produced
them (or its own input quantizers, set by ``prepare``). ``QuantAvgPool`` keeps its input's grid: the
output has the input's scale and zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradq.modelquant.config import QuantConfig
from gradq.modelquant.integer_ops import add_multipliers, integer_add, integer_avg_pool
from gradq.modelquant.observer import ActQuant


def _busy(quants: tuple[ActQuant | None, ...]) -> bool:
    """True while calibration runs (any quantizer in a phase): the ops then compute in float."""
    return any(q is not None and q.phase is not None for q in quants)


class QuantAdd(nn.Module):
    """``a + b`` (then ReLU if ``relu``), quantized by ``output_quant``; its input quantizers are linked by
    ``prepare`` with :meth:`link_inputs`."""

    def __init__(self, config: QuantConfig, name: str, relu: bool) -> None:
        super().__init__()
        self.name, self.config, self.relu = name, config, relu
        learn = config.learn if config.learn == "lsq" or (config.learn == "pact" and relu) else None
        self.output_quant = ActQuant(config.activation, config.calibrator, dict(config.calibrator_options), learn,
                                     f"{name}.output_quant")
        self.output_quant.gridded_in_eval = True
        self._inputs: tuple[ActQuant, ...] = ()

    def new_input_quant(self, which: str) -> ActQuant:
        """Make and own the quantizer of input ``which`` (``a`` or ``b``) that no layer produced."""
        c = self.config
        quant = ActQuant(c.activation, c.calibrator, dict(c.calibrator_options), "lsq" if c.learn == "lsq" else None,
                         f"{self.name}.input_quant_{which}")
        setattr(self, f"input_quant_{which}", quant)
        return quant

    def link_inputs(self, qa: ActQuant, qb: ActQuant) -> None:
        """Use ``qa``/``qb`` as the quantizers whose codes the two inputs carry."""
        self._inputs = (qa, qb)

    @property
    def input_quantizers(self) -> tuple[ActQuant, ...]:
        return self._inputs

    def integer_parameters(self) -> dict[str, int]:
        """za, zb, Ma, Mb, n, zo, lo, hi of docs/integer.md section 5 (ValueError naming the add if a
        multiplier is out of range)."""
        (sa, za), (sb, zb) = (q.qparams() for q in self._inputs)
        so, zo = self.output_quant.qparams()
        try:
            ma, mb, n = add_multipliers(sa, sb, so)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from exc
        scheme = self.output_quant.scheme
        lo = max(scheme.qmin, zo) if self.relu else scheme.qmin
        return {"za": za, "zb": zb, "Ma": ma, "Mb": mb, "n": n, "zo": zo, "lo": lo, "hi": scheme.qmax}

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.training or _busy((self.output_quant, *self._inputs)):
            y = a + b
            return F.relu(y) if self.relu else y
        p = self.integer_parameters()
        codes = integer_add(self._inputs[0].codes(a), self._inputs[1].codes(b), p)
        return (codes - p["zo"]).to(torch.float32) * self.output_quant.qparams()[0]

    def extra_repr(self) -> str:
        return f"{self.name}: integer add{'+ReLU' if self.relu else ''}"


@dataclass(frozen=True)
class PoolSpec:
    """An average pooling over ``dims`` (1 or 2) spatial dimensions: ``kernel``/``stride``/``padding``, or
    ``kernel=None`` for global pooling to size 1 (adaptive average pooling with output size 1)."""

    dims: int
    kernel: tuple[int, ...] | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]


def pool_spec(module: nn.Module) -> tuple[PoolSpec | None, str]:
    """The :class:`PoolSpec` of an average-pooling module, or (None, why it stays in float)."""

    def tup(v: int | tuple, n: int) -> tuple[int, ...]:
        return (v,) * n if isinstance(v, int) else tuple(v)

    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        dims = 1 if isinstance(module, nn.AdaptiveAvgPool1d) else 2
        if tup(module.output_size, dims) != (1,) * dims:
            return None, "adaptive average pooling to a size other than 1"
        return PoolSpec(dims, None, (), ()), ""
    dims = 1 if isinstance(module, nn.AvgPool1d) else 2
    kernel = tup(module.kernel_size, dims)
    stride, padding = tup(module.stride or kernel, dims), tup(module.padding, dims)
    if module.ceil_mode or getattr(module, "divisor_override", None) is not None:
        return None, "ceil_mode or divisor_override"
    if not module.count_include_pad and any(padding):
        return None, "count_include_pad=False with padding"
    return PoolSpec(dims, kernel, stride, padding), ""


AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


class QuantAvgPool(nn.Module):
    """Average pooling whose output stays on its input's grid (``prepare`` links the input quantizer with
    :meth:`link_input`; without one it is plain float pooling). In training the integer result is used
    with a straight-through gradient, so training sees the values eval() computes."""

    def __init__(self, pool: nn.Module, spec: PoolSpec, name: str) -> None:
        super().__init__()
        self.pool, self.spec, self.name = pool, spec, name
        self._grid: tuple[ActQuant, ...] = ()

    def link_input(self, quant: ActQuant) -> None:
        self._grid = (quant,)

    @property
    def grid(self) -> ActQuant | None:
        """The quantizer whose codes the input and output carry (None: float pooling)."""
        return self._grid[0] if self._grid else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x)
        q = self.grid
        if q is None or _busy((q,)) or not bool(q.calibrated):
            return y
        scale, zp = q.qparams()
        s = self.spec
        codes = integer_avg_pool(q.codes(x), zp, s.kernel, s.stride, s.padding)
        exact = (codes - zp).to(torch.float32) * scale
        return y + (exact - y).detach() if self.training else exact

    def extra_repr(self) -> str:
        return f"{self.name}: {'integer' if self.grid is not None else 'float'} average pooling"
