"""Custom ``torch.autograd.Function`` calls captured as ONE graph node that calls ``Fn.apply``.

Both capture paths inline a Function's forward by default, which loses its backward (a
straight-through estimator would train with zero gradients) and paints its ops by their
contents. Here:

1. fx: ``Function.apply`` is patched while tracing (``_function_apply_as(_fx_apply)``) so a
   call emits one ``call_function`` node whose target is a ``FunctionCall``;
2. torch.export: the call is recorded as a stand-in custom op whose fake kernel runs the real
   forward (``_export_apply``), and after export ``_keep_function_calls`` swaps each stand-in
   for the same ``FunctionCall`` node;
3. torch's own Functions are left alone; a Function that export cannot keep as one op (a
   non-tensor output, a size argument that depends on the batch) raises
   ``UnsupportedModelError`` naming the fix, never dropping the backward silently.

The node's op kind is the Function's class name: in no policy table, so it stays fp32 (R7)
unless ``force_low`` names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
from typing import Any

import torch
import torch.fx as fx

from amp_compiler.errors import UnsupportedModelError


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

