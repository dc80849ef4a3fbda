"""``gradq.prepare``: trace a model with torch.fx, fold and fuse, swap in quantized layers, place
activation quantizers so that a value is rounded once between layers (docs/integer.md, section 1)."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from gradq.modelquant.config import QuantConfig, resolve_config
from gradq.modelquant.modules import KINDS, QuantLayer
from gradq.modelquant.observer import ActQuant

_BATCHNORM = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}
_RELU_FUNCTIONS = {F.relu, torch.relu}
# Operations that map values on a quantization grid to values on the same grid (eval mode).
_GRID_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_GRID_FUNCTIONS = {F.relu, torch.relu, torch.flatten, F.max_pool1d, F.max_pool2d, F.dropout}
_GRID_METHODS = {"view", "reshape", "flatten", "relu", "contiguous", "squeeze", "unsqueeze"}


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

    def __init__(self, float_names: set[str]) -> None:
        super().__init__()
        self.float_names = float_names

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.float_names or super().is_leaf_module(m, qualname)


def _float_names(model: nn.Module, config: QuantConfig) -> set[str]:
    return {name for name, _ in model.named_modules() if name and config.for_module(name)[0] is None}


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


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
        return isinstance(modules[node.target], _GRID_MODULES)
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
        relu = is_relu(user, modules)
        if relu:
            last = user
        quant = QuantLayer(layer, cfg, name, bn, relu)
        gm.add_submodule(name, quant)
        if last is not node:
            last.replace_all_uses_with(node)
            for dead in _chain(node, last):
                gm.graph.erase_node(dead)
        layers.append(node)
    return layers


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


def _place_quantizers(gm: fx.GraphModule, layers: list[fx.Node]) -> None:
    modules = dict(gm.named_modules())
    outputs: dict[fx.Node, QuantLayer] = {}
    for node in layers:
        quant = modules[node.target]
        if quant.output_quant is None:
            continue
        with gm.graph.inserting_after(node):
            out = gm.graph.call_module(f"{node.target}.output_quant", (node,))
        node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
        outputs[out] = quant
    modules = dict(gm.named_modules())
    owned: dict[tuple[fx.Node, object], tuple[fx.Node, ActQuant]] = {}  # (source, scheme) -> its input quantizer
    for node in layers:
        quant = modules[node.target]
        if quant.config.activation is None:
            continue
        source = node.args[0]
        root = _grid_source(source, modules)
        producer = outputs.get(root)
        if producer is not None and producer.output_quant.scheme == quant.config.activation:
            quant.link_input(producer.output_quant)
            continue
        key = (source, quant.config.activation)
        if key in owned:
            inp, shared = owned[key]
            quant.link_input(shared)
            node.args = (inp, *node.args[1:])
            continue
        quant.link_input(None)
        with gm.graph.inserting_before(node):
            inp = gm.graph.call_module(f"{node.target}.input_quant", (source,))
        node.args = (inp, *node.args[1:])
        owned[key] = (inp, quant.input_quant)


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
    _place_quantizers(gm, layers)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    for name, module in dict(gm.named_modules()).items():
        if name and not isinstance(module, (QuantLayer, ActQuant)) and type(module) not in KINDS:
            inside = any(name.startswith(f.name + ".") or name == f.name for f in floats)
            if any(True for _ in module.parameters(recurse=False)) and not inside:
                floats.append(FloatEntry(name, type(module).__name__, "no quantized form: runs in float"))
    gm.add_submodule("gradq_info", PreparedInfo(config, floats))
    gm.graph.lint()
    gm.recompile()
    if not layers:
        warnings.warn("gradq.prepare found no Linear/Conv1d/Conv2d to quantize in this model", stacklevel=2)
    return gm.train(training)
