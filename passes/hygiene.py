"""hygiene (FX rewrite, right after capture): drop what the captured graph says about itself.

A ``torch.export`` graph restates facts of the example run: ``aten._assert_tensor_metadata``
checks that a tensor still has the dtype it had at capture before every ``.to()``. Mixed
precision changes those dtypes on purpose (a projection's output is float16 now), so the asserts
would stop the first forward of every Hugging Face causal LM with labels ("Tensor dtype
mismatch! Expected: Float, Got: c10::Half"). Eval-mode dropout and ``alias`` are no-ops that
still cost a kernel launch and a node on every call. Rules:

    H1  ``_assert_tensor_metadata`` nodes are removed: they restate capture-time dtypes, which
        the plan changes on purpose (torch's ONNX exporter drops them too); shape and value
        asserts (``_assert_scalar``, range constraints) stay;
    H2  dropout that cannot drop (``train=False`` or ``p == 0``, eval-mode captures) is its
        input;
    H3  ``aten.alias`` is its input;
    H4  dead code is eliminated (values nobody reads: export keeps the intermediate results of
        size computations whose result was specialised), side-effecting nodes and submodule
        calls kept;
    H5  a ``cat`` drops operands with a static size of 0 (transformers' empty key/value cache
        concatenated with the new keys: a copy of K and V per layer) when the result's dtype,
        as captured, is the promotion of the operands that remain; one operand left is the
        result itself. (At capture the empty cache has the keys' fp32 dtype; the low keys of
        the converted graph then stay low instead of being promoted back by it.)
    H6  a write (``copy_``) into a tensor the graph itself just made (``lift_fresh_copy`` of a
        constant, ``clone``, a factory) that nothing reads afterwards is dead: torch.export
        turns transformers' cache constants into ``lift_fresh_copy -> detach -> copy_`` chains
        (three ops per constant, two constants per layer, on every call) which the dead-code
        rule keeps because a write is impure. Then H4 removes what fed it;
    H7  a slice that keeps everything (start 0, end past any size, step 1: what indexing with
        ``[:, 0:]`` exports to, Hugging Face's ``logits_to_keep=0``) is its input;
    H8  the bodies of higher-order ops (the ``wrap_with_autocast`` region torch.export keeps
        for code under ``torch.autocast(enabled=False)``) are cleaned by the same rules, their
        remarks named ``<body>.<node>``.

Each removal is a ``Remark``; ``convert`` keeps them in ``plan.meta["rewrites"]``.

    >>> remarks = clean_graph(gm).remarks
    >>> remarks[0].rule
    'H1:metadata-assert'
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from .graph import keep_when_dead
from .infra import PassResult, Remark, result
from .kinds import node_arg, target_name
from .rules import Rule

_ASSERT_METADATA = frozenset({"_assert_tensor_metadata"})
# dropout spellings: ``(input, p, train)`` by position, or ``p=`` / ``train=`` / ``training=``
_DROPOUTS = frozenset({"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
                       "dropout1d", "dropout2d", "dropout3d"})
_ALIASES = frozenset({"alias"})
_CATS = frozenset({"cat", "concat", "concatenate"})
_WRITES = frozenset({"copy_"})
# tensors a graph makes itself: a write into one that nothing reads changes nothing outside
_FRESH = frozenset({"lift_fresh_copy", "clone", "empty", "zeros", "ones", "full", "empty_like",
                    "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros", "new_ones",
                    "new_full"})


def _inert_dropout(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or target_name(node) not in _DROPOUTS:
        return False
    train = node_arg(node, 2, ("train", "training"), True)
    p = node_arg(node, 1, ("p",), 0.5)
    return train is False or (isinstance(p, (int, float)) and p == 0)


def clean_graph(gm: fx.GraphModule) -> PassResult:
    """Apply H1-H8 to ``gm`` in place (recompiled); one remark per node removed."""
    graph = gm.graph
    removals: list[Remark] = []
    bodies = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    for name, body in gm.named_children():  # H8
        if name in bodies and isinstance(body, fx.GraphModule):
            removals += [Remark(r.pass_name, r.rule, f"{name}.{r.node}", r.reason)
                         for r in clean_graph(body).remarks]

    def removed(node: fx.Node, rule: Rule, reason: str) -> None:
        removals.append(Remark("hygiene", rule, node.name, reason))

    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        name = target_name(node)
        if name in _ASSERT_METADATA and not node.users:
            removed(node, Rule.H1_METADATA_ASSERT,
                    "restated a capture-time dtype that mixed precision changes on purpose")
            graph.erase_node(node)
        elif _inert_dropout(node) and isinstance(node.args[0], fx.Node):
            removed(node, Rule.H2_INERT_DROPOUT, "dropout that cannot drop (eval mode or p=0) is its input")
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif name == "slice" and _whole_slice(node):
            removed(node, Rule.H7_WHOLE_SLICE, "a slice that keeps every element is its input")
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif name in _ALIASES and node.args and isinstance(node.args[0], fx.Node):
            removed(node, Rule.H3_ALIAS, "an alias of its input")
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif name in _CATS and _drop_empty_operands(node):
            removals.append(Remark("hygiene", Rule.H5_EMPTY_CAT, node.name,
                                   "operands with no elements (an empty key/value cache) dropped"))
    # H6 after H5: the empty cache a constant's copy was made for is gone only now
    for node in list(graph.nodes):
        if node.op == "call_function" and target_name(node) in _WRITES and _dead_write(node):
            removed(node, Rule.H6_DEAD_WRITE, f"writes into '{node.args[0].name}', a tensor the graph "
                    "made itself and never reads")
            graph.erase_node(node)
    before = {n.name for n in graph.nodes}
    graph.eliminate_dead_code(is_impure_node=keep_when_dead)
    removals += [Remark("hygiene", Rule.H4_DEAD_CODE, n, "its value is never read")
                 for n in sorted(before - {n.name for n in graph.nodes})]
    gm.recompile()
    return result(gm, removals)


def _whole_slice(node: fx.Node) -> bool:
    """H7: ``aten.slice(x, dim, 0, end >= 2**62, 1)`` (also with defaults) of a tensor."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    start = node_arg(node, 2, ("start",), None)
    end = node_arg(node, 3, ("end",), None)
    step = node_arg(node, 4, ("step",), 1)
    return start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and end >= 2 ** 62))


