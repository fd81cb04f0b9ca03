"""Front end: capture an nn.Module as an FX GraphModule, then describe it as a DataflowGraph.

Two capture paths:

- no ``example_inputs``: ``torch.fx`` symbolic tracing that traces *through* every module
  (parameters become ``get_attr`` nodes, so their casts are visible), except recurrent modules,
  whose forward branches on input properties and which stay one ``rnn`` node;
- with ``example_inputs``: ``torch.export.export(strict=False)`` with the batch dimension
  dynamic (``Dim.AUTO``; ``dynamic_shapes`` shaped like forward's signature, ``*args``
  included), then the exported program's module. Dtypes and shapes come from the fake tensors
  export records.

Both graphs are then functionalized (``functionalize``): in-place and ``out=`` calls become
their out-of-place forms, because a cast inserted in front of an in-place op would hand it a
copy to write into; writes into model inputs and buffers are written back with ``copy_``.

Both paths keep a custom ``torch.autograd.Function`` as ONE node that calls ``Fn.apply``
(``FunctionCall``), so training runs the Function's own backward; the op is named after the
Function and, being in no policy table, stays fp32 unless the user overrides it.

    >>> gm, source = capture(model)                         # fx
    >>> gm, source = capture(model, (torch.randn(2, 784),)) # torch.export
    >>> graph = build_dataflow(gm)
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import inspect
import itertools
import os
import sys
import operator
import traceback
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from amp_compiler.errors import TraceError, UnsupportedModelError
from amp_compiler.passes.graph import DataflowGraph
from amp_compiler.passes.kinds import LEAF_MODULE_KINDS, torch_kind
from amp_compiler.passes.policy import CAST_ONLY_ARGS, NON_FLOAT

# Arguments that carry integers or booleans by the op's definition (torch-level positions and
# keyword names). Only needed where tracing recorded no dtypes (the fx path): such inputs are
# never cast. Source: the torch.nn.functional / torch signatures.
NON_FLOAT_ARGS: dict[str, tuple] = {
    "embedding": (0, "input"),
    "masked_fill": (1, "mask"),
    "where": (0, "condition"),
    "cross_entropy": (1, "target"),
    "nll_loss": (1, "target"),
    "gather": (2, "index"),
    "scatter": (2, "index"),
    "index_put": (1, "indices"),
    "getitem": (1,),
}

# Consumers that read a value without computing on its floating-point data: they never cause a
# cast and do not count as low/fp32 neighbours.
_NO_CAST_KINDS = NON_FLOAT | {"cast", "getitem", "output"}


def _fqn(mod: type) -> str:
    return f"{mod.__module__}.{mod.__qualname__}"


def leaf_kind(m: nn.Module) -> str | None:
    """Kind of a leaf module class, subclasses included (resnet's BatchNorm2d is one)."""
    for cls in type(m).__mro__:
        kind = LEAF_MODULE_KINDS.get(_fqn(cls))
        if kind is not None:
            return kind
    return None


class _ThroughTracer(fx.Tracer):
    """Traces through every module except recurrent ones; remembers where it was on failure."""

    def __init__(self) -> None:
        super().__init__()
        self.path_stack: list[str] = []
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return leaf_kind(m) is not None

    def call_module(self, m, forward, args, kwargs):
        self.path_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_at = self.failed_at or self.path_stack[-1]
            raise
        finally:
            self.path_stack.pop()


def _user_frame(tb) -> str:
    """The innermost traceback frame outside torch: the model line that broke tracing."""
    own = {os.path.dirname(os.path.abspath(__file__)),
           os.path.dirname(os.path.abspath(DataflowGraph.__module__ and sys.modules[DataflowGraph.__module__].__file__))}
    # our own pipeline files are skipped, the bundled reference models (a sub-folder) are not
    frames = [f for f in traceback.extract_tb(tb)
              if "/torch/" not in f.filename.replace("\\", "/")
              and os.path.dirname(os.path.abspath(f.filename)) not in own]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} `{(f.line or '').strip()}`"


# -- custom autograd.Function: one node that calls Fn.apply ------------------------------------

