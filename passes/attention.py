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

    >>> matches = rewrite_attention(gm)
    >>> [(m.sdpa_node, m.causal, m.scale) for m in matches]
    [('softmax', True, None), ('softmax_1', True, None)]
"""

from __future__ import annotations

import builtins
import math
import operator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .sdpa_masks import size_only_values

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
        >>> m = rewrite_attention(gm)[0]
        >>> m.sdpa_node, m.causal, m.dropout_p
        ('softmax', True, 0.0)
    """

    sdpa_node: str
    matched_nodes: tuple[str, ...]
    causal: bool
    scale: float | None
    has_mask: bool
    dropout_p: float


# Op spellings per role: (call_function targets, call_method names). torch-level names come from
# fx.symbolic_trace, aten overloads from torch.export. Add a spelling here, never an ``if``.
_OPS: dict[str, tuple[frozenset, frozenset[str]]] = {
    "matmul": (frozenset({operator.matmul, torch.matmul, torch.bmm, aten.matmul.default,
                          aten.bmm.default}), frozenset({"matmul", "bmm", "__matmul__"})),
    "mul": (frozenset({operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}),
            frozenset({"mul", "__mul__", "__rmul__"})),
    "div": (frozenset({operator.truediv, torch.div, torch.true_divide, aten.div.Tensor,
                       aten.div.Scalar}), frozenset({"div", "true_divide", "__truediv__"})),
    "add": (frozenset({operator.add, torch.add, aten.add.Tensor}),
            frozenset({"add", "__add__", "__radd__"})),
    "transpose": (frozenset({torch.transpose, torch.swapaxes, aten.transpose.int}),
                  frozenset({"transpose", "swapaxes"})),
    "permute": (frozenset({torch.permute, aten.permute.default}), frozenset({"permute"})),
    "softmax": (frozenset({torch.softmax, F.softmax, aten.softmax.int,
                           aten._softmax.default}), frozenset({"softmax"})),
    "dropout": (frozenset({F.dropout, torch.dropout, aten.dropout.default}), frozenset()),
    "masked_fill": (frozenset({torch.masked_fill, aten.masked_fill.Scalar}),
                    frozenset({"masked_fill"})),
}

# Argument layouts: role -> ((keyword, default) per position). The torch, method and aten
# spellings above share these positions; keywords cover F.softmax(x, dim=-1) and friends.
_ARGS: dict[str, tuple[tuple[tuple[str, ...], Any], ...]] = {
    "matmul": ((("input", "self"), None), (("other", "mat2"), None)),
    "mul": ((("input", "self"), None), (("other",), None)),
    "div": ((("input", "self"), None), (("other",), None)),
    "add": ((("input", "self"), None), (("other",), None)),
    "transpose": ((("input", "self"), None), (("dim0",), None), (("dim1",), None)),
    "softmax": ((("input", "self"), None), (("dim",), None), (("dtype", "half_to_float"), None)),
    "dropout": ((("input",), None), (("p",), 0.5), (("training", "train"), True)),
    "masked_fill": ((("input", "self"), None), (("mask",), None), (("value",), None)),
}

# Module leaves a plain fx.symbolic_trace keeps as call_module nodes.
_MODULE_ROLES: dict[type, str] = {nn.Softmax: "softmax", nn.Dropout: "dropout"}


def _role(node: fx.Node, gm: fx.GraphModule) -> str | None:
    if node.op == "call_function":
        for role, (functions, _) in _OPS.items():
            if node.target in functions:
                return role
    elif node.op == "call_method":
        for role, (_, methods) in _OPS.items():
            if node.target in methods:
                return role
    elif node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return _MODULE_ROLES.get(type(mod))
    return None


def _arg(node: fx.Node, role: str, position: int) -> Any:
    """Argument ``position`` of ``node`` by position or keyword, else its default."""
    names, default = _ARGS[role][position]
    if position < len(node.args):
        return node.args[position]
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
    return default


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _static(size: Any) -> int | None:
    """A size as a plain int, or None when it is symbolic."""
    return int(size) if is_concrete_int(size) else None


