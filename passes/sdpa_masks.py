"""sdpa_masks (FX rewrite): keep ``scaled_dot_product_attention`` on its fused kernels.

Libraries build the attention mask in Python and, when they run eagerly, skip it where they can
see it is not needed (transformers drops an all-ones padding mask and passes ``is_causal=True``
for a causal LM). A captured graph cannot look at values, so it always builds the mask: a
B x 1 x T x T boolean tensor, often an ``expand`` whose key axis has stride 0. With a mask the
flash kernel is out, and with a non-contiguous key axis the cuDNN and memory-efficient kernels
are out too: SDPA falls back to the math kernel, which materialises the B x H x T x T scores
(HF BERT on the H200: 12 ``_scaled_dot_product_attention_math`` calls a step, 1.5x autocast's
step time). Rules:

    S1  a mask computed only from input *sizes*, factories and constants (no input values, no
        parameters or buffers, nothing random) is evaluated for three assignments of the size
        symbols; if it keeps every position each time (True, or 0.0 for an additive mask), it is
        dropped;
    S2  if instead it is the causal triangle each time (position j visible from i iff j <= i,
        with as many queries as keys; an additive mask holds 0 there and <= -1e4 elsewhere), it
        is dropped and ``is_causal=True`` is set: SDPA's causal mask is the same top-left
        triangle;
    S3  a mask that stays (it depends on input values: a padding mask) and whose last axis is
        not contiguous is made contiguous (``.contiguous()``, B x 1 x T x T booleans, small next
        to the scores the math kernel would store).

Evaluating a size-only mask is exact for the sizes tried and relies on the mask being the same
function of the sizes for every size, which is what "computed only from sizes" means for the
arange/compare/expand programs libraries write; a mask that is neither all-kept nor causal for
every tried assignment is left alone.

    >>> folds = fold_sdpa_masks(gm)
    >>> [(f.node, f.rule) for f in folds]
    [('scaled_dot_product_attention', 'S2:causal'), ...]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .graph import keep_when_dead
from .infra import PassResult, Remark, result
from .kinds import target_name, torch_kind
from .rules import Rule

_SDPA_NAMES = frozenset({"scaled_dot_product_attention"})
# SDPA's signature after (query, key, value): names and positions
_SDPA_PARAMS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# size symbols are given these values, one assignment per probe (offset per symbol so that two
# symbols never coincide by accident, small enough for position tables of any model)
_PROBES = ((3, 1), (5, 2), (8, 1))
_ADDITIVE_MASKED = -1e4


def _sdpa_call(node: fx.Node) -> dict[str, Any] | None:
    """(q, k, v) and the optional parameters of an SDPA node, by name; None for other nodes."""
    if node.op != "call_function" or target_name(node) not in _SDPA_NAMES or len(node.args) < 3:
        return None
    params = dict(zip(_SDPA_PARAMS, node.args[3:]))
    params.update({k: v for k, v in node.kwargs.items() if k in _SDPA_PARAMS})
    return params


def _size_only_slice(mask: fx.Node) -> list[fx.Node] | None:
    """The nodes ``mask`` is computed from, in graph order, when they read nothing but sizes."""
    seen: dict[fx.Node, None] = {}
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = None
        if n.op == "placeholder":
            continue
        if n.op != "call_function" or n.is_impure():
            return None  # parameters, buffers, submodules, asserts, random ops
        for a in n.all_input_nodes:
            if a.op == "placeholder" and torch_kind(target_name(n)) != "shape":
                return None  # reads an input's values, not only its sizes
            stack.append(a)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _symbols(values) -> list:
    syms: set = set()
    for v in values:
        if isinstance(v, torch.Tensor):
            for s in v.shape:
                if isinstance(s, torch.SymInt):
                    syms |= s.node.expr.free_symbols
    return sorted(syms, key=str)


def _concrete(size, subs: dict) -> int:
    if isinstance(size, torch.SymInt):
        return int(size.node.expr.xreplace(subs))
    return int(size)


def _evaluate(nodes: list[fx.Node], subs: dict) -> Any:
    """Run ``nodes`` (a size-only slice) with placeholders of the assigned sizes."""
    env: dict[fx.Node, Any] = {}
    for n in nodes:
        if n.op == "placeholder":
            val = n.meta["val"]
            env[n] = torch.zeros([_concrete(s, subs) for s in val.shape], dtype=val.dtype,
                                 device=val.device if val.device.type != "meta" else "cpu")
            continue
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        env[n] = n.target(*args, **kwargs)
    return env[nodes[-1]]


def _kept(mask: torch.Tensor) -> torch.Tensor | None:
    """Boolean "this position is attended" for a boolean or additive mask, None otherwise."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        zero = mask == 0
        if not bool((mask[~zero] <= _ADDITIVE_MASKED).all()):
            return None  # a bias with other values (ALiBi, relative positions): not a mask
        return zero
    return None


