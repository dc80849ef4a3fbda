"""``gradq.convert``: a prepared, calibrated model -> an integer model whose activations travel between
layers as uint8/int8 codes and whose weights are stored packed at their width (docs/integer.md).

The converted model computes exactly what the prepared model's ``eval()`` computes (same integers, by the
shared ``integer_layer``), but from stored integer parameters only: packed codes, 8-bit sub-scales, fp32
channel scales, int32 bias, int32 multipliers and int8 shifts. It quantizes at the model's input,
dequantizes where a float operation or the output needs real values.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from gradq.kernels import pack_bits, unpack_bits
from gradq.modelquant.calibrate import quant_layers
from gradq.modelquant.integer_ops import integer_layer
from gradq.modelquant.modules import QuantLayer
from gradq.modelquant.observer import ActQuant
from gradq.modelquant.prepare import PreparedInfo
from gradq.modelquant.weights import integer_weights
from gradq.quantize import quantize
from gradq.scheme import QuantScheme

_GRID_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_GRID_FUNCTIONS = {torch.flatten, F.max_pool1d, F.max_pool2d, F.dropout}
_GRID_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze"}
_RELU = ({F.relu, torch.relu}, {"relu"})


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
        self.zero_point = zero_point

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.clamp(min=self.zero_point)


class IntegerLayer(nn.Module):
    """An integer Linear/Conv1d/Conv2d: codes in, codes out, parameters as docs/integer.md section 4."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        p = layer.integer_parameters()
        q, r, _, zero = layer.weight_quant.stored(layer.weight)
        scheme = layer.weight_quant.scheme
        self.kind, self.name, self.weight_scheme = layer.kind, layer.name, scheme
        self.weight_shape, self.conv_args = tuple(layer.weight.shape), dict(layer.conv_args)
        self.out_dtype = _code_dtype(layer.output_quant.scheme)
        field = (q < 0).to(torch.uint8) if scheme.codebook == "sign" else (q & (2**scheme.bits - 1)).to(torch.uint8)
        self.register_buffer("packed_weight", pack_bits(field.reshape(-1).contiguous(), scheme.bits))
        self.register_buffer("sub_scales", None if r is None else r.to(torch.uint8))
        self.register_buffer("zero_channels", zero)
        self.register_buffer("weight_scale", p["sw"].clone())
        self.register_buffer("bias_q", p["bq"].to(torch.int32))
        self.register_buffer("multiplier", p["M"].to(torch.int32))
        self.register_buffer("shift", p["n"].to(torch.int8))
        self.zx, self.zo, self.lo, self.hi, self.bound = p["zx"], p["zo"], p["lo"], p["hi"], p["bound"]
        self._wi: torch.Tensor | None = None

    def integer_weights(self) -> torch.Tensor:
        """Wi (C, K) int64 unpacked from the stored codes (cached after the first call)."""
        if self._wi is None:
            c, k = self.weight_shape[0], int(torch.tensor(self.weight_shape[1:]).prod())
            scheme = self.weight_scheme
            field = unpack_bits(self.packed_weight, scheme.bits, c * k).to(torch.int64).view(c, k)
            if scheme.codebook == "sign":
                q = 1 - 2 * field
            else:
                sign = 1 << (scheme.bits - 1)
                q = (field ^ sign) - sign
            r = None if self.sub_scales is None else self.sub_scales.to(torch.int64)
            self._wi = integer_weights(q, r, self.zero_channels, scheme)
        return self._wi

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.kind != "linear" and codes.dim() == len(self.weight_shape) - 1:
            return self.forward(codes.unsqueeze(0)).squeeze(0)
        p = {"Wi": self.integer_weights(), "bq": self.bias_q.to(torch.int64), "M": self.multiplier.to(torch.int64),
             "n": self.shift.to(torch.int64), "zx": self.zx, "zo": self.zo, "lo": self.lo, "hi": self.hi,
             "bound": self.bound}
        return integer_layer(codes, p, self.kind, self.conv_args, self.weight_shape).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.kind}, {self.weight_scheme.bits}-bit weights, {self.packed_weight.numel()} bytes"


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    return (node.op == "call_function" and node.target in _RELU[0]) or (
        node.op == "call_method" and node.target in _RELU[1]
    )


def _keeps_codes(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _GRID_MODULES)
    if node.op == "call_function":
        return node.target in _GRID_FUNCTIONS
    return node.op == "call_method" and node.target in _GRID_METHODS


def convert(prepared: nn.Module) -> fx.GraphModule:
    """The integer model of a prepared, calibrated (or trained) model; ``prepared`` is not modified.

    Every layer with quantized weights and activations becomes an :class:`IntegerLayer`; ReLU, max pooling
    and reshapes run on codes; anything else (weight-only layers included) runs in float between a
    :class:`Dequantize` and the next :class:`QuantizeInput`. Its outputs equal ``prepared.eval()``'s bit
    for bit. Raises ValueError for an unprepared or uncalibrated model.
    """
    quant_layers(prepared)
    if not isinstance(prepared, fx.GraphModule):
        raise ValueError("convert takes the model returned by gradq.prepare")
    gm = copy.deepcopy(prepared).eval()
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

    def dequantized(arg: object, user: fx.Node) -> object:
        if isinstance(arg, fx.Node) and arg in codes:
            q = codes[arg]
            with graph.inserting_before(user):
                return graph.call_module(add(Dequantize(*q.qparams()), "dequantize"), (arg,))
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
            scale, zp = target.qparams()
            new = add(QuantizeInput(target.scheme, scale, zp), "quantize")
            node.target = new
            codes[node] = target
        elif isinstance(target, QuantLayer) and target.integer:
            if node.args[0] not in codes:
                raise ValueError(f"{target.name}: its input is not quantized; convert needs a model from gradq.prepare")
            gm.add_submodule(node.target, IntegerLayer(target))
            codes[node] = target.output_quant
        elif node.args and node.args[0] in codes and (_keeps_codes(node, modules) or _is_relu(node, modules)):
            q = codes[node.args[0]]
            if _is_relu(node, modules):
                relu = add(CodeReLU(q.qparams()[1]), "code_relu")
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