class FunctionCall:
    """Graph target standing for ``fn.apply(*args)``: calling ``apply`` (not the forward's ops)
    is what makes autograd run the Function's own backward. Named after the Function, which
    becomes the node's op kind. ``baked``: arguments a graph cannot hold (callables, modules),
    by position, passed as they were at capture time."""

    def __init__(self, fn: type, baked: dict[int, Any] | None = None) -> None:
        self.fn = fn
        self.baked = dict(baked or {})
        self.__name__ = fn.__name__
        self.__qualname__ = f"{fn.__qualname__}.apply"
        self.__module__ = fn.__module__

    def __call__(self, *args: Any) -> Any:
        args = list(args)
        for i, value in self.baked.items():
            args[i] = value
        return self.fn.apply(*args)

    def __repr__(self) -> str:
        return f"{self.fn.__qualname__}.apply"


_FUNCTION_CALLS: dict[type, FunctionCall] = {}


def _function_call(fn: type, baked: dict[int, Any]) -> FunctionCall:
    """One shared target per Function class (a fresh one only when arguments are baked)."""
    if baked:
        return FunctionCall(fn, baked)
    if fn not in _FUNCTION_CALLS:
        _FUNCTION_CALLS[fn] = FunctionCall(fn)
    return _FUNCTION_CALLS[fn]


_GRAPH_LEAF_TYPES = (int, float, bool, complex, str, type(None), torch.dtype, torch.device,
                     torch.layout, torch.memory_format, slice, type(...))


def _graph_holds(a: Any, is_value) -> bool:
    """Whether an argument can be written in a graph: values, plain constants, containers."""
    if is_value(a) or isinstance(a, _GRAPH_LEAF_TYPES):
        return True
    if isinstance(a, (tuple, list)):
        return all(_graph_holds(x, is_value) for x in a)
    if isinstance(a, dict):
        return all(isinstance(k, str) and _graph_holds(v, is_value) for k, v in a.items())
    return False


def _split_baked(args: tuple, is_value) -> tuple[tuple, dict[int, Any]]:
    """Arguments for the node (unrepresentable ones replaced by None) and the baked ones."""
    baked = {i: a for i, a in enumerate(args) if not _graph_holds(a, is_value)}
    return tuple(None if i in baked else a for i, a in enumerate(args)), baked


_ORIGINAL_APPLY = inspect.getattr_static(torch.autograd.Function, "apply")


def _original_apply(fn: type, *args: Any, **kwargs: Any) -> Any:
    return _ORIGINAL_APPLY.__func__(fn, *args, **kwargs)


def _is_torch_function(fn: type) -> bool:
    return str(getattr(fn, "__module__", "")).startswith("torch.")


@contextlib.contextmanager
def _function_apply_as(handler):
    """Route every ``SomeFunction.apply(...)`` through ``handler(fn, args, kwargs)`` meanwhile
    (Functions overriding ``apply`` themselves are not seen)."""
    def apply(fn, *args, **kwargs):
        return handler(fn, args, kwargs)
    before = inspect.getattr_static(torch.autograd.Function, "apply")
    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = before


def _fx_apply(fn: type, args: tuple, kwargs: dict) -> Any:
    """During fx tracing: a Function applied to traced values becomes one ``FunctionCall`` node."""
    proxies = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)]
    if not proxies or _is_torch_function(fn):  # torch's own (reentrant checkpoint) trace through
        return _original_apply(fn, *args, **kwargs)
    node_args, baked = _split_baked(args, lambda a: isinstance(a, fx.Proxy))
    if not _graph_holds(kwargs, lambda a: isinstance(a, fx.Proxy)):
        raise TypeError(f"{fn.__qualname__}.apply called with keyword arguments a graph cannot hold")
    return proxies[0].tracer.create_proxy("call_function", _function_call(fn, baked), node_args, kwargs)


@dataclasses.dataclass
class _PendingCall:
    """A Function application seen during one torch.export, until its node is rewritten."""

    fn: type
    spec: Any                 # pytree spec of (args, kwargs)
    leaves: list              # non-tensor leaves in place, None where a tensor goes
    slots: frozenset          # leaf positions holding tensors
    single: bool = True       # forward returned one tensor (else a tuple of tensors)


_PENDING: dict[int, _PendingCall] = {}
_pending_keys = itertools.count()
_running_forward = [0]  # >0 while a stand-in op runs: Functions applied inside it are inlined
_FUNCTION_OP: list = []


