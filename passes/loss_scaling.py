"""loss_scaling (FX rewrite, fp16 training): scale the loss gradient inside the graph.

Rules:

    L1  the loss is the graph's output when it is a scalar float, the value under a ``"loss"``
        key of a dict output, or the first element of a tuple/list output;
    L2  it is wrapped in ``scale_loss_grad(loss, scale)``: forward is the identity (the caller
        sees and logs the true loss), backward multiplies the incoming gradient by the loss
        scaler's current scale, read at backward time from a tensor the scaler updates in place;
    L3  graphs whose output is not a scalar loss (logits) are left alone: the caller scales the
        loss as with ``torch.amp.GradScaler`` (``amp.scaler.scale(loss).backward()``).

    >>> found = insert_loss_scaling(gm, scaler.scale_tensor("cpu"))
    >>> found  # the name of the wrapped loss node, or None
    'cross_entropy'
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from .policy import DENY

SCALE_ATTR = "_amp_loss_scale"
_REDUCTIONS = frozenset({"mean", "sum"})
LOSS_KINDS = frozenset({k for k in DENY if k.endswith("loss")}
                       | {"cross_entropy", "bce", "bce_with_logits", "kl_div"})


def _structure(gm: fx.GraphModule, out: fx.Node):
    """The output structure with Nodes as leaves (unflattened for exported modules)."""
    args = out.args[0]
    spec = getattr(gm, "_out_spec", None)
    if spec is not None and isinstance(args, (tuple, list)):
        from torch.utils import _pytree as pytree
        try:
            return pytree.tree_unflatten(list(args), spec)
        except Exception:  # noqa: BLE001 -- unusual spec: fall back to the flat leaves
            return args
    return args


def find_loss(gm: fx.GraphModule, kinds: dict[str, str]) -> fx.Node | None:
    """Rule L1: the node that holds the scalar loss, or None."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    structure = _structure(gm, out)
    if isinstance(structure, dict):
        candidate = structure.get("loss")
    elif isinstance(structure, (tuple, list)):
        candidate = structure[0] if structure else None
        if isinstance(candidate, (tuple, list)) and candidate:  # a flat leaf tuple of one
            candidate = candidate[0]
    else:
        candidate = structure
    if not isinstance(candidate, fx.Node):
        return None
    val = candidate.meta.get("val")
    if isinstance(val, torch.Tensor):
        return candidate if val.dim() == 0 and val.is_floating_point() else None
    kind = kinds.get(candidate.name, "")
    scalar_reduction = kind in _REDUCTIONS and len(candidate.args) <= 1 and not candidate.kwargs
    return candidate if kind in LOSS_KINDS or scalar_reduction else None


def insert_loss_scaling(gm: fx.GraphModule, scale: torch.Tensor, kinds: dict[str, str]) -> str | None:
    """Rules L1-L3 on ``gm`` in place; ``scale`` is the scaler's own scale tensor."""
    from amp_compiler.scaler import scale_loss_grad

    loss = find_loss(gm, kinds)
    if loss is None:
        return None
    # a plain attribute, not a buffer: .to()/.half() must not replace the scaler's own tensor
    setattr(gm, SCALE_ATTR, scale)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    # the loss may have been restored to fp32 by a cast just before the output: wrap that
    src = loss
    for user in list(out.all_input_nodes):
        if user.meta.get("amp_cast", {}).get("source") == loss.name:
            src = user
    with gm.graph.inserting_before(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx notes the attribute is no buffer: on purpose
        s = gm.graph.get_attr(SCALE_ATTR)
        wrapped = gm.graph.call_function(scale_loss_grad, (src, s))
    wrapped._rename(f"{loss.name}_scaled")
    if "val" in src.meta:
        wrapped.meta["val"] = src.meta["val"]
    out.args = fx.node.map_arg(out.args, lambda n: wrapped if n is src else n)
    gm.recompile()
    return loss.name