def _classify(kept: torch.Tensor, q_len: int, k_len: int) -> str | None:
    if bool(kept.all()):
        return "all"
    if q_len != k_len or kept.dim() < 2:
        return None
    full = kept.expand(*kept.shape[:-2], q_len, k_len) if kept.shape[-2:] != (q_len, k_len) else kept
    if full.shape[-2:] != (q_len, k_len):
        return None
    tril = torch.ones(q_len, k_len, dtype=torch.bool, device=kept.device).tril()
    return "causal" if bool((full == tril).all()) else None


def size_only_values(mask: fx.Node, like: list[fx.Node]) -> list[tuple[torch.Tensor, list[tuple]]] | None:
    """For a value computed only from input sizes (``_size_only_slice``): its value under each
    of the probe assignments of the size symbols, with the concrete shapes ``like``'s recorded
    values have under the same assignment. None when it reads anything else or cannot be run.

        >>> [(m.shape, shapes) for m, shapes in size_only_values(mask, [scores])]
        [((1, 1, 4, 4), [(2, 4, 4, 4)]), ...]
    """
    nodes = _size_only_slice(mask)
    if nodes is None:
        return None
    placeholders = [n.meta.get("val") for n in nodes if n.op == "placeholder"]
    likes = [n.meta.get("val") for n in like]
    if any(not isinstance(v, torch.Tensor) for v in placeholders + likes):
        return None
    symbols = _symbols(placeholders + likes)
    out = []
    for base, step in _PROBES:
        subs = {s: base + step * i for i, s in enumerate(symbols)}
        try:
            value = _evaluate(nodes, subs)
        except Exception:  # noqa: BLE001 -- anything the probe cannot run is left alone
            return None
        if not isinstance(value, torch.Tensor):
            return None
        out.append((value, [tuple(_concrete(d, subs) for d in v.shape) for v in likes]))
    return out


def _fold_kind(mask: fx.Node, q: fx.Node, k: fx.Node) -> str | None:
    probes = size_only_values(mask, [q, k])
    if probes is None:
        return None
    kinds = set()
    for value, (q_shape, k_shape) in probes:
        kept = _kept(value)
        if kept is None:
            return None
        kinds.add(_classify(kept, q_shape[-2], k_shape[-2]))
    return kinds.pop() if len(kinds) == 1 else None


def _set_params(node: fx.Node, **changes) -> None:
    """Rewrite an SDPA node's optional parameters as keywords (q, k, v stay positional)."""
    params = dict(zip(_SDPA_PARAMS, node.args[3:]))
    params.update(node.kwargs)
    params.update(changes)
    node.args = node.args[:3]
    node.kwargs = {k: v for k, v in params.items() if k != "attn_mask" or v is not None}


def _last_axis_strided(mask: fx.Node) -> bool:
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    try:
        return val.stride()[-1] != 1 and val.shape[-1] != 1
    except Exception:  # noqa: BLE001 -- symbolic strides that cannot be decided
        return False


def fold_sdpa_masks(gm: fx.GraphModule) -> PassResult:
    """Apply S1-S3 to every SDPA node of ``gm`` in place (recompiled when anything changed); a
    missed remark for a mask that stays as it is."""
    folds: list[Remark] = []
    graph = gm.graph
    for node in list(graph.nodes):
        params = _sdpa_call(node)
        if params is None:
            continue
        mask = params.get("attn_mask")
        if not isinstance(mask, fx.Node) or params.get("is_causal"):
            continue
        kind = _fold_kind(mask, node.args[0], node.args[1])
        if kind == "all":
            _set_params(node, attn_mask=None)
            folds.append(Remark("sdpa_masks", Rule.S1_MASK_ALL_KEPT, node.name, "the mask, computed from sizes only, "
                                  "keeps every position: dropped, so the fused kernels (flash too) apply"))
        elif kind == "causal":
            _set_params(node, attn_mask=None, is_causal=True)
            folds.append(Remark("sdpa_masks", Rule.S2_MASK_CAUSAL, node.name, "the mask, computed from sizes only, is "
                                  "the causal triangle: is_causal=True instead, so the fused kernels apply"))
        elif _last_axis_strided(mask):
            with graph.inserting_before(node):
                dense = graph.call_method("contiguous", (mask,))
            if "val" in mask.meta:
                dense.meta["val"] = mask.meta["val"].contiguous()
            node.replace_input_with(mask, dense)
            folds.append(Remark("sdpa_masks", Rule.S3_MASK_CONTIGUOUS, node.name, "the mask's key axis was not "
                                  "contiguous (an expand): made contiguous, as the fused kernels need"))
        else:
            folds.append(Remark("sdpa_masks", Rule.S1_MASK_ALL_KEPT, node.name, "the mask is neither "
                                "computed from sizes only nor strided (a padding mask): kept as it is",
                                missed=True))
    if any(not r.missed for r in folds):
        graph.eliminate_dead_code(is_impure_node=keep_when_dead)
        gm.recompile()
    return result(gm, folds)