def _run_pending(tensors: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    """The forward of a pending Function on ``tensors`` (fake ones during export), as a list."""
    call = _PENDING[key]
    given = iter(tensors)
    leaves = [next(given) if i in call.slots else v for i, v in enumerate(call.leaves)]
    args, kwargs = torch.utils._pytree.tree_unflatten(leaves, call.spec)
    out = _original_apply(call.fn, *args, **kwargs)
    call.single = isinstance(out, torch.Tensor)
    outs = [out] if call.single else list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise UnsupportedModelError(
            f"{call.fn.__qualname__}.forward returns a non-tensor output; torch.export "
            f"cannot keep this autograd.Function as one op: convert without example_inputs (fx "
            f"tracing), or register it with torch.library.custom_op")
    return [o.clone() for o in outs]  # a custom op's outputs may not alias its inputs


def _function_op():
    """``amp_compiler::autograd_function``, registered on first use: the stand-in node torch.export
    records for a Function (its fake kernel runs the real forward on fake tensors)."""
    if not _FUNCTION_OP:
        op = torch.library.custom_op("amp_compiler::autograd_function", _run_pending, mutates_args=(),
                                     schema="(Tensor[] tensors, int key) -> Tensor[]")
        op.register_fake(_run_pending)
        _FUNCTION_OP.append(torch.ops.amp_compiler.autograd_function.default)
    return _FUNCTION_OP[0]


def _export_apply(fn: type, args: tuple, kwargs: dict) -> Any:
    """During torch.export: a Function applied to tensors becomes one stand-in custom-op node."""
    leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    slots = frozenset(i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor))
    # torch's own Functions (the custom op's autograd wrapper among them) are its business
    if not slots or _running_forward[0] or _is_torch_function(fn):
        return _original_apply(fn, *args, **kwargs)
    symbolic = [v for v in leaves if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))]
    if symbolic:
        raise UnsupportedModelError(
            f"{fn.__qualname__}.apply receives a size that depends on the input shape ({symbolic[0]}); "
            f"torch.export cannot keep the Function as one op: compute it inside the Function, or "
            f"convert without example_inputs (fx tracing)")
    key = next(_pending_keys)
    _PENDING[key] = call = _PendingCall(fn, spec, [None if i in slots else v for i, v in enumerate(leaves)], slots)
    op = _function_op()
    _running_forward[0] += 1  # the op's own dispatch may apply Functions: not ours to record
    try:
        outs = op([leaves[i] for i in sorted(slots)], key)
    finally:
        _running_forward[0] -= 1
    return outs[0] if call.single else tuple(outs)


def _keep_function_calls(gm: fx.GraphModule) -> None:
    """Replace each stand-in node of an export by one ``FunctionCall`` node (recompiles)."""
    graph = gm.graph
    stand_ins = [n for n in graph.nodes if _FUNCTION_OP and n.op == "call_function" and n.target is _FUNCTION_OP[0]]
    for node in stand_ins:
        call = _PENDING[node.args[1]]
        given = iter(node.args[0])
        leaves = [next(given) if i in call.slots else v for i, v in enumerate(call.leaves)]
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, call.spec)
        node_args, baked = _split_baked(args, lambda a: isinstance(a, fx.Node))
        with graph.inserting_before(node):
            new = graph.call_function(_function_call(call.fn, baked), node_args, kwargs)
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        if call.single:  # the stand-in returned [out]: its readers are getitem(node, 0)
            for item in list(node.users):
                new.meta["val"] = item.meta.get("val")
                item.replace_all_uses_with(new)
                graph.erase_node(item)
        else:
            new.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(new)
        graph.erase_node(node)
    if stand_ins:
        graph.lint()
        gm.recompile()


