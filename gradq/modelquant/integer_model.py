"""``IntegerModel``: the fx.GraphModule that ``gradq.convert`` returns. Its call runs, for inputs of a
signature it has seen, a program: the planned call of each integer module (``_Planned.planned_call``) in
graph order, as straight-line Python, without nn.Module dispatch or the modules' per-call lookups. That
is what a batch-1 forward of a small model is mostly made of (about 4 us per module: an average pooling's
call took 5.7 us, its kernel 1.9).

A program is made at the first call with a signature (each input's shape, strides, dtype and device, and
``GRADQ_KERNELS``) by running the graph once; it holds the planned calls of that run, so it computes what
the module-by-module forward computes, value for value. It is made again when:
- a module drops its plans (``load_state_dict``, ``.to()``): every program is stale;
- a module the graph calls is replaced (``model.fc = ...``, at any depth of its path);
- a value that an integer module reads from a step other than an integer module (a float operation, a
  method, an attribute) arrives with another signature than when the program was made.
Forward hooks (on the model, on an integer module, or global) send the call the module-by-module way,
where they run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn.modules import module as nn_module

from gradq.modelquant.integer_modules import MAX_PLANS, PLAN_EPOCH, _Planned, call_key, signature

_TRANSIENT = ("_programs", "_programs_epoch", "_arity")  # made from the graph and the modules, never state


class _Stale(Exception):
    """A program met a value of another signature than when it was made."""


class _Program:
    """A recorded forward: ``run(*inputs)``, the (parent, name, child) links of every module the graph
    calls, and the integer modules it calls directly (whose hooks it would skip)."""

    def __init__(self, run: Callable, links: list[tuple[nn.Module, str, nn.Module]], planned: list[nn.Module]) -> None:
        self.run, self.links, self.planned = run, links, planned

    def current(self) -> bool:
        """Whether every module the program calls is still the model's."""
        return all(parent._modules.get(name) is child for parent, name, child in self.links)

    def hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.planned)


class IntegerModel(fx.GraphModule):
    """The integer model (docs/integer.md): an fx.GraphModule of integer modules whose calls run planned
    programs (see the module docstring). Everything else is fx.GraphModule's."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        arity = self.__dict__.get("_arity")
        if arity is None:
            arity = self.__dict__["_arity"] = sum(n.op == "placeholder" for n in self.graph.nodes)
        hooks = (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or self._forward_hooks
                 or self._forward_pre_hooks)
        if hooks or kwargs or len(args) != arity or not all(isinstance(a, torch.Tensor) for a in args):
            return super().__call__(*args, **kwargs)
        programs = self.__dict__.setdefault("_programs", {})
        if self.__dict__.get("_programs_epoch") != PLAN_EPOCH[0]:
            programs.clear()
            self.__dict__["_programs_epoch"] = PLAN_EPOCH[0]
        key = call_key(args)
        program = programs.get(key)
        if program is not None and program.current():
            if program.hooked():
                return super().__call__(*args, **kwargs)
            try:
                return program.run(*args)
            except _Stale:
                pass
        if len(programs) >= MAX_PLANS:
            programs.clear()
        called = [self.get_submodule(n.target) for n in self.graph.nodes if n.op == "call_module"]
        if any(m._forward_hooks or m._forward_pre_hooks for m in called if isinstance(m, _Planned)):
            return super().__call__(*args, **kwargs)
        program, out = self._record(args)
        programs[key] = program
        return out

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

    def __copy__(self) -> IntegerModel:
        return integer_model(self, self.graph)

    def __reduce__(self) -> tuple:
        saved = {k: self.__dict__.pop(k) for k in _TRANSIENT if k in self.__dict__}
        try:
            rebuild, args = super().__reduce__()[:2]
        finally:
            self.__dict__.update(saved)
        called = {n.target.split(".")[0] for n in self.graph.nodes if n.op == "call_module"}
        extra = {name: child for name, child in self.named_children() if name not in called}  # gradq_info
        return _unpickle, (rebuild, args, extra)

    def _record(self, args: tuple[torch.Tensor, ...]) -> tuple[_Program, object]:
        """Run the graph on ``args`` once, planning each integer module's call; the program of those calls
        and this run's output."""
        env: dict[fx.Node, object] = {}
        steps: list[tuple[Callable, list[fx.Node]]] = []
        links: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        planned: list[nn.Module] = []
        checks: dict[fx.Node, tuple] = {}  # values read by integer modules from other steps: their signature
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, args, strict=True))
        generic: set[fx.Node] = set()
        out_node: object = None
        for node in self.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out_node = node.args[0]
                break
            target = self.get_submodule(node.target) if node.op == "call_module" else None
            if target is not None:
                parent: nn.Module = self
                for atom in node.target.split("."):
                    child = parent._modules[atom]
                    links[(id(parent), atom)] = (parent, atom, child)
                    parent = child
            inputs = node.all_input_nodes
            flat = not node.kwargs and all(isinstance(a, fx.Node) for a in node.args) and len(inputs) == len(node.args)
            if isinstance(target, _Planned) and flat:
                values = [env[a] for a in node.args]
                fn = target.planned_call(*values)
                planned.append(target)
                inputs = list(node.args)
                for a, v in zip(inputs, values, strict=True):
                    if a in generic:
                        checks[a] = _signature(v)
            else:
                fn = _generic_step(self, node, target, inputs)
                generic.add(node)
            env[node] = fn(*(env[a] for a in inputs))
            steps.append((fn, inputs))
        result = fx.node.map_arg(out_node, env.__getitem__)
        run = _compile(steps, [n for n in self.graph.nodes if n.op not in ("placeholder", "output")], placeholders,
                       out_node, checks)
        return _Program(run, list(links.values()), planned), result