def _dead_write(node: fx.Node) -> bool:
    """H6: ``node`` writes into a tensor the graph made itself, and neither the write's result
    nor the tensor is read by anything but such writes."""
    dest = node.args[0] if node.args else None
    if node.users or not isinstance(dest, fx.Node) or dest.op != "call_function" \
            or target_name(dest) not in _FRESH:
        return False
    writes = {u for u in dest.users if target_name(u) in _WRITES and u.args[0] is dest and not u.users}
    # other readers only feed those writes (``copy_(t, detach(t))``)
    return all(u in writes or (u.users and set(u.users) <= writes) for u in dest.users)


def _empty(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and any(isinstance(s, int) and s == 0 for s in val.shape)


def _drop_empty_operands(node: fx.Node) -> bool:
    """H5 on one ``cat``: drop operands with a static zero size when a non-empty operand of the
    same rank remains (an empty operand of the same rank adds nothing; its dtype would only
    promote the result: an empty fp32 cache concatenated with fp16 keys makes them fp32)."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(tensors, (list, tuple)) or not any(_empty(t) for t in tensors):
        return False
    kept = [t for t in tensors if not _empty(t)]
    out = node.meta.get("val")
    if not kept or not isinstance(out, torch.Tensor) or any(
            not isinstance(t, fx.Node) or not isinstance(t.meta.get("val"), torch.Tensor)
            or t.meta["val"].dim() != out.dim() for t in kept):
        return False
    if functools.reduce(torch.promote_types, [t.meta["val"].dtype for t in kept]) != out.dtype:
        return False  # the empty operand decides the result's dtype (cat promotes): keep it
    if len(kept) == 1:
        node.replace_all_uses_with(kept[0])
        node.graph.erase_node(node)
        return True
    node.args = (kept, *node.args[1:]) if node.args else node.args
    if not node.args:
        node.kwargs = {**node.kwargs, "tensors": kept}
    return True