def symbolic_capture(model: nn.Module) -> fx.GraphModule:
    """fx.symbolic_trace through every submodule, then ``functionalize``; TraceError names the
    module path and line."""
    tracer = _ThroughTracer()
    # optional arguments (``targets=None``) take their defaults: fx cannot branch on them
    params = inspect.signature(model.forward).parameters.values()
    concrete = {p.name: None for p in params if p.default is None}
    # fx runs an in-place op whose operands are all real tensors (``self.buf.mul_(0.9)``) once,
    # at capture, instead of recording it: version counters show it, the copies undo it
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    versions = {name: t._version for name, t in tensors.items()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with _function_apply_as(_fx_apply):
            graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 -- any tracing failure becomes one typed error
        where = tracer.failed_at or "<root>"
        raise TraceError(
            f"model is not symbolically traceable at `{where or '<root>'}` ({_user_frame(exc.__traceback__)}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass "
            f"example_inputs=(...) to convert() to use torch.export instead") from exc
    finally:
        written = [name for name, t in tensors.items() if t._version != versions[name]]
        with torch.no_grad():
            for name in written:
                if name in buffers:
                    tensors[name].copy_(buffers[name])
    if written:
        raise TraceError(
            f"forward writes into `{written[0]}` with an in-place op on stored tensors only (e.g. "
            f"`self.{written[0]}.mul_(0.9)`): fx tracing would run it once at capture instead of on "
            f"every call. Pass example_inputs=(...) to convert() to use torch.export, or write the "
            f"update out of place and assign it back")
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    functionalize(gm)
    return gm


# -- functionalize: in-place ops become out-of-place ones ---------------------------------------

# Kinds whose result may share memory with their first input (a view, or the input itself when
# nothing changes: ``to`` in the same dtype, eval-mode dropout): a write through one is seen
# through the others.
_ALIASING_KINDS = frozenset({
    "view", "transpose", "permute", "expand", "select", "split", "chunk", "getitem", "identity",
    "detach", "contiguous", "cast", "dropout", "as_strided", "diagonal", "unfold", "movedim",
    "moveaxis", "broadcast_to", "real", "imag", "view_as_real", "view_as_complex",
})
_SPLIT_KINDS = frozenset({"split", "chunk"})  # their pieces never overlap one another

# In-place calls kept as written: no out-of-place form of the same meaning (``bernoulli_(p)``
# draws with probability p, ``bernoulli()`` reads it from the tensor), no data written
# (``requires_grad_``), or the write-back primitive itself (``copy_``).
_NOT_FUNCTIONAL = frozenset({
    "requires_grad_", "bernoulli_", "resize_", "resize_as_", "set_", "share_memory_", "copy_",
})

_COPY = torch.ops.aten.copy_.default


def _inplace_form(node: fx.Node) -> tuple[fx.Node, tuple | None] | None:
    """For a call that writes into a tensor: (that tensor, the out-of-place call as
    (target, args, kwargs), or None when it has none). None for every other node."""
    if node.op not in ("call_method", "call_function"):
        return None
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}
        if isinstance(node.target, torch._ops.OpOverload):  # export: ``aten.mul.out``
            fn = _functional_overload(node.target)
            return out, (fn, node.args, kwargs) if fn is not None else None
        return out, (node.target, node.args, kwargs)
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if isinstance(node.target, torch._ops.OpOverload):  # export: ``aten.add_.Tensor``
        name = node.target._overloadpacket.__name__
        if not name.endswith("_") or name.startswith("_"):
            return None
        if name in _NOT_FUNCTIONAL:
            return first, None
        packet = getattr(getattr(torch.ops, node.target.namespace), name[:-1], None)
        fn = getattr(packet, node.target._overloadname, None) if packet is not None else None
        return first, (fn, node.args, node.kwargs) if fn is not None and not fn._schema.is_mutable else None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if not isinstance(name, str):
        return None
    if name.endswith("_") and not name.startswith("_"):
        base = name[:-1]
        if name in _NOT_FUNCTIONAL:
            return first, None
        if node.op == "call_method":
            if callable(getattr(torch.Tensor, base, None)):
                return first, (base, node.args, node.kwargs)
            fn = getattr(torch, base, None)  # ``fill_`` -> ``torch.fill``
            return first, (fn, node.args, node.kwargs) if callable(fn) else None
        for namespace in (torch.nn.functional, torch):
            if getattr(namespace, name, None) is node.target:
                fn = getattr(namespace, base, None)
                return first, (fn, node.args, node.kwargs) if callable(fn) else None
        return None  # a function of the user's that happens to end in "_"
    if node.op == "call_function" and str(getattr(node.target, "__module__", "")).startswith("torch"):
        signature = _signature(node.target)
        try:  # ``F.relu(x, inplace=True)``, also ``nn.ReLU(inplace=True)`` traced through
            bound = signature.bind(*node.args, **node.kwargs) if signature is not None else None
        except TypeError:
            return None
        if bound is None:
            return None
        if bound.arguments.get("inplace") is True:
            if "inplace" in node.kwargs:
                return first, (node.target, node.args, {**node.kwargs, "inplace": False})
            bound.arguments["inplace"] = False
            return first, (node.target, bound.args, bound.kwargs)
    return None