def integer_model(root: fx.GraphModule, graph: fx.Graph) -> IntegerModel:
    """An :class:`IntegerModel` of ``graph`` over ``root``'s modules, keeping those the graph does not call
    (``gradq_info``)."""
    model = IntegerModel(root, graph)
    for name, child in root.named_children():
        if not hasattr(model, name):
            model.add_module(name, child)
    model.meta = copy.copy(getattr(root, "meta", {}))
    return model


def _unpickle(rebuild: Callable, args: tuple, extra: dict[str, nn.Module]) -> IntegerModel:
    """fx.GraphModule's unpickling, then the :class:`IntegerModel` with the modules the graph does not call."""
    gm = rebuild(*args)
    for name, child in extra.items():
        gm.add_module(name, child)
    return integer_model(gm, gm.graph)


def _signature(value: object) -> tuple:
    return signature(value) if isinstance(value, torch.Tensor) else (type(value),)


def _check(value: object, expected: tuple) -> None:
    if _signature(value) != expected:
        raise _Stale


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


def _compile(steps: list[tuple[Callable, list[fx.Node]]], nodes: list[fx.Node], placeholders: list[fx.Node],
             out: object, checks: dict[fx.Node, tuple]) -> Callable:
    """Straight-line Python calling each step on the values it reads and returning the graph's output;
    values listed in ``checks`` are compared with their recorded signature first (:class:`_Stale` if not)."""
    names = {p: f"x{i}" for i, p in enumerate(placeholders)}
    names.update({n: f"v{i}" for i, n in enumerate(nodes)})
    lines = [f"def program({', '.join(names[p] for p in placeholders)}):"]
    namespace: dict[str, object] = {"check": _check}
    for i, (fn, inputs) in enumerate(steps):
        namespace[f"f{i}"] = fn
        lines.append(f"    v{i} = f{i}({', '.join(names[a] for a in inputs)})")
        if nodes[i] in checks:
            namespace[f"s{i}"] = checks[nodes[i]]
            lines.append(f"    check(v{i}, s{i})")
    if isinstance(out, fx.Node):
        lines.append(f"    return {names[out]}")
    else:  # a structure of values
        found: list[fx.Node] = []
        fx.node.map_arg(out, found.append)
        read = list(dict.fromkeys(found))
        namespace["build"] = lambda *values: fx.node.map_arg(out, dict(zip(read, values, strict=True)).__getitem__)
        lines.append(f"    return build({', '.join(names[n] for n in read)})")
    exec("\n".join(lines), namespace)  # noqa: S102 - our own generated source, names only
    return namespace["program"]
