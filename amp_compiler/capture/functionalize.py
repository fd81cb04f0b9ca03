"""functionalize (FX rewrite, right after capture): in-place and ``out=`` calls become their
out-of-place forms.

A cast inserted in front of an in-place op would hand it a copy to write into, and the write
would be lost; so before any analysis:

1. ``x.add_(y)``, ``F.relu_(x)``, ``inplace=True`` and aten ``op_`` calls become ``op`` and
   later readers of ``x`` read the new value;
2. ``torch.op(..., out=z)`` (and aten ``.out`` overloads) become ``z = op(...)``;
3. a write into a model input or buffer, or into memory a view reads later, is written back
   with ``aten.copy_``, so it still lands on the real tensor (``build_dataflow`` never casts a
   ``copy_`` source or destination).

    >>> functionalize(gm)   # in place; gm.graph.lint() passes
"""

from __future__ import annotations

import functools
import inspect
import operator

import torch
import torch.fx as fx

from amp_compiler.errors import UnsupportedModelError
from amp_compiler.passes.kinds import node_kind, target_name

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

