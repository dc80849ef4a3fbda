"""Fake-quantized Linear/Conv1d/Conv2d with folded BatchNorm and fused ReLU.

``train()``: the float straight-through path (fake-quantized weights, float op, float bias, ReLU); the
output quantizer that follows the layer in the graph fake-quantizes the result. ``eval()`` with weights
and activations quantized: exactly the integer arithmetic of docs/integer.md, emulated with im2col, a
float GEMM of integer values that it represents exactly (fp32 when every partial sum is below 2**24, else
fp64) and int64 tensors. Weight-only layers compute with the dequantized weight.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from gradq.fixedpoint import INT32_MAX, quantize_multiplier
from gradq.modelquant.config import QuantConfig
from gradq.modelquant.integer_ops import LAYER_FUNCTIONS, integer_layer
from gradq.modelquant.observer import ActQuant
from gradq.modelquant.weights import WeightQuantizer, integer_weights
from gradq.scheme import PerAxis, PerGroup

KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}


def activate(y: torch.Tensor, relu: bool, relu6: bool) -> torch.Tensor:
    """The fused activation of a layer: ReLU6, ReLU or none."""
    return F.relu6(y) if relu6 else F.relu(y) if relu else y


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in (float64 math, fp32 result):
    w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    factor = gamma / torch.sqrt(var + bn.eps)
    b = bias.detach().double() if bias is not None else torch.zeros_like(var)
    w = weight.detach().double() * factor.view(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), ((b - mean) * factor + beta).to(weight.dtype)


class QuantLayer(nn.Module):
    """A quantized Linear/Conv1d/Conv2d (``kind``), built by ``gradq.prepare`` from a float layer.

    ``weight``/``bias`` are parameters (BatchNorm already folded in). ``relu``: a fused ReLU (``relu6``: a
    fused ReLU6, whose cap at 6 becomes the upper clamp at the code of 6). The input
    quantizer is set by ``prepare`` with :meth:`link_input` (its own ``input_quant`` child, or the output
    quantizer of the layer it reads from); ``output_quant`` is its own child.
    """

    def __init__(self, layer: nn.Module, config: QuantConfig, name: str, bn: nn.Module | None, relu: bool,
                 relu6: bool = False) -> None:
        super().__init__()
        self.kind, self.name, self.config = KINDS[type(layer)], name, config
        self.relu, self.relu6 = relu or relu6, relu6
        activation = "ReLU6" if relu6 else "ReLU"
        self.fused = tuple(x for x, on in (("BatchNorm", bn is not None), (activation, self.relu)) if on)
        weight, bias = layer.weight, layer.bias
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn)
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.conv_args = {}
        if self.kind != "linear":
            if layer.padding_mode != "zeros":
                raise ValueError(f"{name}: padding_mode={layer.padding_mode!r} is not supported (zeros only)")
            if isinstance(layer.padding, str):
                raise ValueError(f"{name}: padding={layer.padding!r} is not supported; give explicit padding")
            self.conv_args = {
                "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups
            }
        self.note = ""
        gran = config.weight.granularity if config.weight is not None else None
        reduction = math.prod(self.weight.shape[1:])
        if isinstance(gran, PerGroup) and reduction % gran.group_size:
            self.note = f"group size {gran.group_size} does not divide K={reduction}: per-channel weights"
            config = replace(config, weight=replace(config.weight, granularity=PerAxis(0)))
            self.config = config
        learn_weight = config.learn == "lsq"
        self.weight_quant = (
            None
            if config.weight is None
            else WeightQuantizer(config.weight, config.weight_range, self.weight.shape, learn_weight)
        )
        if self.weight_quant is not None:
            self.weight_quant.init_step(self.weight)
        self.output_quant = (
            None if config.activation is None else self._new_act_quant(f"{name}.output_quant", non_negative=self.relu)
        )
        if self.output_quant is not None and self.weight_quant is not None:
            self.output_quant.gridded_in_eval = True
        self._input: tuple[ActQuant, ...] = ()
        self._integer_cache: tuple[tuple, dict] | None = None
        self.calibrating = False

    def _new_act_quant(self, name: str, non_negative: bool) -> ActQuant:
        """PACT clips non-negative (ReLU) outputs only; LSQ learns every step."""
        c = self.config
        learn = c.learn if c.learn == "lsq" or (c.learn == "pact" and non_negative) else None
        return ActQuant(c.activation, c.calibrator, dict(c.calibrator_options), learn, name)

    def link_input(self, quant: ActQuant | None) -> None:
        """Use ``quant`` as this layer's input quantizer (None: make and own one, as ``input_quant``)."""
        if quant is None:
            quant = self.input_quant = self._new_act_quant(f"{self.name}.input_quant", non_negative=False)
        self._input = (quant,)

    @property
    def input_quantizer(self) -> ActQuant | None:
        """The quantizer whose (scale, zero point) this layer's input codes have."""
        return self._input[0] if self._input else None

    @property
    def integer(self) -> bool:
        """True when eval() runs the integer arithmetic (weights and activations both quantized)."""
        return self.weight_quant is not None and self.output_quant is not None

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return LAYER_FUNCTIONS[self.kind](x, weight, bias, **self.conv_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating or self.weight_quant is None:
            y = self._op(x, self.weight, self.bias)
        elif self.training or not self.integer:
            weight = self.weight_quant(self.weight) if self.training else self.weight_quant.dequantized(self.weight)
            y = self._op(x, weight.to(x.dtype), self.bias)
        else:
            return self._integer_forward(x)
        return activate(y, self.relu, self.relu6)

    def _state_key(self) -> tuple:
        """Identity and version of every tensor the integer parameters derive from: in-place updates (an
        optimizer step, load_state_dict) and replaced tensors (``.to()``) change it."""
        tensors = [self.weight, self.bias, self.weight_quant.step]
        for q in (self.input_quantizer, self.output_quant):
            tensors += [q.scale, q.zero_point, q.calibrated, q.step]
        return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)

    def integer_parameters(self) -> dict[str, torch.Tensor | int]:
        """Everything docs/integer.md section 4 stores for this layer: the weight codes q, sub-scales r, zero
        channel mask (as ``WeightQuantizer.stored``), Wi (C, K) int64, sw fp32 (C,), bq, M, n (int64, C), sx,
        zx, so, zo, the output clamp bounds lo/hi, and ``bound`` (>= any |partial sum| of the accumulator).
        Raises if an int32 could overflow. Computed once per state of the tensors it derives from."""
        key = self._state_key()
        if self._integer_cache is None or self._integer_cache[0] != key:
            self._integer_cache = (key, self._integer_parameters())
        return self._integer_cache[1]

    def _integer_parameters(self) -> dict[str, torch.Tensor | int]:
        sx, zx = self.input_quantizer.qparams()
        so, zo = self.output_quant.qparams()
        q, r, sw, zero = self.weight_quant.stored(self.weight)
        wi = integer_weights(q, r, zero, self.weight_quant.scheme)
        s_in_w = sx.double() * sw.double()
        if self.bias is None:
            bq = torch.zeros(len(sw), dtype=torch.int64, device=sw.device)
        else:
            bq = torch.round(self.bias.detach().double() / s_in_w).to(torch.int64)
        scheme_in, scheme_out = self.input_quantizer.scheme, self.output_quant.scheme
        span = max(zx - scheme_in.qmin, scheme_in.qmax - zx)
        bound = wi.shape[1] * span * int(wi.abs().max()) + int(bq.abs().max())
        if bound > INT32_MAX:
            raise ValueError(
                f"{self.name}: the int32 accumulator could overflow (bound {bound} > 2**31 - 1); use fewer "
                "weight bits per group, per-channel weights, or smaller activation bits for this layer"
            )
        try:
            mult, shift = quantize_multiplier(s_in_w / so.double())
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from exc
        lo = max(scheme_out.qmin, zo) if self.relu else scheme_out.qmin
        hi = scheme_out.qmax
        if self.relu6:  # the cap: the code of 6.0 under the output parameters, as gradq.quantize gives it
            hi = min(hi, int(self.output_quant.codes(torch.tensor([6.0], device=so.device))[0]))
        return {"q": q, "r": r, "zero": zero, "Wi": wi, "sw": sw, "bq": bq, "M": mult, "n": shift, "sx": sx,
                "zx": zx, "so": so, "zo": zo, "lo": lo, "hi": hi, "bound": bound}

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.integer_parameters()
        codes = integer_layer(self.input_quantizer.codes(x), p, self.kind, self.conv_args, self.weight.shape)
        return (codes - p["zo"]).to(torch.float32) * p["so"]

    def weight_nbytes(self) -> tuple[int, int]:
        """(fp32 bytes of weight and bias, bytes of the integer form: packed codes, scales, sub-scales, bias)."""
        c, k = self.weight.shape[0], math.prod(self.weight.shape[1:])
        float_bytes = 4 * (self.weight.numel() + (0 if self.bias is None else c))
        if self.weight_quant is None:
            return float_bytes, float_bytes
        scheme = self.weight_quant.scheme
        packed = (c * k * scheme.bits + 7) // 8
        sub = c * (k // scheme.granularity.group_size) if isinstance(scheme.granularity, PerGroup) else 0
        return float_bytes, packed + 4 * c + sub + (0 if self.bias is None else 4 * c)

    def extra_repr(self) -> str:
        fused = "+".join(self.fused)
        return f"{self.name}: {self.kind}{'+' + fused if fused else ''}, weight={self.config.weight}"