@functools.lru_cache(maxsize=None)
def _signature(fn) -> inspect.Signature | None:
    """``fn``'s signature if it takes an ``inplace`` argument (read once per function)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a text signature
        return None
    return signature if "inplace" in signature.parameters else None


def _functional_overload(op: torch._ops.OpOverload):
    """The overload of ``op``'s packet taking the same arguments minus ``out``, writing nothing."""
    want = [a.name for a in op._schema.arguments if not getattr(a, "is_out", a.name == "out")]
    for name in op._overloadpacket.overloads():
        candidate = getattr(op._overloadpacket, name)
        if not candidate._schema.is_mutable and [a.name for a in candidate._schema.arguments] == want:
            return candidate
    return None


def _alias_parent(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The value ``node``'s result may share memory with, if any."""
    form = _inplace_form(node)
    if form is not None:
        return form[0]
    if (node.op in ("call_method", "call_function") and node.args and isinstance(node.args[0], fx.Node)
            and node_kind(node, gm) in _ALIASING_KINDS):
        return node.args[0]
    return None


def _alias_root(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    while (parent := _alias_parent(node, gm)) is not None:
        node = parent
    return node


def _is_source(node: fx.Node) -> bool:
    """A model input, parameter or buffer: a write into it is seen by the caller."""
    return node.op in ("placeholder", "get_attr")


def _read_alias_after(node: fx.Node, dest: fx.Node, gm: fx.GraphModule,
                      order: dict[fx.Node, float]) -> bool:
    """Whether a value made before ``node`` that may share memory with ``dest`` (``dest`` itself
    aside) is read after ``node``: then the write must reach ``dest``'s memory."""
    path = [dest]
    while (parent := _alias_parent(path[-1], gm)) is not None:
        path.append(parent)
    on_path = set(path)
    at = order[node]
    stack, seen = [path[-1]], set()
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m is not dest and any(order[u] > at for u in m.users):
            return True
        on_path_child = next((u for u in m.users if u in on_path), None)
        for u in m.users:
            if order[u] >= at or _alias_parent(u, gm) is not m:
                continue
            if (node_kind(m, gm) in _SPLIT_KINDS and u not in on_path and on_path_child is not None
                    and u.target is operator.getitem and on_path_child.target is operator.getitem
                    and isinstance(u.args[1], int) and isinstance(on_path_child.args[1], int)
                    and u.args[1] != on_path_child.args[1]):
                continue  # another piece of the same split: disjoint memory
            stack.append(u)
    return False


def functionalize(gm: fx.GraphModule) -> None:
    """Rewrite in-place and ``out=`` calls into their out-of-place forms and make later readers
    of the written tensor read the new value (in place; recompiles if anything changed). Both
    capture paths need it: fx records in-place calls as written, and torch.export's training IR
    keeps aten in-place ops.

    Why: a cast inserted in front of an in-place op gives it a copy to write into, and readers
    of the original tensor never see the write. Out of place, every value is one node.

    Where the written memory is seen elsewhere -- a model input or buffer (the caller sees it),
    or another view read afterwards -- an ``aten.copy_`` writes the new value back right after
    the op (``build_dataflow`` never casts its source, nor a destination that is an input or
    buffer, so it lands on the real tensor in that tensor's dtype). Calls with no out-of-place
    form (``bernoulli_``, ``copy_``) are kept; later readers then read the call's result.
    """
    graph = gm.graph
    order: dict[fx.Node, float] = {n: i for i, n in enumerate(graph.nodes)}
    stands_for: dict[fx.Node, fx.Node] = {}  # rewritten node -> the tensor it wrote into
    changed = False
    for node in list(graph.nodes):
        form = _inplace_form(node)
        if form is None:
            continue
        dest, functional = form
        if functional is None:  # kept: readers follow the call's result, as torch.export does
            if not _is_source(_alias_root(dest, gm)):
                for user in [u for u in dest.users if order[u] > order[node]]:
                    user.replace_input_with(dest, node)
                    changed = True
            continue
        changed = True
        # the memory written: a rewritten value stands for the tensor its op wrote into
        home = dest
        while home in stands_for:
            home = stands_for[home]
        ancestors = []
        while (parent := _alias_parent(ancestors[-1] if ancestors else home, gm)) is not None:
            ancestors.append(parent)
        if any(a in stands_for for a in ancestors):
            raise UnsupportedModelError(
                f"in-place `{target_name(node)}` ({node.name}) writes through a view of a value that "
                f"an earlier in-place op already rewrote; this aliasing cannot be kept: write the "
                f"ops out of place")
        root = ancestors[-1] if ancestors else home
        write_back = _is_source(root) or _read_alias_after(node, home, gm, order)
        node.target, node.args, node.kwargs = functional
        stands_for[node] = dest
        stale = [dest]
        if dest.op == "get_attr":  # each ``self.buf`` in the source is its own get_attr node
            stale += [n for n in graph.nodes if n.op == "get_attr" and n.target == dest.target
                      and order[n] > order[node]]
        for old in stale:
            for user in [u for u in old.users if order[u] > order[node]]:
                user.replace_input_with(old, node)
            if old is not dest and not old.users:
                graph.erase_node(old)
        if write_back:
            with graph.inserting_after(node):
                back = graph.call_function(_COPY, (home, node))
            back.meta.update({k: v for k, v in home.meta.items() if k == "val"})
            order[back] = order[node] + 0.5
        elif not dest.users and dest.op == "call_function" and node_kind(dest, gm) == "factory":
            graph.erase_node(dest)  # the ``out=`` buffer, now never written
    if changed:
        graph.lint()
        gm.recompile()


def export_capture(model: nn.Module, example_inputs: tuple, *, dynamic_batch: bool = True) -> fx.GraphModule:
    """torch.export (non-strict), batch dimension dynamic; returns the exported module."""
    from torch.export import Dim, export

    dynamic_shapes = _batch_dynamic_shapes(model, example_inputs, Dim.AUTO) if dynamic_batch else None
    try:
        with _function_apply_as(_export_apply):
            ep = export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
        gm = ep.module()
        _keep_function_calls(gm)
        functionalize(gm)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        ours = _cause_of_type(exc, UnsupportedModelError)  # raised inside torch's tracing
        if ours is not None:
            raise ours from exc
        raise TraceError(f"torch.export could not capture the model ({_user_frame(exc.__traceback__)}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                         f"{_export_hint(exc)}") from exc
    finally:
        _PENDING.clear()
    _rebind_parameters(gm, model)
    return gm


def _batch_dynamic_shapes(model: nn.Module, example_inputs: tuple, auto) -> tuple:
    """torch.export's ``dynamic_shapes``: dimension 0 of every tensor input dynamic, shaped like
    forward's parameters (one entry per positional parameter; a ``*args`` parameter takes one
    entry, the tuple of its inputs' specs)."""
    def spec(a):
        return {0: auto} if isinstance(a, torch.Tensor) and a.dim() > 0 else None

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no readable signature: one entry per input
        return tuple(spec(a) for a in example_inputs)
    entries, rest = [], list(example_inputs)
    for p in params:
        if not rest:
            break
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            entries.append(tuple(spec(a) for a in rest))
            rest = []
        elif p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            entries.append(spec(rest.pop(0)))
    return tuple(entries) + tuple(spec(a) for a in rest)  # extra inputs: export reports the misuse


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (torch wraps errors while tracing)."""
    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _cause_of_type(exc: BaseException, kind: type) -> BaseException | None:
    return next((e for e in _chain(exc) if isinstance(e, kind)), None)


def _export_hint(exc: BaseException) -> str:
    """What to do about a torch.export failure: control-flow advice only where it applies."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    chain = _chain(exc)
    if any(isinstance(e, GuardOnDataDependentSymNode) or "data-dependent" in str(e).lower()
           or "data dependent" in str(e).lower() for e in chain):
        return ("Data-dependent Python control flow cannot be captured: rewrite it with "
                "torch.where / torch.cond, or convert the submodules that are traceable")
    # an output (or input) class torch.export cannot flatten: torch >= 2.12 names pytree,
    # torch 2.11 fails on hashing the unregistered dataclass instead
    if any("pytree" in str(e).lower() or "unhashable type" in str(e) for e in chain):
        return ("forward takes or returns a class torch.export cannot flatten: register it as a "
                "pytree node (torch.utils._pytree.register_dataclass or register_pytree_node), "
                "or use tensors, tuples, lists and dicts")
    return ("Convert without example_inputs to use fx symbolic tracing instead, or see "
            "torch.export's troubleshooting guide for this error")


def _rebind_parameters(gm: nn.Module, model: nn.Module) -> None:
    """Make the exported module hold the user's own Parameter objects (fp32 master weights)."""
    originals = dict(model.named_parameters(remove_duplicate=False))
    for name, _ in list(gm.named_parameters(remove_duplicate=False)):
        if name in originals:
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if owner._parameters.get(leaf) is not originals[name]:
                owner._parameters[leaf] = originals[name]


def capture(model: nn.Module, example_inputs: tuple | None = None, *,
            dynamic_batch: bool = True) -> tuple[fx.GraphModule, str]:
    """Capture ``model``: ("fx" | "export"), see the module docstring."""
    if example_inputs is None:
        return symbolic_capture(model), "fx"
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return export_capture(model, example_inputs, dynamic_batch=dynamic_batch), "export"


# -- FX -> DataflowGraph ------------------------------------------------------------------------

def target_name(node: fx.Node) -> str:
    """The op's own name: aten packet name, function __name__, method name, or module class."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op == "call_module":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    return getattr(t, "__name__", str(t))


def node_kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """Canonical kind of an FX node."""
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "param"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if node.target == "_guards_fn" or type(mod).__name__.endswith("GuardsFn"):
            return "guards"
        return leaf_kind(mod) or f"module:{type(mod).__name__}"
    if node.op == "call_function" and node.target is builtins.getattr:
        return "shape"
    if node.op == "call_function" and node.target is operator.getitem:
        return "getitem"
    return torch_kind(target_name(node))


def _meta_dtype(node: fx.Node):
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if isinstance(val, torch.Tensor):
        return val.dtype, tuple(val.shape), True
    if val is not None and hasattr(val, "dtype") and hasattr(val, "shape"):  # TensorMetadata
        return val.dtype, tuple(val.shape), True
    if isinstance(val, (tuple, list)):
        return None, None, True  # a tuple of tensors: known, but not one dtype
    return None, None, val is not None


# Submodule names torch.export invents (guard checks, metadata hooks): no module of the user's,
# so their nodes belong to the root in reports and overrides.
_EXPORT_INTERNAL_PATHS = frozenset({"_guards_fn", "_empty_nn_module_stack_from_metadata_hook"})


def _module_info(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str | None]:
    path, mtype = _raw_module_info(node, gm)
    if path.split(".")[0] in _EXPORT_INTERNAL_PATHS:
        return "", None
    return path, mtype


def _raw_module_info(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str | None]:
    if node.op == "get_attr":
        path = str(node.target).rpartition(".")[0]
        try:
            return path, _fqn(type(gm.get_submodule(path))) if path else None
        except AttributeError:
            return path, None
    if node.op == "call_module":
        return str(node.target), _fqn(type(gm.get_submodule(node.target)))
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    path, mtype = list(stack.values())[-1]
    if not isinstance(mtype, str):
        mtype = _fqn(mtype)
    path = path if isinstance(path, str) else str(path)
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path, mtype


def _castable(kind: str, position, key: str | None, has_meta: bool) -> bool:
    only = CAST_ONLY_ARGS.get(kind)
    if only is not None and position not in only and not (key == "input" and 0 in only):
        return False
    if not has_meta:
        nonfloat = NON_FLOAT_ARGS.get(kind, ())
        if position in nonfloat or (key is not None and key in nonfloat):
            return False
    return True


def _input_slots(node: fx.Node):
    """Yield (input node, top-level position or None, keyword or None) for every use."""
    def walk(a, position, key):
        if isinstance(a, fx.Node):
            yield a, position, key
        elif isinstance(a, (list, tuple)):
            for x in a:
                yield from walk(x, position, key)
        elif isinstance(a, dict):
            for x in a.values():
                yield from walk(x, position, key)
    for i, a in enumerate(node.args):
        yield from walk(a, i, None)
    for k, a in node.kwargs.items():
        yield from walk(a, None, k)


def _uncast_slots(node: fx.Node, gm: fx.GraphModule) -> set[tuple[int | None, str | None]]:
    """(position, keyword) slots of a write that must never be cast: the source of a ``copy_``
    (it converts to the destination's dtype itself; a cast would round a stored state), and
    the destination of any write into a model input or buffer, which a cast would replace by a
    copy that nobody reads."""
    if node.op not in ("call_method", "call_function"):
        return set()
    slots: set = set()
    if target_name(node) == "copy_":
        slots |= {(1, None), (None, "src")}
    form = _inplace_form(node)
    if form is not None and _is_source(_alias_root(form[0], gm)):
        slots |= {(None, "out")} if node.kwargs.get("out") is form[0] else {(0, None), (None, "self")}
    return slots


def build_dataflow(gm: fx.GraphModule) -> DataflowGraph:
    """One vertex per FX node, one edge per use, with kinds, dtypes and module paths."""
    graph = DataflowGraph()
    params = {id(p) for p in gm.parameters()}
    is_float: dict[str, bool | None] = {}
    for node in gm.graph.nodes:
        kind = node_kind(node, gm)
        dtype, shape, has_meta = _meta_dtype(node)
        role = {"placeholder": "input", "output": "output"}.get(node.op, "compute")
        if node.op == "get_attr":
            value = _fetch_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                dtype, shape = value.dtype, tuple(value.shape)
                role = "param" if id(value) in params else "const"
                kind = role
            else:
                role, kind = "const", "const"
        fl = dtype.is_floating_point if dtype is not None else None
        if kind in NON_FLOAT:  # shapes (SymInt), comparisons, indices: never a floating value
            fl = False
        if fl is None and not has_meta:
            fl = _guess_float(node, kind, is_float)
        is_float[node.name] = fl
        path, mtype = _module_info(node, gm)
        graph.add_vertex(node.name, role=role, kind=kind, dtype=dtype, is_float=fl, shape=shape,
                         module_path=path, module_type=mtype, target=target_name(node))
        uncast = _uncast_slots(node, gm)
        for src, position, key in _input_slots(node):
            cast = (kind not in _NO_CAST_KINDS and role != "output" and (position, key) not in uncast
                    and _castable(kind, position, key, has_meta))
            graph.add_use(src.name, node.name, cast=cast)
    return graph


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_DTYPE_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                  "double": torch.float64, "long": torch.int64, "int": torch.int32, "bool": torch.bool}


def _guess_float(node: fx.Node, kind: str, known: dict[str, bool | None]) -> bool | None:
    """Float-ness without recorded dtypes (fx path): from the op's semantics and its inputs."""
    if node.op == "placeholder":
        return None
    if kind in NON_FLOAT or kind in ("guards", "shape"):
        return False
    if kind == "cast":
        name = target_name(node)
        if name in _DTYPE_METHODS:
            return _DTYPE_METHODS[name].is_floating_point
        for a in list(node.args[1:]) + list(node.kwargs.values()):
            if isinstance(a, torch.dtype):
                return a.is_floating_point
        return None
    if kind == "factory":
        dt = node.kwargs.get("dtype")
        if isinstance(dt, torch.dtype):
            return dt.is_floating_point
        name = target_name(node)
        if name.endswith("_like") or name.startswith("new_"):
            # ones_like(ids) has the dtype of its argument
            src = node.args[0] if node.args else None
            return known.get(src.name) if isinstance(src, fx.Node) else None
        if target_name(node) == "arange":
            return any(isinstance(a, float) for a in node.args)
        return True
    inputs = [known.get(a.name) for a in node.all_input_nodes]
    if kind == "getitem":
        return known.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
    if kind.startswith("module:") or kind in ("rnn",):
        return None if kind == "rnn" else True
    if True in inputs:
        return True
    if inputs and all(i is False for i in inputs):
        return False
    return None
