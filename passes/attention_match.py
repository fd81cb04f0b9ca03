"""Matching explicit attention (rules A1-A8 of ``passes.attention``): the op spellings of each
role, and ``match_pattern``, which walks from a softmax to ``matmul(q, kT)`` and returns the pattern
found or the rule that does not hold (a ``Miss``, which becomes a missed remark).
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .graph import attribute
from .rules import Rule
from .sdpa_masks import size_only_values

aten = torch.ops.aten


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


def role_of(node: fx.Node, gm: fx.GraphModule) -> str | None:
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


def recorded_value(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def static_size(size: Any) -> int | None:
    """A size as a plain int, or None when it is symbolic."""
    return int(size) if is_concrete_int(size) else None


def _same_size(a: Any, b: Any) -> bool:
    """Sizes known equal: equal ints, or the same symbolic expression (a dynamic batch)."""
    a_i, b_i = static_size(a), static_size(b)
    if a_i is not None or b_i is not None:
        return a_i == b_i
    return str(a) == str(b)


def _rank(node: Any) -> int | None:
    val = recorded_value(node)
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
    role = role_of(node, gm)
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
                    env[n] = attribute(gm, str(n.target))
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
class Pattern:
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


@dataclass(frozen=True)
class Miss:
    """Why a softmax anchors no rewrite: the rule that does not hold, in words."""

    rule: Rule
    reason: str


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _shape_fits(node: fx.Node, t: int) -> bool:
    """A6: where shapes are recorded, the scores' last two sizes are (t, t)."""
    val = recorded_value(node)
    if val is None:
        return True
    return val.dim() >= 2 and static_size(val.shape[-1]) == t and static_size(val.shape[-2]) == t


def _additive_mask_fits(scores: fx.Node, mask: fx.Node) -> bool:
    """A7: a floating mask of the scores' dtype whose broadcast does not grow the scores."""
    sv, mv = recorded_value(scores), recorded_value(mask)
    if sv is None:
        return True  # nothing recorded (fx graph): trusted, see A7
    if mv is None or not mv.is_floating_point() or mv.dtype != sv.dtype or mv.dim() > sv.dim():
        return False
    return all(static_size(ms) == 1 or _same_size(ms, ss)
               for ms, ss in zip(reversed(mv.shape), reversed(sv.shape)))


def _leads_to_matmul(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` reaches a matmul back through constant scales only (the scores)."""
    while True:
        if role_of(node, gm) == "matmul":
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


def match_pattern(softmax: fx.Node, gm: fx.GraphModule) -> Pattern | Miss:
    x = _softmax_input(softmax, gm)
    if x is None:
        return Miss(Rule.A1_ANCHOR, "not a last-axis softmax of a value computed before it")
    nodes = [softmax]

    # A1/A2/A8: softmax -> [dropout] -> matmul(probs, v)
    probs, dropout_p = softmax, 0.0
    user = _only_user(softmax)
    if user is not None and role_of(user, gm) == "dropout":
        dropout_p = _dropout_p(user, gm, softmax)
        if dropout_p is None:
            return Miss(Rule.A8_DROPOUT, "its dropout's probability or mode is not a constant")
        nodes.append(user)
        probs, user = user, _only_user(user)
    if user is None or role_of(user, gm) != "matmul" or _arg(user, "matmul", 0) is not probs:
        return Miss(Rule.A2_SINGLE_USE, "the probabilities are not read by one matmul(probs, v) only")
    final, v = user, _arg(user, "matmul", 1)
    if not isinstance(v, fx.Node) or v is probs:
        return Miss(Rule.A1_ANCHOR, "the values of matmul(probs, v) are not a tensor of their own")
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
            return Miss(Rule.A2_SINGLE_USE, f"'{cur.name}' in the score chain is read elsewhere too")
        role = role_of(cur, gm)
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
                return Miss(Rule.A6_CAUSAL_MASK, f"'{cur.name}' fills with something other than -inf")
            t = _causal_mask(fill_mask, cur_prev, gm, _causal_fill_mask)
            if t is None:  # A7: a masked_fill that is not causal is left alone
                return Miss(Rule.A6_CAUSAL_MASK, f"'{cur.name}' is a masked_fill whose mask is not the causal triangle")
            mask_kind, t_causal = "causal", t
        elif role == "add" and mask_kind is None and cur.kwargs.get("alpha", 1) == 1:
            a, b = _arg(cur, role, 0), _arg(cur, role, 1)
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
                return Miss(Rule.A7_ADDITIVE_MASK, f"'{cur.name}' adds something other than a mask tensor")
            # the chain goes on through the operand that reaches the scores' matmul
            cur_prev, other = (a, b) if _leads_to_matmul(a, gm) else (b, a)
            if not _leads_to_matmul(cur_prev, gm):
                return Miss(Rule.A7_ADDITIVE_MASK, f"neither operand of '{cur.name}' leads back to the scores' matmul")
            t = _causal_mask(other, cur_prev, gm, _causal_additive_mask)
            if t is not None:
                mask_kind, t_causal = "causal", t
            else:
                mask_kind, mask = "additive", other
        else:
            return Miss(Rule.A2_SINGLE_USE, f"'{cur.name}' in the score chain is not a scale or a mask")
        nodes.append(cur)
        cur = cur_prev

    scores = cur
    nodes.append(scores)
    if mask_kind == "causal" and (after_mask <= 0 or (t_causal != _SIZED and not _shape_fits(scores, t_causal))):
        # A4: -inf * s must stay -inf; A6: the mask must cover the scores exactly
        return Miss(Rule.A6_CAUSAL_MASK, "the causal mask is scaled by a non-positive number or does not cover the scores")
    if mask_kind == "additive" and (after_mask != 1.0 or not _additive_mask_fits(scores, mask)):
        # A4: a scale after the mask would scale the mask; A7
        return Miss(Rule.A7_ADDITIVE_MASK, "the additive mask is scaled afterwards or does not broadcast to the scores")

    q, k = _arg(scores, "matmul", 0), _arg(scores, "matmul", 1)
    if not (isinstance(q, fx.Node) and isinstance(k, fx.Node)):
        return Miss(Rule.A3_KEY, "the scores' matmul does not read two tensors")
    # A4: constant scales on q
    while (scaled := _scale_input(q, gm)) is not None:
        nodes.append(q)
        q, c = scaled
        scale *= c
    # A3/A4: constant scales and the transpose on the key side
    transposed = False
    while True:
        scaled = _scale_input(k, gm)
        role = role_of(k, gm)
        if scaled is not None:
            nodes.append(k)
            k, c = scaled
            scale *= c
        elif not transposed and role in ("transpose", "permute") and _swaps_last_two(k, role):
            source = k.args[0] if k.args else k.kwargs.get("input", k.kwargs.get("self"))
            if not isinstance(source, fx.Node):
                return Miss(Rule.A3_KEY, "the key's transpose reads no tensor")
            nodes.append(k)
            k, transposed = source, True
        else:
            break
    if any(n in nodes for n in (q, k, v)) or (mask is not None and mask in nodes):
        return Miss(Rule.A2_SINGLE_USE, "q, k, v or the mask is itself part of the score chain")
    return Pattern(q=q, k=k, k_needs_transpose=not transposed, v=v, scale=scale,
                    causal=mask_kind == "causal", mask=mask, dropout_p=dropout_p,
                    softmax=softmax, final=final, nodes=nodes)
