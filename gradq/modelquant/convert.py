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

from gradq.modelquant.calibrate import quant_layers
from gradq.modelquant.integer_model import IntegerModel, integer_model
from gradq.modelquant.integer_modules import (
    CodeMaxPool,
    CodeReLU,
    Dequantize,
    IntegerAdd,
    IntegerAvgPool,
    IntegerLayer,
    QuantizeInput,
    WeightOnlyLayer,
)
from gradq.modelquant.modules import QuantLayer
from gradq.modelquant.observer import ActQuant
from gradq.modelquant.prepare import PreparedInfo, is_relu, preserves_grid
from gradq.modelquant.quant_ops import QuantAdd, QuantAvgPool


def convert(prepared: nn.Module) -> IntegerModel:
    """The integer model of a prepared, calibrated (or trained) model; ``prepared`` is not modified.

    Every layer with quantized weights and activations becomes an :class:`IntegerLayer`, every quantized
    residual add an :class:`IntegerAdd`, average pooling on a grid an :class:`IntegerAvgPool`; ReLU, max
    pooling and reshapes run on codes; anything else (weight-only layers included) runs in float between a
    :class:`Dequantize` and the next :class:`QuantizeInput`. Its outputs equal ``prepared.eval()``'s bit
    for bit. Raises ValueError for an unprepared or uncalibrated model.
    """
    return build_integer_model(prepared, with_values=True)


def build_integer_model(prepared: nn.Module, with_values: bool) -> IntegerModel:
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
        elif isinstance(target, QuantAdd):
            if not all(a in codes for a in node.args):
                raise ValueError(f"{target.name}: an input is not quantized; convert needs a model from gradq.prepare")
            gm.add_submodule(node.target, IntegerAdd(target, with_values))
            codes[node] = target.output_quant
        elif isinstance(target, QuantAvgPool) and target.grid is not None and node.args[0] in codes:
            q = codes[node.args[0]]
            gm.add_submodule(node.target, IntegerAvgPool(target.spec, *qparams(q)))
            codes[node] = q
        elif node.args and node.args[0] in codes and preserves_grid(node, modules):
            q = codes[node.args[0]]
            if is_relu(node, modules):
                relu = add(CodeReLU(qparams(q)[1]), "code_relu")
                with graph.inserting_before(node):
                    new = graph.call_module(relu, (node.args[0],))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                codes[new] = q
            elif type(target) is nn.MaxPool2d:
                gm.add_submodule(node.target, CodeMaxPool.of(target))
                codes[node] = q
            elif node.op == "call_function" and node.target is F.max_pool2d:
                pool = add(CodeMaxPool(*node.args[1:], **node.kwargs), "max_pool")
                with graph.inserting_before(node):
                    new = graph.call_module(pool, (node.args[0],))
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
    return integer_model(gm, graph)