def _same_size(a: Any, b: Any) -> bool:
    """Sizes known equal: equal ints, or the same symbolic expression (a dynamic batch)."""
    a_i, b_i = _static(a), _static(b)
    if a_i is not None or b_i is not None:
        return a_i == b_i
    return str(a) == str(b)


def _rank(node: Any) -> int | None:
    val = _val(node)
    return val.dim() if val is not None else None


def _is_last_axis(dim: Any, rank: int | None) -> bool:
    if not isinstance(dim, int):
        return False
    return dim == -1 or (rank is not None and dim == rank - 1)


def _swaps_last_two(node: fx.Node, role: str) -> bool:
    """A3: transpose(-2, -1) / transpose(n-2, n-1) / permute(..., n-1, n-2)."""
    if role == "transpose":
        a, b = _arg(node, role, 1), _arg(node, role, 2)
        if not (isinstance(a, int) and isinstance(b, int)):
            return False
        rank = _rank(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if rank is not None:
            a, b = a % rank, b % rank
            return {a, b} == {rank - 2, rank - 1}
        return {a, b} == {-2, -1}
    dims = list(node.args[1:])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    if "dims" in node.kwargs:
        dims = list(node.kwargs["dims"])
    n = len(dims)
    if n < 2 or not all(isinstance(d, int) for d in dims):
        return False
    dims = [d % n for d in dims]
    return dims == list(range(n - 2)) + [n - 1, n - 2]


def _const_scale(node: fx.Node, role: str, chain_input: fx.Node) -> float | None:
    """A4: the factor ``node`` multiplies ``chain_input`` by, when it is a Python number."""
    if role == "mul":
        a, b = _arg(node, role, 0), _arg(node, role, 1)
        other = b if a is chain_input else a if b is chain_input else None
        if other is None or not _is_number(other):
            return None
        return float(other)
    if role == "div":
        if node.kwargs.get("rounding_mode") is not None:
            return None
        a, b = _arg(node, role, 0), _arg(node, role, 1)
        if a is not chain_input or not _is_number(b) or b == 0:
            return None
        return 1.0 / float(b)
    return None


def _scale_input(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, float] | None:
    """(x, c) when ``node`` is ``x * c`` / ``c * x`` / ``x / c`` with a constant c."""
    role = _role(node, gm)
    if role not in ("mul", "div"):
        return None
    for candidate in (_arg(node, role, 0), _arg(node, role, 1)):
        if isinstance(candidate, fx.Node):
            c = _const_scale(node, role, candidate)
            if c is not None:
                return candidate, c
    return None


# -- constant evaluation of mask subgraphs (A6) -------------------------------------------------

# Attributes of a run-time tensor a constant mask may read without depending on its values.
_NEUTRAL_ATTRS: dict[str, Callable[[], Any]] = {
    "device": lambda: torch.device("cpu"),
    "dtype": lambda: torch.float32,
}


def _const_eval(node: fx.Node, gm: fx.GraphModule) -> torch.Tensor | None:
    """Evaluate ``node`` when it depends only on constants and buffers; None otherwise."""
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack: list[tuple[fx.Node, bool]] = [(node, False)]
    while stack:  # iterative post-order: masks of deep graphs must not hit the recursion limit
        n, expanded = stack.pop()
        if expanded:
            order.append(n)
            continue
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is builtins.getattr and len(n.args) == 2 \
                and n.args[1] in _NEUTRAL_ATTRS:
            order.append(n)
            continue
        if n.op not in ("get_attr", "call_function", "call_method") or n.is_impure():
            return None  # a run-time value, a module call or a side effect: not a constant
        stack.append((n, True))
        stack.extend((i, False) for i in n.all_input_nodes if i not in seen)
    env: dict[fx.Node, Any] = {}
    try:
        with torch.no_grad():
            for n in order:
                if n.op == "call_function" and n.target is builtins.getattr:
                    env[n] = _NEUTRAL_ATTRS[n.args[1]]()
                elif n.op == "get_attr":
                    env[n] = _fetch_attr(gm, str(n.target))
                else:
                    args = fx.node.map_arg(n.args, lambda a: env[a])
                    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                    if n.op == "call_function":
                        env[n] = n.target(*args, **kwargs)
                    else:
                        env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 -- a mask we cannot evaluate is not a known constant
        return None
    out = env[node]
    return out if isinstance(out, torch.Tensor) else None


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _square_2d(m: torch.Tensor) -> torch.Tensor | None:
    """The trailing (T, T) matrix of ``m`` when every leading size is 1."""
    if m.dim() < 2 or any(s != 1 for s in m.shape[:-2]) or m.shape[-1] != m.shape[-2]:
        return None
    return m.reshape(m.shape[-2], m.shape[-1])


def _causal_fill_mask(m: torch.Tensor) -> int | None:
    """T when ``m`` (masked_fill's mask) is True exactly above the diagonal of a T x T matrix."""
    sq = _square_2d(m)
    if sq is None or sq.dtype != torch.bool:
        return None
    t = sq.shape[0]
    above = torch.ones(t, t, dtype=torch.bool, device=sq.device).triu(1)
    return t if torch.equal(sq, above) else None


def _causal_additive_mask(m: torch.Tensor) -> int | None:
    """T when ``m`` is -inf exactly above the diagonal of a T x T matrix and 0 elsewhere."""
    sq = _square_2d(m)
    if sq is None or not sq.is_floating_point():
        return None
    t = sq.shape[0]
    above = torch.ones(t, t, dtype=torch.bool, device=sq.device).triu(1)
    expected = torch.zeros_like(sq).masked_fill(above, float("-inf"))
    return t if torch.equal(sq, expected) else None


_SIZED = -1  # a causal mask checked against the scores' sizes for every probe (A6)


def _causal_mask(mask: fx.Node, scores: fx.Node, gm: fx.GraphModule, causal_t) -> int | None:
    """A6: T when ``mask`` is a causal mask (``causal_t`` says which kind) of a T x T matrix:
    evaluated once when it depends on constants and buffers only; when it is built from the
    input's (symbolic) sequence length, evaluated for several lengths
    (``sdpa_masks.size_only_values``), each time as wide as the scores (then ``_SIZED``)."""
    const = _const_eval(mask, gm)
    if const is not None:
        return causal_t(const)
    probes = size_only_values(mask, [scores])
    if not probes:
        return None
    for value, (shape,) in probes:
        t = causal_t(value)
        if t is None or len(shape) < 2 or tuple(shape[-2:]) != (t, t):
            return None
    return _SIZED


# -- matching -----------------------------------------------------------------------------------

@dataclass
class _Pattern:
    q: fx.Node
    k: fx.Node
    k_needs_transpose: bool
    v: fx.Node
    scale: float
    causal: bool
    mask: fx.Node | None
    dropout_p: float
    softmax: fx.Node
    final: fx.Node
    nodes: list[fx.Node]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _shape_fits(node: fx.Node, t: int) -> bool:
    """A6: where shapes are recorded, the scores' last two sizes are (t, t)."""
    val = _val(node)
    if val is None:
        return True
    return val.dim() >= 2 and _static(val.shape[-1]) == t and _static(val.shape[-2]) == t


def _additive_mask_fits(scores: fx.Node, mask: fx.Node) -> bool:
    """A7: a floating mask of the scores' dtype whose broadcast does not grow the scores."""
    sv, mv = _val(scores), _val(mask)
    if sv is None:
        return True  # nothing recorded (fx graph): trusted, see A7
    if mv is None or not mv.is_floating_point() or mv.dtype != sv.dtype or mv.dim() > sv.dim():
        return False
    return all(_static(ms) == 1 or _same_size(ms, ss)
               for ms, ss in zip(reversed(mv.shape), reversed(sv.shape)))


def _leads_to_matmul(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` reaches a matmul back through constant scales only (the scores)."""
    while True:
        if _role(node, gm) == "matmul":
            return True
        scaled = _scale_input(node, gm)
        if scaled is None:
            return False
        node = scaled[0]


def _softmax_input(softmax: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """A1: the input of a softmax over the last axis that keeps its dtype."""
    if softmax.op == "call_module":
        x, dim = (softmax.args[0] if softmax.args else None), gm.get_submodule(str(softmax.target)).dim
    else:
        x, dim = _arg(softmax, "softmax", 0), _arg(softmax, "softmax", 1)
        if _arg(softmax, "softmax", 2):  # a dtype, or aten._softmax's half_to_float
            return None
    if not isinstance(x, fx.Node) or not _is_last_axis(dim, _rank(x)):
        return None
    return x


def _dropout_p(node: fx.Node, gm: fx.GraphModule, source: fx.Node) -> float | None:
    """A8: the probability moved into SDPA (0.0: dropped), or None when it cannot move."""
    if node.op == "call_module":
        return 0.0 if gm.get_submodule(str(node.target)).p == 0 else None
    p, training = _arg(node, "dropout", 1), _arg(node, "dropout", 2)
    if _arg(node, "dropout", 0) is not source or not _is_number(p) or not isinstance(training, bool):
        return None
    return float(p) if training else 0.0


def _match(softmax: fx.Node, gm: fx.GraphModule) -> _Pattern | None:
    x = _softmax_input(softmax, gm)
    if x is None:
        return None
    nodes = [softmax]

    # A1/A2/A8: softmax -> [dropout] -> matmul(probs, v)
    probs, dropout_p = softmax, 0.0
    user = _only_user(softmax)
    if user is not None and _role(user, gm) == "dropout":
        dropout_p = _dropout_p(user, gm, softmax)
        if dropout_p is None:
            return None
        nodes.append(user)
        probs, user = user, _only_user(user)
    if user is None or _role(user, gm) != "matmul" or _arg(user, "matmul", 0) is not probs:
        return None
    final, v = user, _arg(user, "matmul", 1)
    if not isinstance(v, fx.Node) or v is probs:
        return None
    nodes.append(final)

    # A2/A4/A6/A7: walk the score chain back from the softmax to matmul(q, kT)
    scale = 1.0
    after_mask = 1.0  # the part of ``scale`` applied after the mask (seen first, walking back)
    mask_kind: str | None = None  # "causal" | "additive"
    mask: fx.Node | None = None
    t_causal = 0
    cur = x
    while True:
        if _only_user(cur) is None:
            return None
        role = _role(cur, gm)
        if role == "matmul":
            break
        scaled = _scale_input(cur, gm)
        if scaled is not None:
            cur_prev, c = scaled
            scale *= c
            if mask_kind is None:
                after_mask *= c
        elif role == "masked_fill" and mask_kind is None:
            cur_prev, fill_mask, value = _arg(cur, role, 0), _arg(cur, role, 1), _arg(cur, role, 2)
            if not (isinstance(cur_prev, fx.Node) and isinstance(fill_mask, fx.Node)
                    and _is_number(value) and value == float("-inf")):
                return None
            t = _causal_mask(fill_mask, cur_prev, gm, _causal_fill_mask)
            if t is None:
                return None  # A7: a masked_fill that is not causal is left alone
            mask_kind, t_causal = "causal", t
        elif role == "add" and mask_kind is None and cur.kwargs.get("alpha", 1) == 1:
            a, b = _arg(cur, role, 0), _arg(cur, role, 1)
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
                return None
            # the chain goes on through the operand that reaches the scores' matmul
            cur_prev, other = (a, b) if _leads_to_matmul(a, gm) else (b, a)
            if not _leads_to_matmul(cur_prev, gm):
                return None
            t = _causal_mask(other, cur_prev, gm, _causal_additive_mask)
            if t is not None:
                mask_kind, t_causal = "causal", t
            else:
                mask_kind, mask = "additive", other
        else:
            return None
        nodes.append(cur)
        cur = cur_prev

    scores = cur
    nodes.append(scores)
    if mask_kind == "causal" and (after_mask <= 0 or (t_causal != _SIZED and not _shape_fits(scores, t_causal))):
        return None  # A4: -inf * s must stay -inf; A6: the mask must cover the scores exactly
    if mask_kind == "additive" and (after_mask != 1.0 or not _additive_mask_fits(scores, mask)):
        return None  # A4: a scale after the mask would scale the mask; A7

    q, k = _arg(scores, "matmul", 0), _arg(scores, "matmul", 1)
    if not (isinstance(q, fx.Node) and isinstance(k, fx.Node)):
        return None
    # A4: constant scales on q
    while (scaled := _scale_input(q, gm)) is not None:
        nodes.append(q)
        q, c = scaled
        scale *= c
    # A3/A4: constant scales and the transpose on the key side
    transposed = False
    while True:
        scaled = _scale_input(k, gm)
        role = _role(k, gm)
        if scaled is not None:
            nodes.append(k)
            k, c = scaled
            scale *= c
        elif not transposed and role in ("transpose", "permute") and _swaps_last_two(k, role):
            source = k.args[0] if k.args else k.kwargs.get("input", k.kwargs.get("self"))
            if not isinstance(source, fx.Node):
                return None
            nodes.append(k)
            k, transposed = source, True
        else:
            break
    if any(n in nodes for n in (q, k, v)) or (mask is not None and mask in nodes):
        return None
    return _Pattern(q=q, k=k, k_needs_transpose=not transposed, v=v, scale=scale,
                    causal=mask_kind == "causal", mask=mask, dropout_p=dropout_p,
                    softmax=softmax, final=final, nodes=nodes)


# -- rewriting ----------------------------------------------------------------------------------

def _is_aten_graph(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               for n in gm.graph.nodes)


def _fake_val(target, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A9: the new node's meta["val"], computed on the fake tensors of its inputs."""
    from torch._guards import detect_fake_mode

    flat = [a for a in args if isinstance(a, fx.Node)] + \
        [a for a in kwargs.values() if isinstance(a, fx.Node)]
    vals = [_val(a) for a in flat]
    if any(v is None for v in vals):
        return None
    fake_mode = detect_fake_mode(vals)
    to_val = lambda a: _val(a) if isinstance(a, fx.Node) else a  # noqa: E731
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
        val = _val(fallback)  # same shape and dtype as the value it replaces
    if val is not None:
        new.meta["val"] = val
        if "tensor_meta" in base.meta:
            from torch.fx.passes.shape_prop import _extract_tensor_metadata
            new.meta["tensor_meta"] = _extract_tensor_metadata(val)


def _apply(gm: fx.GraphModule, p: _Pattern, aten_graph: bool) -> tuple[AttentionMatch, set[fx.Node]]:
    graph = gm.graph
    k = p.k
    default_scale = None
    qv = _val(p.q)
    if qv is not None and _static(qv.shape[-1]):
        default_scale = 1.0 / math.sqrt(_static(qv.shape[-1]))
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


def rewrite_attention(gm: fx.GraphModule) -> list[AttentionMatch]:
    """Replace every explicit attention pattern in ``gm`` with one SDPA call (rules A1-A10).

    Rewrites ``gm`` in place, recompiles it, and returns one ``AttentionMatch`` per rewrite, in
    graph order. Patterns that do not match exactly are left as they were.

    Example:
        >>> gm, source = capture(model, example_inputs)
        >>> [m.sdpa_node for m in rewrite_attention(gm)]
        ['softmax', 'softmax_1']
    """
    aten_graph = _is_aten_graph(gm)
    matches: list[AttentionMatch] = []
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in erased or _role(node, gm) != "softmax":
            continue
        pattern = _match(node, gm)
        if pattern is not None:
            match, gone = _apply(gm, pattern, aten_graph)
            matches.append(match)
            erased |= gone
    if matches:
        gm.graph.lint()
        gm.recompile()
    return matches
