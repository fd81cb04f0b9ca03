"""fold_weights (FX rewrite, inference only): parameter casts done once, at convert time.

Rules:

    F1  a cast whose source is a parameter or buffer becomes a stored low-precision copy
        (a buffer of the graph module); the graph keeps no cast of it;
    F2  the fp32 original is dropped from the graph module once nothing reads it, so a frozen
        model holds no second full-precision copy beyond what the caller keeps;
    F3  leaf modules (``nn.LSTM``) that run in a low dtype are replaced by a low-precision copy.
    F4  a buffer the graph writes is not folded (capture turns every write into a buffer, such
        as a running average updated in forward, into a ``copy_`` into it): a stored copy would
        go stale after the first call; its cast stays in the graph and reads the current value.

    >>> n = fold_weights(gm, casts)
    >>> "to(" in gm.code
    False
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from .insert_casts import CastRecord


def _get(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _delete(root, target: str) -> None:
    owner_path, _, leaf = target.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    for table in (owner._parameters, owner._buffers):
        if leaf in table:
            del table[leaf]
            return
    if hasattr(owner, leaf):
        delattr(owner, leaf)


def _written_attrs(gm: fx.GraphModule) -> set[str]:
    """Targets of ``get_attr`` nodes written into: after capture's functionalize every write
    into a buffer is a ``copy_`` whose destination is argument 0."""
    return {str(n.args[0].target) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method") and n.args
            and getattr(n.target, "__name__", str(n.target)).split(".")[0] == "copy_"
            and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"}


def fold_weights(gm: fx.GraphModule, casts: list[CastRecord]) -> int:
    """Apply F1-F3 to ``gm`` in place; returns the number of casts folded."""
    nodes = {n.name: n for n in gm.graph.nodes}
    written = _written_attrs(gm)
    folded = 0
    for rec in casts:
        if not rec.is_param or rec.node not in nodes:
            continue
        if str(nodes[rec.source].target) in written:  # F4
            continue
        cast_node = nodes[rec.node]
        src = nodes[rec.source]
        with torch.no_grad():
            value = _get(gm, str(src.target)).detach().to(rec.dtype)
        attr = f"_amp_{rec.node}"
        gm.register_buffer(attr, value)
        with gm.graph.inserting_before(cast_node):
            new = gm.graph.get_attr(attr)
        cast_node.replace_all_uses_with(new)
        gm.graph.erase_node(cast_node)
        folded += 1
    for node in list(gm.graph.nodes):  # F3
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "module_in_dtype":
            mod_node, dtype = node.args[0], node.args[1]
            module = _get(gm, str(mod_node.target))
            low = copy.deepcopy(module).to(dtype)
            name = f"_amp_{str(mod_node.target).replace('.', '_')}_{str(dtype).split('.')[-1]}"
            gm.add_submodule(name, low)
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(name, tuple(node.args[2:]), dict(node.kwargs))
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            folded += 1
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            target = str(node.target)
            gm.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                _delete(gm, target)
    gm.recompile()
    return folded
