"""``gradq.prepare``: trace a model with torch.fx, fold and fuse, swap in quantized layers, place
activation quantizers so that a value is rounded once between layers (docs/integer.md, section 1)."""

from __future__ import annotations

import copy
import fnmatch
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from gradq.modelquant.config import QuantConfig, resolve_config
from gradq.modelquant.modules import KINDS, QuantLayer
from gradq.modelquant.observer import ActQuant
from gradq.modelquant.quant_ops import AVG_POOLS, QuantAdd, QuantAvgPool, pool_spec

_BATCHNORM = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}
_RELU_FUNCTIONS = {F.relu, torch.relu}
# Operations that map values on a quantization grid to values on the same grid (eval mode).
_GRID_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_GRID_FUNCTIONS = {F.relu, torch.relu, torch.flatten, F.max_pool1d, F.max_pool2d, F.dropout}
_GRID_METHODS = {"view", "reshape", "flatten", "relu", "contiguous", "squeeze", "unsqueeze"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


@dataclass
class FloatEntry:
    """A module that ``prepare`` left in float, with the reason."""

    name: str
    type: str
    reason: str


class PreparedInfo(nn.Module):
    """What ``prepare`` did, kept on the prepared model as its ``gradq_info`` child (no parameters)."""

    def __init__(self, config: QuantConfig, floats: list[FloatEntry]) -> None:
        super().__init__()
        self.config, self.floats = config, floats


class _Tracer(fx.Tracer):
    """Keeps modules left in float as opaque calls (they may hold untraceable Python)."""

    def __init__(self, float_names: frozenset[str] = frozenset()) -> None:  # unpickling makes one without
        super().__init__()
        self.float_names = float_names

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.float_names or super().is_leaf_module(m, qualname)


def _float_names(model: nn.Module, config: QuantConfig) -> set[str]:
    return {name for name, _ in model.named_modules() if name and config.for_module(name)[0] is None}


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_relu6(node: fx.Node | None, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` applies ReLU6 (``nn.ReLU6`` or ``F.relu6``)."""
    if node is None:
        return False
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU6
    return node.op == "call_function" and node.target is F.relu6


def is_relu(node: fx.Node | None, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` applies a plain ReLU (module, F.relu, torch.relu or the method)."""
    if node is None:
        return False
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target == "relu"


def preserves_grid(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` maps values on a quantization grid to the same grid (eval mode; ReLU included)."""
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, _GRID_MODULES) or (isinstance(module, QuantAvgPool) and module.grid is not None)
    if node.op == "call_function":
        return node.target in _GRID_FUNCTIONS
    return node.op == "call_method" and node.target in _GRID_METHODS


def _check_patterns(model: nn.Module, config: QuantConfig) -> None:
    names = [name for name, _ in model.named_modules() if name]
    for pattern, _ in config.overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            warnings.warn(
                f"gradq.prepare: override pattern {pattern!r} matches no module of the model; module names "
                f"look like {names[:5]}",
                stacklevel=3,
            )


def _trace(model: nn.Module, config: QuantConfig) -> fx.GraphModule:
    tracer = _Tracer(_float_names(model, config))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise ValueError(
            f"gradq.prepare traces the model with torch.fx and failed: {exc}. Leave the untraceable submodule "
            "in float with config.override('<its name>', None), which keeps it as one opaque call"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _fuse(gm: fx.GraphModule, config: QuantConfig, floats: list[FloatEntry]) -> list[fx.Node]:
    """Swap each quantizable layer (with its BatchNorm and ReLU) for a QuantLayer; its nodes, in order."""
    modules = dict(gm.named_modules())
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and type(modules[n.target]) in KINDS]
    reused = sorted({t for t in calls if calls.count(t) > 1 and config.for_module(t)[0] is not None})
    if reused:
        raise ValueError(
            f"gradq.prepare: module(s) {reused} are called more than once in forward; each call needs its own "
            "quantizers: use a separate module per call, or leave them in float with config.override(name, None)"
        )
    layers = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in KINDS:
            continue
        layer, name = modules[node.target], node.target
        cfg, pattern = config.for_module(name)
        if cfg is None:
            floats.append(FloatEntry(name, type(layer).__name__, f"left in float by override {pattern!r}"))
            continue
        last, bn = node, None
        user = _single_user(node)
        if (
            type(layer) in _BATCHNORM
            and user is not None
            and user.op == "call_module"
            and type(modules[user.target]) is _BATCHNORM[type(layer)]
        ):
            bn, last = modules[user.target], user
            user = _single_user(user)
        relu6 = is_relu6(user, modules)
        relu = relu6 or is_relu(user, modules)
        if relu:
            last = user
        quant = QuantLayer(layer, cfg, name, bn, relu, relu6)
        gm.add_submodule(name, quant)
        if last is not node:
            last.replace_all_uses_with(node)
            for dead in _chain(node, last):
                gm.graph.erase_node(dead)
        layers.append(node)
    return layers


def _is_tensor_add(node: fx.Node) -> bool:
    plain = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    return plain and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def _produces_codes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value comes (through grid-preserving ops) from a quantized layer's or add's output."""
    root = _grid_source(node, modules)
    module = modules.get(root.target) if root.op == "call_module" else None
    quantized_layer = isinstance(module, QuantLayer) and module.output_quant is not None
    return isinstance(module, (QuantAdd, ActQuant)) or quantized_layer


def _note_float_ops(gm: fx.GraphModule, floats: list[FloatEntry]) -> None:
    """Record every operation that reads codes but has no integer form: it runs in float between a
    dequantize and a quantize in the integer model."""
    modules = dict(gm.named_modules())
    listed = {f.name for f in floats}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or preserves_grid(node, modules):
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (QuantLayer, ActQuant, QuantAdd, QuantAvgPool)):
            continue
        name = node.target if module is not None else node.name
        if name in listed or not any(_produces_codes(a, modules) for a in node.all_input_nodes):
            continue
        kind = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
        floats.append(FloatEntry(name, kind, "no integer form: runs in float between a dequantize and a quantize"))
        listed.add(name)


def _fuse_adds(gm: fx.GraphModule, config: QuantConfig, floats: list[FloatEntry]) -> list[fx.Node]:
    """Swap each tensor add of a quantized value (with a ReLU that follows) for a QuantAdd; its nodes."""
    adds = []
    for node in list(gm.graph.nodes):
        modules = dict(gm.named_modules())
        if not _is_tensor_add(node) or not any(_produces_codes(a, modules) for a in node.args):
            continue
        cfg, pattern = config.for_module(node.name)
        if cfg is None or cfg.activation is None:
            floats.append(FloatEntry(node.name, "add", f"left in float by override {pattern!r}"))
            continue
        user = _single_user(node)
        relu = is_relu(user, modules)
        name = f"quant_{node.name}"
        gm.add_submodule(name, QuantAdd(cfg, name, relu))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, tuple(node.args))
        last = user if relu else node
        last.replace_all_uses_with(new)
        if relu:
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        adds.append(new)
    return adds


def _swap_pools(gm: fx.GraphModule, floats: list[FloatEntry]) -> None:
    """Swap average-pooling modules for QuantAvgPool (integer once linked to a grid); others stay float."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, AVG_POOLS):
            continue
        spec, why = pool_spec(module)
        if spec is None:
            floats.append(FloatEntry(node.target, type(module).__name__, f"{why}: runs in float"))
            continue
        gm.add_submodule(node.target, QuantAvgPool(module, spec, node.target))


def _chain(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """The fused nodes after ``first`` up to ``last``, last first (erase order)."""
    chain, node = [], last
    while node is not first:
        chain.append(node)
        node = node.args[0]
    return chain


def _grid_source(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    while preserves_grid(node, modules) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _place_quantizers(gm: fx.GraphModule, producers: list[fx.Node]) -> None:
    """An output quantizer after each quantized layer and add; then, in graph order, each layer's, add's and
    average pool's input linked to the quantizer whose codes it carries, or given its own."""
    modules = dict(gm.named_modules())
    outputs: dict[fx.Node, QuantLayer | QuantAdd] = {}
    for node in producers:
        quant = modules[node.target]
        if quant.output_quant is None:
            continue
        with gm.graph.inserting_after(node):
            out = gm.graph.call_module(f"{node.target}.output_quant", (node,))
        node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
        outputs[out] = quant
    owned: dict[tuple[fx.Node, object], tuple[fx.Node, ActQuant]] = {}  # (source, scheme) -> its input quantizer

    def source_quant(source: fx.Node, scheme: object) -> ActQuant | None:
        producer = outputs.get(_grid_source(source, modules))
        return producer.output_quant if producer is not None and producer.output_quant.scheme == scheme else None

    def own_quant(user: fx.Node, source: fx.Node, scheme: object, make: object) -> tuple[fx.Node, ActQuant]:
        key = (source, scheme)
        if key not in owned:
            quant, target = make()
            with gm.graph.inserting_before(user):
                owned[key] = (gm.graph.call_module(target, (source,)), quant)
        return owned[key]

    for node in list(gm.graph.nodes):
        modules = dict(gm.named_modules())
        target = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(target, QuantLayer) and target.config.activation is not None:
            scheme, source = target.config.activation, node.args[0]
            shared = source_quant(source, scheme)
            if shared is None:
                def make(t: QuantLayer = target, n: fx.Node = node) -> tuple[ActQuant, str]:
                    t.link_input(None)  # creates its own input_quant
                    return t.input_quant, f"{n.target}.input_quant"

                inp, shared = own_quant(node, source, scheme, make)
                node.args = (inp, *node.args[1:])
            target.link_input(shared)
        elif isinstance(target, QuantAdd):
            scheme, quants, args = target.config.activation, [], []
            for which, source in zip("ab", node.args, strict=True):
                shared = source_quant(source, scheme)
                if shared is None:
                    def make(t: QuantAdd = target, w: str = which, n: fx.Node = node) -> tuple[ActQuant, str]:
                        return t.new_input_quant(w), f"{n.target}.input_quant_{w}"

                    source, shared = own_quant(node, source, scheme, make)
                quants.append(shared)
                args.append(source)
            target.link_inputs(*quants)
            node.args = tuple(args)
        elif isinstance(target, QuantAvgPool):
            producer = outputs.get(_grid_source(node.args[0], modules))
            if producer is not None:
                target.link_input(producer.output_quant)


def prepare(model: nn.Module, config: QuantConfig | str | None = None, *, inplace: bool = False) -> fx.GraphModule:
    """A fake-quantized copy of ``model`` (a torch.fx GraphModule) for calibration (PTQ) or training (QAT).

    ``config``: a :class:`QuantConfig`, a preset name (``"w8a8"``, ``"w4a8"``, ...) or None (``w8a8``).
    Each ``Linear``/``Conv1d``/``Conv2d`` becomes a :class:`~gradq.modelquant.modules.QuantLayer`; a Conv
    followed only by its BatchNorm has it folded in (running statistics; the BN is frozen from then on),
    and a ReLU that follows is fused as the output clamp. Activation quantizers are placed at each
    quantized layer's output and at inputs that no quantized layer produced. ``inplace=True`` reuses the
    model's modules instead of copying them (the model itself is then not usable on its own). The result
    keeps the model's train/eval mode; ``gradq.quant_report`` describes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare takes an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (QuantLayer, PreparedInfo)) for m in model.modules()):
        raise ValueError("this model is already prepared; prepare the original float model")
    config = resolve_config(config)
    _check_patterns(model, config)
    source = model if inplace else copy.deepcopy(model)
    if type(source) in KINDS:  # a bare layer: trace it as the only child of a Sequential (named "0")
        source = nn.Sequential(source).train(source.training)
    training = source.training
    gm = _trace(source, config)
    floats: list[FloatEntry] = []
    layers = _fuse(gm, config, floats)
    adds = _fuse_adds(gm, config, floats) if layers else []
    _swap_pools(gm, floats)
    _place_quantizers(gm, layers + adds)
    _note_float_ops(gm, floats)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    for name, module in dict(gm.named_modules()).items():
        quantized = isinstance(module, (QuantLayer, ActQuant, QuantAdd, QuantAvgPool)) or type(module) in KINDS
        if name and not quantized:
            inside = any(name.startswith(f.name + ".") or name == f.name for f in floats)
            if any(True for _ in module.parameters(recurse=False)) and not inside:
                floats.append(FloatEntry(name, type(module).__name__, "no quantized form: runs in float"))
    gm.add_submodule("gradq_info", PreparedInfo(config, floats))
    gm.graph.lint()
    gm.recompile()
    if not layers:
        warnings.warn("gradq.prepare found no Linear/Conv1d/Conv2d to quantize in this model", stacklevel=2)
    return gm.train(training)
