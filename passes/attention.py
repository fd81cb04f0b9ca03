"""rewrite_attention (FX rewrite): explicit attention -> one fused scaled_dot_product_attention.

Models that write attention out (``softmax(q @ k^T * s + mask) @ v``, nanoGPT's non-flash path,
BERT's self-attention) materialise the B x H x T x T scores and probabilities, and leave the
precision pass a softmax to decide about. One ``scaled_dot_product_attention`` call computes the
same value with a fused kernel (flash / memory-efficient on CUDA) that never stores them and
accumulates the softmax in fp32 internally; the precision pass then sees one ``sdpa`` node.

The pass works on both graph flavours the front end produces: torch-level graphs from
``torch.fx.symbolic_trace`` and aten-level graphs from ``torch.export(...).module()``. The op
spellings of both live in the ``_OPS`` table below.

Rules (a pattern is rewritten only when every rule holds; anything else is left as it was):

    A1  anchor: a softmax over the last axis (``dim=-1``, or ``rank-1`` when the rank is
        recorded in ``meta["val"]``) with no dtype argument; its input chain, walked backwards,
        ends in ``matmul(q, kT)`` and its output, possibly through one dropout, is the first
        operand of ``matmul(probs, v)``.
    A2  every intermediate of the score chain (scores, scaled and masked scores,
        probabilities, dropped-out probabilities) has exactly one user, the next op of the
        chain: a value returned or read twice must still be materialised, so fusing would
        only add work (and would change what those other users see).
    A3  key: ``kT`` is ``k.transpose(-2, -1)`` (either order, or the positive last two axes when
        the rank is recorded) or ``k.permute(..., n-1, n-2)``, and ``k`` is used directly.
        Any other ``kT`` is a key that is already transposed: the rewrite reads it through a
        new ``transpose(-2, -1)`` view, which is correct whatever its rank.
    A4  scale: constant multiplications and divisions (``x * c``, ``c * x``, ``x / c``, with
        ``c`` a Python number) on the scores, and on q or k before the product, multiply into
        one scale ``s``. A multiplication by a tensor on the scores breaks the chain, so the
        pattern does not match; on q or k it is simply part of computing q or k. A scale
        applied after the mask is accepted only with a causal mask and ``s > 0`` (-inf stays
        -inf); after an additive mask it would scale the mask too, so no match.
    A5  SDPA's ``scale`` argument is passed only when ``s`` differs from its default
        ``1/sqrt(E)``, E the recorded last size of q; without recorded shapes (fx graphs)
        ``scale=s`` is always passed, which is exact either way.
    A6  at most one mask op in the chain. Causal: ``masked_fill(mask, -inf)`` whose mask,
        evaluated once from constants and buffers (``torch.ones(T, T).tril() == 0``, a
        registered ``tril`` buffer sliced ``[:T, :T]``), is True exactly above the diagonal of
        a square T x T matrix; or ``scores + m`` with a constant ``m`` that is -inf exactly
        above the diagonal and 0 elsewhere. Both become ``is_causal=True`` (SDPA's causal
        mask is the same top-left triangle). Where shapes are recorded, the scores' last two
        sizes must equal (T, T); fx graphs record none, and the mask is trusted to have the
        scores' shape, as a shape-preserving ``masked_fill`` needs.
    A7  additive mask: ``scores + m`` with any other tensor ``m`` (a padding mask) becomes
        ``attn_mask=m``. Where shapes and dtypes are recorded, ``m`` must be floating point
        with the scores' dtype (a wider mask would promote the softmax) and broadcast to the
        scores' shape without growing it. A ``masked_fill`` whose mask is not causal, or whose
        mask depends on run-time values or sizes, or whose fill is not -inf, is not matched.
    A8  dropout on the probabilities: ``F.dropout`` / ``aten.dropout`` with ``training=True``
        and ``p > 0`` becomes ``dropout_p=p``; with ``p == 0`` or ``training=False`` it is
        dropped. An ``nn.Dropout`` module call with ``p > 0`` is not matched: it reads its
        training flag at run time, which a fixed ``dropout_p`` cannot follow.
    A9  the new node is inserted at the final matmul, named after the softmax node it
        replaces (node names stay stable for plans and reports), keeps the softmax's module
        path (``nn_module_stack``), and on aten graphs gets ``meta["val"]`` from the fake
        tensors of its inputs, because the dataflow front end reads dtypes from it. fx graphs
        get ``F.scaled_dot_product_attention``; aten graphs get
        ``aten.scaled_dot_product_attention.default``.
    A10 nodes left without users by the rewrite (the chain, the mask's ``ones``/``tril``/``eq``,
        a bypassed transpose or scale of q/k) are removed, walking back from the replaced
        nodes only; impure nodes (asserts, random ops, module calls with side effects) are
        never removed, and nothing outside the pattern's ancestry is touched.

    >>> matches = rewrite_attention(gm).facts
    >>> [(m.sdpa_node, m.causal, m.scale) for m in matches]
    [('softmax', True, None), ('softmax_1', True, None)]
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .attention_match import Miss, Pattern, match_pattern, recorded_value, role_of, static_size
from .infra import PassResult, Remark, result
from .rules import Rule

aten = torch.ops.aten

__all__ = ["AttentionMatch", "rewrite_attention"]


@dataclass(frozen=True)
class AttentionMatch:
    """One rewritten attention pattern.

    ``sdpa_node``: the new node's name; ``matched_nodes``: the pattern's original nodes, in graph
    order; ``causal``: ``is_causal=True`` was set; ``scale``: the ``scale=`` argument passed
    (None: SDPA's default ``1/sqrt(E)``); ``has_mask``: an ``attn_mask`` was passed;
    ``dropout_p``: the dropout probability moved into SDPA.

    Example:
        >>> m = rewrite_attention(gm).facts[0]
        >>> m.sdpa_node, m.causal, m.dropout_p
        ('softmax', True, 0.0)
    """

    sdpa_node: str
    matched_nodes: tuple[str, ...]
    causal: bool
    scale: float | None
    has_mask: bool
    dropout_p: float


# -- rewriting ----------------------------------------------------------------------------------

def _is_aten_graph(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               for n in gm.graph.nodes)


def _fake_val(target, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A9: the new node's meta["val"], computed on the fake tensors of its inputs."""
    from torch._guards import detect_fake_mode

    flat = [a for a in args if isinstance(a, fx.Node)] + \
        [a for a in kwargs.values() if isinstance(a, fx.Node)]
    vals = [recorded_value(a) for a in flat]
    if any(v is None for v in vals):
        return None
    fake_mode = detect_fake_mode(vals)
    to_val = lambda a: recorded_value(a) if isinstance(a, fx.Node) else a  # noqa: E731
    try:
        with fake_mode if fake_mode is not None else nullcontext(), torch.no_grad():
            out = target(*[to_val(a) for a in args], **{k: to_val(a) for k, a in kwargs.items()})
    except Exception:  # noqa: BLE001 -- fall back to the replaced node's value below
        return None
    return out if isinstance(out, torch.Tensor) else None


def _set_meta(new: fx.Node, base: fx.Node, fallback: fx.Node | None, target, args, kwargs) -> None:
    for key in ("nn_module_stack", "stack_trace", "seq_nr", "from_node", "custom"):
        if key in base.meta:
            new.meta[key] = base.meta[key]
    val = _fake_val(target, args, kwargs)
    if val is None and fallback is not None:
        val = recorded_value(fallback)  # same shape and dtype as the value it replaces
    if val is not None:
        new.meta["val"] = val
        if "tensor_meta" in base.meta:
            from torch.fx.passes.shape_prop import _extract_tensor_metadata
            new.meta["tensor_meta"] = _extract_tensor_metadata(val)


def _apply(gm: fx.GraphModule, p: Pattern, aten_graph: bool) -> tuple[AttentionMatch, set[fx.Node]]:
    graph = gm.graph
    k = p.k
    default_scale = None
    qv = recorded_value(p.q)
    if qv is not None and static_size(qv.shape[-1]):
        default_scale = 1.0 / math.sqrt(static_size(qv.shape[-1]))
    scale = None if default_scale is not None and math.isclose(p.scale, default_scale, rel_tol=1e-9) \
        else p.scale
    with graph.inserting_before(p.final):
        if p.k_needs_transpose:  # A3: an already transposed key, read through a view
            if aten_graph:
                k = graph.call_function(aten.transpose.int, (p.k, -2, -1))
                _set_meta(k, p.k, None, aten.transpose.int, (p.k, -2, -1), {})
            else:
                k = graph.call_method("transpose", (p.k, -2, -1))
        args = (p.q, k, p.v)
        kwargs: dict[str, Any] = {}
        if p.mask is not None:
            kwargs["attn_mask"] = p.mask
        if p.dropout_p:
            kwargs["dropout_p"] = p.dropout_p
        if p.causal:
            kwargs["is_causal"] = True
        if scale is not None:
            kwargs["scale"] = scale
        target = aten.scaled_dot_product_attention.default if aten_graph \
            else F.scaled_dot_product_attention
        sdpa = graph.call_function(target, args, kwargs)
        _set_meta(sdpa, p.softmax, p.final, target, args, kwargs)
    in_pattern = set(p.nodes)
    matched = tuple(n.name for n in graph.nodes if n in in_pattern)
    name = p.softmax.name
    p.final.replace_all_uses_with(sdpa)
    erased = _remove_dead(graph, p.nodes)
    # A9: the softmax's name, now free; the graph's namespace never hands it out again
    sdpa.name = name
    match = AttentionMatch(sdpa_node=name, matched_nodes=matched, causal=p.causal, scale=scale,
                           has_mask=p.mask is not None, dropout_p=p.dropout_p)
    return match, erased


def _remove_dead(graph: fx.Graph, replaced: list[fx.Node]) -> set[fx.Node]:
    """A10: erase the replaced chain, then whatever of its ancestry it leaves unused and pure."""
    work = list(replaced)
    chain = set(replaced)
    erased: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for node in list(work):
            if node in erased or node.users:
                continue
            if node not in chain and (node.op in ("placeholder", "output") or node.is_impure()):
                continue
            inputs = node.all_input_nodes
            graph.erase_node(node)
            erased.add(node)
            work.extend(i for i in inputs if i not in erased)
            changed = True
    return erased


def rewrite_attention(gm: fx.GraphModule) -> PassResult:
    """Replace every explicit attention pattern in ``gm`` with one SDPA call (rules A1-A10).

    Rewrites ``gm`` in place and recompiles it. One remark per softmax: fused, or missed with
    the rule that does not hold; ``facts`` lists one ``AttentionMatch`` per rewrite, in graph
    order. Patterns that do not match exactly are left as they were.

    Example:
        >>> gm, source = capture(model, example_inputs)
        >>> [m.sdpa_node for m in rewrite_attention(gm).facts]
        ['softmax', 'softmax_1']
    """
    aten_graph = _is_aten_graph(gm)
    matches: list[AttentionMatch] = []
    remarks: list[Remark] = []
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in erased or role_of(node, gm) != "softmax":
            continue
        pattern = match_pattern(node, gm)
        if isinstance(pattern, Miss):
            remarks.append(Remark("attention", pattern.rule, node.name,
                                  f"{pattern.reason}: left as written", missed=True))
            continue
        match, gone = _apply(gm, pattern, aten_graph)
        matches.append(match)
        erased |= gone
        remarks.append(Remark("attention", Rule.A1_ANCHOR, match.sdpa_node, _described(match)))
    if matches:
        gm.recompile()
    return result(gm, remarks, facts=matches)


def _described(m: AttentionMatch) -> str:
    extras = [w for w, on in (("causal", m.causal), ("a mask", m.has_mask),
                              (f"scale {m.scale:.4g}" if m.scale is not None else "", m.scale is not None),
                              (f"dropout {m.dropout_p:g}", m.dropout_p > 0)) if on]
    return (f"{len(m.matched_nodes)} nodes of explicit attention are one scaled_dot_product_attention"
            + (f" ({', '.join(extras)})" if extras else "") + ": the T x T scores are never stored")
