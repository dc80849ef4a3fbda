"""``gradq.export_onnx``: an integer model from ``gradq.convert`` as an ONNX QDQ graph that onnxruntime runs.

Each integer layer becomes DequantizeLinear(input codes) -> Conv/Gemm with DequantizeLinear'd weights
(per output channel, axis 0) and a DequantizeLinear'd int32 bias (scale sx * sw) -> Relu if fused ->
QuantizeLinear(output scale): the pattern onnxruntime fuses into its integer kernels. Weights of any width
travel as int8 initializers holding the same values (int4 and lower widened: ONNX int4 tensors are not
used); per-group weights, whose integer form r * q exceeds int8, travel as int16 (opset 21). Max pooling,
flatten and ReLU run on the codes; a residual add runs as DequantizeLinear -> Add -> QuantizeLinear, and
average pooling on the code values (DequantizeLinear and QuantizeLinear at scale 1: exact in float, so it
rounds as gradq); the model's outputs are dequantized. onnxruntime requantizes with a
float multiplier, not our fixed-point one, so its codes may differ from gradq's by one step.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import fx, nn

from gradq.modelquant.integer_modules import (
    ADD_FIELDS,
    CodeReLU,
    Dequantize,
    IntegerAdd,
    IntegerAvgPool,
    IntegerLayer,
    QuantizeInput,
    WeightOnlyLayer,
)
from gradq.modelquant.observer import ActQuant
from gradq.modelquant.prepare import is_relu
from gradq.modelquant.quant_ops import PoolSpec

OPSET = 21


def export_onnx(model: fx.GraphModule, example_input: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``model`` (from ``gradq.convert``) as ONNX to ``path``; ``example_input`` fixes the input's
    shape after the batch dimension, which stays dynamic. Raises ValueError naming any operation outside
    the exportable set (quantize, integer and weight-only Linear/Conv1d/Conv2d, residual add, average and
    max pooling, ReLU, flatten from dimension 1, dequantize)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    converted = any(isinstance(m, (QuantizeInput, IntegerLayer, WeightOnlyLayer)) for m in model.modules())
    if not isinstance(model, fx.GraphModule) or not converted or any(isinstance(m, ActQuant) for m in model.modules()):
        raise ValueError("export_onnx takes the integer model returned by gradq.convert(prepared)")
    modules = dict(model.named_modules())
    planes, example_output = _example_run(model, example_input)
    nodes, inits, names = [], [], {}
    codes: dict[str, tuple[str, str]] = {}  # value name -> (scale, zero point) initializer names
    dequantized: set[str] = set()
    zero_dtypes: dict[str, torch.dtype] = {}  # zero point initializer name -> the codes' dtype

    def const(name: str, tensor: torch.Tensor) -> str:
        inits.append(numpy_helper.from_array(tensor.detach().cpu().numpy(), name))
        return name

    def qparams(prefix: str, scale: torch.Tensor, zp: int, dtype: torch.dtype) -> tuple[str, str]:
        zero_dtypes[f"{prefix}.zero_point"] = dtype
        return (const(f"{prefix}.scale", scale.reshape(()).to(torch.float32)),
                const(f"{prefix}.zero_point", torch.tensor(zp, dtype=dtype)))

    def weight(prefix: str, layer: IntegerLayer | WeightOnlyLayer) -> str:
        wi = layer.integer_weights()
        dtype = torch.int8 if bool((wi.abs() <= 127).all()) else torch.int16
        q = const(f"{prefix}.weight_q", wi.to(dtype).view(layer.weight_shape))
        s = const(f"{prefix}.weight_scale", layer.weight_scale)
        z = const(f"{prefix}.weight_zero", torch.zeros(len(layer.weight_scale), dtype=dtype))
        nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [f"{prefix}.weight"], axis=0))
        return f"{prefix}.weight"

    def compute(prefix: str, layer: IntegerLayer | WeightOnlyLayer, x: str, bias: str | None) -> str:
        args = [x, weight(prefix, layer)] + ([bias] if bias else [])
        if layer.kind == "linear":
            nodes.append(helper.make_node("Gemm", args, [f"{prefix}.out"], transB=1))
        else:
            ca = layer.conv_args
            two = layer.kind == "conv2d"
            pads = list(ca["padding"]) * 2 if two else [ca["padding"][0]] * 2
            nodes.append(helper.make_node("Conv", args, [f"{prefix}.out"], strides=list(ca["stride"]), pads=pads,
                                          dilations=list(ca["dilation"]), group=ca["groups"],
                                          kernel_shape=list(layer.weight_shape[2:])))
        out = f"{prefix}.out"
        if layer.relu6:
            bounds = [const(f"{prefix}.{n}", torch.tensor(v)) for n, v in (("min", 0.0), ("max", 6.0))]
            nodes.append(helper.make_node("Clip", [out, *bounds], [f"{prefix}.relu6"]))
            out = f"{prefix}.relu6"
        elif layer.relu:
            nodes.append(helper.make_node("Relu", [out], [f"{prefix}.relu"]))
            out = f"{prefix}.relu"
        return out

    def floats(value: str) -> str:
        if value not in codes:
            return value
        out = f"{value}.dequantized"
        if out not in dequantized:  # one DequantizeLinear per code tensor, whatever its number of users
            nodes.append(helper.make_node("DequantizeLinear", [value, *codes[value]], [out]))
            dequantized.add(out)
        return out

    for node in model.graph.nodes:
        target = modules.get(node.target) if node.op == "call_module" else None
        src = names.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        name = node.name
        if node.op == "placeholder":
            names[node] = "input"
        elif isinstance(target, QuantizeInput):
            dtype = torch.int8 if target.scheme.signed else torch.uint8
            qp = qparams(name, target.scale, int(target.zero_point), dtype)
            nodes.append(helper.make_node("QuantizeLinear", [floats(src), *qp], [name]))
            names[node], codes[name] = name, qp
        elif isinstance(target, IntegerLayer):
            zo = int(target.integers[1])
            sx, so = target.io_scales
            bias = const(f"{name}.bias_q", target.bias_q)
            bias_scale = const(f"{name}.bias_scale", (sx.double() * target.weight_scale.double()).float())
            nodes.append(helper.make_node("DequantizeLinear", [bias, bias_scale], [f"{name}.bias"], axis=0))
            out = compute(name, target, floats(src), f"{name}.bias")  # a fused ReLU included
            qp = qparams(f"{name}.output", so, zo, target.out_dtype)
            nodes.append(helper.make_node("QuantizeLinear", [out, *qp], [name]))
            names[node], codes[name] = name, qp
        elif isinstance(target, IntegerAdd):
            a, b = (floats(names[arg]) for arg in node.args)
            nodes.append(helper.make_node("Add", [a, b], [f"{name}.sum"]))
            out = f"{name}.sum"
            if target.relu:
                nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"]))
                out = f"{name}.relu"
            zo = int(target.integers[ADD_FIELDS.index("zo")])
            qp = qparams(f"{name}.output", target.scales[2], zo, target.out_dtype)
            nodes.append(helper.make_node("QuantizeLinear", [out, *qp], [name]))
            names[node], codes[name] = name, qp
        elif isinstance(target, IntegerAvgPool):  # on the codes themselves (scale 1): exact in float
            unit = qparams(f"{name}.unit", torch.tensor(1.0), 0, zero_dtypes[codes[src][1]])
            nodes.append(helper.make_node("DequantizeLinear", [src, *unit], [f"{name}.codes"]))
            nodes += _avg_pool(helper, target.spec, f"{name}.codes", f"{name}.mean", int(target.zero_point), const,
                               planes.get(target))
            nodes.append(helper.make_node("QuantizeLinear", [f"{name}.mean", *unit], [name]))
            names[node], codes[name] = name, codes[src]
        elif isinstance(target, WeightOnlyLayer):
            bias = const(f"{name}.bias", target.bias) if target.bias is not None else None
            names[node] = compute(name, target, floats(src), bias)
        elif isinstance(target, Dequantize):
            names[node] = floats(src)
        elif isinstance(target, CodeReLU) or _is_maxpool(node, target) or _is_flatten(node, target):
            nodes.append(_code_op(helper, node, target, src, name, const))  # the same ops run on floats
            names[node] = name
            if src in codes:
                codes[name] = codes[src]
        elif is_relu(node, modules):  # a float ReLU (on codes it became a CodeReLU)
            nodes.append(helper.make_node("Relu", [floats(src)], [name]))
            names[node] = name
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise ValueError("export_onnx supports models with one output tensor")
            out = floats(names[node.args[0]])
            nodes.append(helper.make_node("Identity", [out], ["output"]))
        else:
            raise ValueError(f"export_onnx: operation {node.format_node()} has no ONNX export here; supported: "
                             "quantized Linear/Conv, residual add, average and max pooling, ReLU, flatten(x, 1)")
    out_shape = ["N", *example_output.shape[1:]]
    graph = helper.make_graph(
        nodes, "gradq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *example_input.shape[1:]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gradq")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _example_run(model: nn.Module, example_input: torch.Tensor) -> tuple[dict[nn.Module, tuple[int, ...]], object]:
    """``model``'s output on ``example_input``, and the spatial shape each of its global average poolings
    pools on it."""
    planes, handles = {}, []
    for m in model.modules():
        if isinstance(m, IntegerAvgPool) and m.spec.kernel is None:
            handles.append(m.register_forward_hook(lambda m, i, o: planes.__setitem__(m, tuple(i[0].shape[2:]))))
    try:
        with torch.no_grad():
            output = model(example_input)
    finally:
        for h in handles:
            h.remove()
    return planes, output


def _avg_pool(helper, spec: PoolSpec, codes: str, out: str, zero_point: int, const,  # noqa: ANN001
              plane: tuple[int, ...] | None) -> list:
    """Nodes of average pooling on float ``codes`` (the code values, exact in fp32), padding with the code of
    a real 0: AveragePool's own padding (counted) where that code is 0, else an explicit Pad with it first.
    A global pooling of a ``plane`` is ReduceSum, then Div by its size. Sums of codes are exact in fp32 and
    the mean is one correctly rounded division, so the QuantizeLinear at scale 1 that follows rounds the
    exact mean half to even, as gradq (onnxruntime's fused global pooling multiplies by 1 / size and rounded
    ties of a 7 x 2 plane the other way)."""
    if spec.kernel is None:
        axes = const(f"{out}.axes", torch.arange(2, 2 + len(plane), dtype=torch.int64))
        size = const(f"{out}.size", torch.tensor(float(math.prod(plane))))
        return [helper.make_node("ReduceSum", [codes, axes], [f"{out}.sum"], keepdims=1),
                helper.make_node("Div", [f"{out}.sum", size], [out])]
    pads = [*spec.padding] * 2
    if zero_point == 0 or not any(spec.padding):  # AveragePool's own zero padding is the code of a real 0
        return [helper.make_node("AveragePool", [codes], [out], kernel_shape=list(spec.kernel),
                                 strides=list(spec.stride), pads=pads, count_include_pad=1)]
    pad = [const(f"{out}.pads", torch.tensor([0, 0, *spec.padding] * 2, dtype=torch.int64)),
           const(f"{out}.pad_value", torch.tensor(float(zero_point)))]
    return [helper.make_node("Pad", [codes, *pad], [f"{out}.padded"]),
            helper.make_node("AveragePool", [f"{out}.padded"], [out], kernel_shape=list(spec.kernel),
                             strides=list(spec.stride))]


def _is_maxpool(node: fx.Node, target: nn.Module | None) -> bool:
    return isinstance(target, nn.MaxPool2d) or (node.op == "call_function" and node.target is F.max_pool2d)


def _is_flatten(node: fx.Node, target: nn.Module | None) -> bool:
    return (isinstance(target, nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten)
            or (node.op == "call_method" and node.target == "flatten"))


def _code_op(helper, node: fx.Node, target: nn.Module | None, src: str, name: str, const) -> object:  # noqa: ANN001
    if isinstance(target, CodeReLU):
        zp = const(f"{name}.min", target.zero_point.to(torch.uint8 if int(target.zero_point) >= 0 else torch.int8))
        return helper.make_node("Max", [src, zp], [name])
    if _is_flatten(node, target):
        start = target.start_dim if isinstance(target, nn.Flatten) else (
            node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0))
        if start != 1:
            raise ValueError("export_onnx supports flatten from dimension 1 only")
        return helper.make_node("Flatten", [src], [name], axis=1)
    if isinstance(target, nn.MaxPool2d):
        kernel, stride, padding = target.kernel_size, target.stride or target.kernel_size, target.padding
    else:
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
        stride = node.kwargs.get("stride") or (node.args[2] if len(node.args) > 2 else None) or kernel
        padding = node.kwargs.get("padding", 0)

    def pair(v: int | tuple) -> list:
        return [v, v] if isinstance(v, int) else list(v)

    return helper.make_node("MaxPool", [src], [name], kernel_shape=pair(kernel), strides=pair(stride),
                            pads=pair(padding) * 2)
