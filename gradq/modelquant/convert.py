"""``gradq.convert``: a prepared, calibrated model -> an integer model whose activations travel between
layers as uint8/int8 codes and whose weights are stored packed at their width (docs/integer.md).

The converted model computes exactly what the prepared model's ``eval()`` computes (same integers, by the
shared ``integer_layer``), but from stored integer parameters only: packed codes, 8-bit sub-scales, fp32
channel scales, int32 bias, int32 multipliers and int8 shifts. It quantizes at the model's input,
dequantizes where a float operation or the output needs real values.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from gradq.integer_gemm import IntegerGemm, integer_conv2d, integer_linear, plan_integer_gemm
from gradq.kernels import pack_bits, unpack_bits
from gradq.modelquant.calibrate import quant_layers
from gradq.modelquant.integer_ops import LAYER_FUNCTIONS, integer_layer
from gradq.modelquant.modules import QuantLayer
from gradq.modelquant.observer import ActQuant
from gradq.modelquant.prepare import PreparedInfo, is_relu, preserves_grid
from gradq.modelquant.weights import dequantized_weight, integer_weights
from gradq.quantize import quantize
from gradq.scheme import PerGroup, QuantScheme


def _code_dtype(scheme: QuantScheme) -> torch.dtype:
    return torch.int8 if scheme.signed else torch.uint8


class QuantizeInput(nn.Module):
    """Float tensor -> codes (uint8/int8) with a fixed scale and zero point, exactly as ``gradq.quantize``."""

    def __init__(self, scheme: QuantScheme, scale: torch.Tensor, zero_point: int) -> None:
        super().__init__()
        self.scheme = scheme
        self.register_buffer("scale", scale.detach().clone().to(torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zp = self.zero_point if self.scheme.has_zero_point else None
        return quantize(x, self.scheme, scale=self.scale, zero_point=zp).codes


class Dequantize(nn.Module):
    """Codes -> fp32(scale * (q - zero_point))."""

    def __init__(self, scale: torch.Tensor, zero_point: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().to(torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.to(torch.int32) - self.zero_point).to(torch.float32) * self.scale


class CodeReLU(nn.Module):
    """ReLU on codes: max(q, zero_point)."""

    def __init__(self, zero_point: int) -> None:
        super().__init__()
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.clamp(min=int(self.zero_point))


class _PackedWeights(nn.Module):
    """Weights stored as docs/integer.md section 2 says: codes packed at their width (sign: bit 1 is -1),
    8-bit sub-scales per group, fp32 channel scales and the mask of all-zero channels."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        scheme = layer.weight_quant.scheme
        self.kind, self.name, self.weight_scheme = layer.kind, layer.name, scheme
        self.weight_shape, self.conv_args, self.relu = tuple(layer.weight.shape), dict(layer.conv_args), layer.relu
        c, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        groups = k // scheme.granularity.group_size if isinstance(scheme.granularity, PerGroup) else None
        self.register_buffer("packed_weight", torch.zeros((c * k * scheme.bits + 7) // 8, dtype=torch.uint8))
        self.register_buffer("sub_scales", None if groups is None else torch.zeros(c, groups, dtype=torch.uint8))
        self.register_buffer("zero_channels", torch.zeros(c, dtype=torch.bool))
        self.register_buffer("weight_scale", torch.zeros(c, dtype=torch.float32))
        self._wi: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        self._gemm: IntegerGemm | None = None

    def _fill_weights(self, q: torch.Tensor, r: torch.Tensor | None, sw: torch.Tensor, zero: torch.Tensor) -> None:
        """Store ``WeightQuantizer.stored``'s codes, sub-scales, scales and zero-channel mask."""
        scheme = self.weight_scheme
        field = (q < 0).to(torch.uint8) if scheme.codebook == "sign" else (q & (2**scheme.bits - 1)).to(torch.uint8)
        self.packed_weight.copy_(pack_bits(field.reshape(-1).contiguous(), scheme.bits))
        if r is not None:
            self.sub_scales.copy_(r)
        self.zero_channels.copy_(zero)
        self.weight_scale.copy_(sw)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._wi = self._weight = self._gemm = None  # new stored codes: unpack again
        super()._load_from_state_dict(*args, **kwargs)

    def weight_codes(self) -> torch.Tensor:
        """The weight codes q (C, K) int64 unpacked from the stored bits."""
        c, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        scheme = self.weight_scheme
        field = unpack_bits(self.packed_weight, scheme.bits, c * k).to(torch.int64).view(c, k)
        if scheme.codebook == "sign":
            return 1 - 2 * field
        sign = 1 << (scheme.bits - 1)
        return (field ^ sign) - sign

    def integer_weights(self) -> torch.Tensor:
        """Wi (C, K) int64 unpacked from the stored codes (cached after the first call)."""
        if self._wi is None:
            r = None if self.sub_scales is None else self.sub_scales.to(torch.int64)
            self._wi = integer_weights(self.weight_codes(), r, self.zero_channels, self.weight_scheme)
        return self._wi


class IntegerLayer(_PackedWeights):
    """An integer Linear/Conv1d/Conv2d: codes in, codes out, parameters as docs/integer.md section 4."""

    def __init__(self, layer: QuantLayer, with_values: bool = True) -> None:
        super().__init__(layer)
        c = self.weight_shape[0]
        self.out_dtype = _code_dtype(layer.output_quant.scheme)
        self.in_dtype = _code_dtype(layer.input_quantizer.scheme)
        for name, dtype in (("bias_q", torch.int32), ("multiplier", torch.int32), ("shift", torch.int8)):
            self.register_buffer(name, torch.zeros(c, dtype=dtype))
        # zx, zo, the output clamp lo/hi and the accumulator bound, as one int64 tensor
        self.register_buffer("integers", torch.zeros(5, dtype=torch.int64))
        self.register_buffer("io_scales", torch.zeros(2, dtype=torch.float32))  # sx, so (for export)
        if with_values:
            p = layer.integer_parameters()
            self.io_scales.copy_(torch.stack((p["sx"], p["so"])))
            self._fill_weights(p["q"], p["r"], p["sw"], p["zero"])
            self.bias_q.copy_(p["bq"])
            self.multiplier.copy_(p["M"])
            self.shift.copy_(p["n"])
            self.integers.copy_(torch.tensor([p["zx"], p["zo"], p["lo"], p["hi"], p["bound"]]))

    def gemm(self) -> IntegerGemm:
        """The layer planned for the integer GEMM kernels (made once from the stored integers)."""
        if self._gemm is None:
            zx, zo, lo, hi, _ = self.integers.tolist()
            scheme = self.weight_scheme
            group = scheme.granularity.group_size if isinstance(scheme.granularity, PerGroup) else 0
            self._gemm = plan_integer_gemm(
                self.weight_codes(), self.sub_scales, self.zero_channels, scheme.bits, scheme.codebook == "sign",
                group, self.bias_q, self.multiplier, self.shift, zx, zo, lo, hi,
                x_signed=self.in_dtype == torch.int8, out_signed=self.out_dtype == torch.int8,
            )
        return self._gemm

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.device.type != "cpu":  # the exact float emulation (docs/integer.md) on other devices
            zx, zo, lo, hi, bound = self.integers.tolist()
            p = {"Wi": self.integer_weights(), "bq": self.bias_q.to(torch.int64),
                 "M": self.multiplier.to(torch.int64), "n": self.shift.to(torch.int64), "zx": zx, "zo": zo,
                 "lo": lo, "hi": hi, "bound": bound}
            return integer_layer(codes, p, self.kind, self.conv_args, self.weight_shape).to(self.out_dtype)
        if self.kind == "linear":
            rows = codes.reshape(-1, codes.shape[-1]).contiguous()
            return integer_linear(rows, self.gemm()).view(*codes.shape[:-1], -1)
        unbatched = codes.dim() == len(self.weight_shape) - 1
        x = codes.unsqueeze(0) if unbatched else codes
        a = self.conv_args
        if self.kind == "conv1d":  # a Conv1d runs as a Conv2d of height 1
            out = integer_conv2d(x.unsqueeze(2).contiguous(), self.gemm(), (1, self.weight_shape[2]),
                                 (1, a["stride"][0]), (0, a["padding"][0]), (1, a["dilation"][0]), a["groups"])
            out = out.squeeze(2)
        else:
            out = integer_conv2d(x.contiguous(), self.gemm(), self.weight_shape[2:], a["stride"], a["padding"],
                                 a["dilation"], a["groups"])
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"{self.name}: {self.kind}, {self.weight_scheme.bits}-bit weights, {self.packed_weight.numel()} bytes"


class WeightOnlyLayer(_PackedWeights):
    """A weight-only quantized layer: packed weights, float compute with ``fp32(fp64(sw) * Wi)`` and the
    float bias, ReLU if fused (as the prepared model's eval())."""

    def __init__(self, layer: QuantLayer, with_values: bool = True) -> None:
        super().__init__(layer)
        self.register_buffer("bias", None if layer.bias is None else torch.zeros_like(layer.bias.detach()))
        if with_values:
            self._fill_weights(*layer.weight_quant.stored(layer.weight))
            if layer.bias is not None:
                self.bias.copy_(layer.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight is None:
            self._weight = dequantized_weight(self.integer_weights(), self.weight_scale, self.weight_shape)
        y = LAYER_FUNCTIONS[self.kind](x, self._weight.to(x.dtype), self.bias, **self.conv_args)
        return F.relu(y) if self.relu else y


def convert(prepared: nn.Module) -> fx.GraphModule:
    """The integer model of a prepared, calibrated (or trained) model; ``prepared`` is not modified.

    Every layer with quantized weights and activations becomes an :class:`IntegerLayer`; ReLU, max pooling
    and reshapes run on codes; anything else (weight-only layers included) runs in float between a
    :class:`Dequantize` and the next :class:`QuantizeInput`. Its outputs equal ``prepared.eval()``'s bit
    for bit. Raises ValueError for an unprepared or uncalibrated model.
    """
    return build_integer_model(prepared, with_values=True)


def build_integer_model(prepared: nn.Module, with_values: bool) -> fx.GraphModule:
    """:func:`convert`; ``with_values=False`` builds the same modules with zeroed parameters, for loading a
    saved integer model's state into (no calibration needed)."""
    quant_layers(prepared)
    if not isinstance(prepared, fx.GraphModule):
        raise ValueError("convert takes the model returned by gradq.prepare")
    gm = copy.deepcopy(prepared).eval()

    def qparams(q: ActQuant) -> tuple[torch.Tensor, int]:
        return q.qparams() if with_values else (torch.tensor(1.0), 0)

    modules = dict(gm.named_modules())
    graph = gm.graph
    codes: dict[fx.Node, ActQuant] = {}  # nodes whose value is a code tensor -> the quantizer of its grid
    count = 0

    def add(module: nn.Module, prefix: str) -> str:
        nonlocal count
        count += 1
        name = f"{prefix}_{count}"
        gm.add_submodule(name, module)
        return name

    floats: dict[fx.Node, fx.Node] = {}  # code node -> its one Dequantize node

    def dequantized(arg: object, user: fx.Node) -> object:
        if isinstance(arg, fx.Node) and arg in codes:
            if arg not in floats:
                with graph.inserting_before(user):
                    floats[arg] = graph.call_module(add(Dequantize(*qparams(codes[arg])), "dequantize"), (arg,))
            return floats[arg]
        return arg

    for node in list(graph.nodes):
        target = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(target, ActQuant):
            source = node.args[0]
            if codes.get(source) is target:  # the output quantizer of an integer layer: its codes pass through
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                continue
            node.args = (dequantized(source, node),)  # codes of another grid are requantized through float
            scale, zp = qparams(target)
            new = add(QuantizeInput(target.scheme, scale, zp), "quantize")
            node.target = new
            codes[node] = target
        elif isinstance(target, QuantLayer) and target.weight_quant is not None and not target.integer:
            node.args = fx.node.map_arg(node.args, lambda a, user=node: dequantized(a, user))
            gm.add_submodule(node.target, WeightOnlyLayer(target, with_values))
        elif isinstance(target, QuantLayer) and target.integer:
            if node.args[0] not in codes:
                raise ValueError(f"{target.name}: its input is not quantized; convert needs a model from gradq.prepare")
            gm.add_submodule(node.target, IntegerLayer(target, with_values))
            codes[node] = target.output_quant
        elif node.args and node.args[0] in codes and preserves_grid(node, modules):
            q = codes[node.args[0]]
            if is_relu(node, modules):
                relu = add(CodeReLU(qparams(q)[1]), "code_relu")
                with graph.inserting_before(node):
                    new = graph.call_module(relu, (node.args[0],))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                codes[new] = q
            else:
                codes[node] = q
        else:
            node.args = fx.node.map_arg(node.args, lambda a, user=node: dequantized(a, user))
            node.kwargs = fx.node.map_arg(node.kwargs, lambda a, user=node: dequantized(a, user))
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    info = next(m for m in prepared.modules() if isinstance(m, PreparedInfo))
    gm.add_submodule("gradq_info", copy.deepcopy(info))
    graph.lint()
    gm.recompile()
    return gm
