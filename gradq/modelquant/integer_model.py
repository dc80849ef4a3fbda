"""``IntegerModel``: the fx.GraphModule that ``gradq.convert`` returns. Its call runs, for inputs of a
signature it has seen, a program: the planned call of each integer module (``_Planned.planned_call``) in
graph order, as straight-line Python, without nn.Module dispatch or the modules' per-call lookups. That
is what a batch-1 forward of a small model is mostly made of (about 5 us per module).

A program is made at the first call with a signature (each input's shape, strides, dtype and device, and
``GRADQ_KERNELS``) by running the graph once; it holds the planned calls of that run, so it computes what
the module-by-module forward computes, value for value. Forward hooks (on the model, on any integer
module, or global) send every call the module-by-module way, where they run. A module that drops its
plans (``load_state_dict``, ``.to()``) makes every program stale.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn.modules import module as nn_module

from gradq._backend import ENV_VAR as KERNELS_ENV
from gradq.modelquant.integer_modules import MAX_PLANS, PLAN_EPOCH, _Planned

_TRANSIENT = ("_programs", "_planned_modules", "_arity")  # made from the graph and the modules, never state


class IntegerModel(fx.GraphModule):
    """The integer model (docs/integer.md): an fx.GraphModule of integer modules whose calls run planned
    programs (see the module docstring). Everything else is fx.GraphModule's."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        arity = self.__dict__.get("_arity")
        if arity is None:
            arity = self.__dict__["_arity"] = sum(n.op == "placeholder" for n in self.graph.nodes)
        if kwargs or len(args) != arity or not all(isinstance(a, torch.Tensor) for a in args) or self._hooked():
            return super().__call__(*args, **kwargs)
        programs = self.__dict__.setdefault("_programs", {})
        if programs.get("epoch") != PLAN_EPOCH[0]:
            programs.clear()
            programs["epoch"] = PLAN_EPOCH[0]
        key = (os.environ.get(KERNELS_ENV), *((a.shape, a.stride(), a.dtype, a.device) for a in args))
        program = programs.get(key)
        if program is None:
            if len(programs) > MAX_PLANS:
                programs.clear()
                programs["epoch"] = PLAN_EPOCH[0]
            program, out = self._record(args)
            programs[key] = program
            return out
        return program(*args)

    def recompile(self) -> object:
        for name in _TRANSIENT:  # a new graph: new programs
            self.__dict__.pop(name, None)
        return super().recompile()

    def __deepcopy__(self, memo: dict) -> IntegerModel:
        saved = {k: self.__dict__.pop(k) for k in _TRANSIENT if k in self.__dict__}
        try:
            return super().__deepcopy__(memo)
        finally:
            self.__dict__.update(saved)

    def __reduce__(self) -> tuple:
        saved = {k: self.__dict__.pop(k) for k in _TRANSIENT if k in self.__dict__}
        try:
            return super().__reduce__()
        finally:
            self.__dict__.update(saved)

    def _hooked(self) -> bool:
        if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or self._forward_hooks
                or self._forward_pre_hooks):
            return True
        planned = self.__dict__.get("_planned_modules")
        if planned is None:
            planned = self.__dict__["_planned_modules"] = [m for m in self.modules() if isinstance(m, _Planned)]
        return any(m._forward_hooks or m._forward_pre_hooks for m in planned)

    def _record(self, args: tuple[torch.Tensor, ...]) -> tuple[Callable, object]:
        """Run the graph on ``args`` once, planning each integer module's call; the program of those calls
        (a function of the inputs) and this run's output."""
        env: dict[fx.Node, object] = {}
        steps: list[tuple[Callable, list[fx.Node]]] = []
        step_of: dict[fx.Node, int] = {}
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, args, strict=True))
        result: object = None
        for node in self.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = fx.node.map_arg(node.args[0], env.__getitem__)
                out_node = node.args[0]
                break
            target = self.get_submodule(node.target) if node.op == "call_module" else None
            inputs = node.all_input_nodes
            flat = not node.kwargs and all(isinstance(a, fx.Node) for a in node.args) and len(inputs) == len(node.args)
            if isinstance(target, _Planned) and flat:
                fn = target.planned_call(*(env[a] for a in node.args))
                inputs = list(node.args)
            else:
                fn = _generic_step(self, node, target, inputs)
            env[node] = fn(*(env[a] for a in inputs))
            step_of[node] = len(steps)
            steps.append((fn, inputs))
        return _compile(steps, step_of, placeholders, out_node), result


def _generic_step(root: nn.Module, node: fx.Node, target: nn.Module | None, inputs: list[fx.Node]) -> Callable:
    """A function of ``inputs``' values computing ``node`` as the graph does (modules through their call)."""
    if node.op == "call_module":
        fn = target
    elif node.op == "call_function":
        fn = node.target
    elif node.op == "call_method":
        name = node.target

        def fn(obj: object, *a: object, **k: object) -> object:
            return getattr(obj, name)(*a, **k)
    else:  # get_attr: the attribute as it is at each call

        def fetch() -> object:
            obj: object = root
            for atom in node.target.split("."):
                obj = getattr(obj, atom)
            return obj

        return fetch

    def step(*values: object) -> object:
        lookup = dict(zip(inputs, values, strict=True))
        args = fx.node.map_arg(node.args, lookup.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, lookup.__getitem__)
        return fn(*args, **kwargs)

    return step


def _compile(steps: list[tuple[Callable, list[fx.Node]]], step_of: dict[fx.Node, int],
             placeholders: list[fx.Node], out: object) -> Callable:
    """Straight-line Python calling each step on the values it reads, returning the graph's output."""
    names = {p: f"x{i}" for i, p in enumerate(placeholders)}
    names.update({n: f"v{i}" for n, i in step_of.items()})
    lines = [f"def program({', '.join(names[p] for p in placeholders)}):"]
    namespace: dict[str, object] = {}
    for i, (fn, inputs) in enumerate(steps):
        namespace[f"f{i}"] = fn
        lines.append(f"    v{i} = f{i}({', '.join(names[a] for a in inputs)})")
    if isinstance(out, fx.Node):
        lines.append(f"    return {names[out]}")
    else:  # a structure of values
        nodes = list(dict.fromkeys(n for n in _nodes_in(out)))
        namespace["build"] = lambda *values: fx.node.map_arg(out, dict(zip(nodes, values, strict=True)).__getitem__)
        lines.append(f"    return build({', '.join(names[n] for n in nodes)})")
    exec("\n".join(lines), namespace)  # noqa: S102 - our own generated source, names only
    return namespace["program"]


def _nodes_in(arg: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, lambda n: found.append(n) or n)
    return found
