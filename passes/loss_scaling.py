"""loss_scaling (FX rewrite, fp16 training): scale the loss gradient inside the graph.

Rules:

    L1  the loss is the graph's output when it is a scalar float, the value under a ``"loss"``
        key of a dict output, or the first element of a tuple/list output;
    L2  it is wrapped in ``scale_loss_grad(loss, scale)``: forward is the identity (the caller
        sees and logs the true loss), backward multiplies the incoming gradient by the loss
        scaler's current scale, read at backward time from a tensor the scaler updates in place;
    L3  graphs whose output is not a scalar loss (logits) are left alone: the caller scales the
        loss as with ``torch.amp.GradScaler`` (``amp.scaler.scale(loss).backward()``).
    L4  with L2, the gradient is divided by the same scale where it leaves the graph: every
        trainable parameter read by ``get_attr`` and every input is read through
        ``unscale_grads(scale, ...)`` (identity forward; one node and one foreach division per
        group: the inputs, and each layer's parameters -- those under one ModuleList index,
        else one owning module), and a leaf module holding trainable
        parameters (``nn.BatchNorm`` under fx, ``nn.LSTM``) runs through ``module_unscaled`` /
        ``module_in_dtype(..., unscale=scale)``, which do the same for its parameters. So every
        path from the loss to a leaf tensor crosses one division: ``.grad`` holds the true
        gradient after ``loss.backward()`` (fp16 as bf16), several backwards accumulate true
        gradients, ``clip_grad_norm_``, a plain ``optimizer.step()`` and ``torch.autograd.grad``
        see true values, and DDP/FSDP reduce true values. The scale stays on the device (no host
        sync); the scaler only looks for infs and NaNs at ``step`` (``unscaled_in_backward``),
        and an overflow in any micro-batch of an accumulation leaves an inf in ``.grad`` that
        skips the step.
    L5  a fused cross-entropy (fused_cross_entropy's X3/X5), which computes its gradients
        during the forward, is handed the same scale, so those gradients are the scaled ones
        the unfused backward would compute (no fp16 underflow), and backward divides by the
        scale it was handed only to apply the incoming gradient.

    >>> found = insert_loss_scaling(gm, scaler.scale_tensor("cpu"), kinds).facts
    >>> found  # the name of the wrapped loss node, or None
    'cross_entropy'
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from .graph import attribute
from .infra import PassResult, Remark, result
from .policy import DENY
from .rules import Rule
from .runtime import module_in_dtype, module_unscaled, scale_loss_grad, unscale_grads

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


def insert_loss_scaling(gm: fx.GraphModule, scale: torch.Tensor, kinds: dict[str, str]) -> PassResult:
    """Rules L1-L5 on ``gm`` in place; ``scale`` is the scaler's own scale tensor. ``facts``: the
    loss node's name, or None when the graph returns no scalar loss (L3)."""
    loss = find_loss(gm, kinds)
    if loss is None:
        return result(gm, [Remark("loss_scaling", Rule.L3_LOGITS, "output", "the graph returns no "
                                  "scalar loss: scale it with amp.scaler.scale(loss).backward()",
                                  missed=True)], facts=None)
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
    for node in gm.graph.nodes:  # L5: fused cross-entropy computes its gradients scaled
        if node.meta.get("amp_fused_cross_entropy") is not None:
            node.kwargs = {**node.kwargs, "scale": s}
    routed = unscale_leaves(gm, s)
    gm.recompile()
    return result(gm, [
        Remark("loss_scaling", Rule.L2_SCALE_GRAD, wrapped.name, f"the gradient of loss '{loss.name}' "
               "starts from the loss scale; forward returns the true loss"),
        Remark("loss_scaling", Rule.L4_UNSCALE, wrapped.name, f"{routed} parameters, inputs and leaf "
               "modules divide their gradients by the scale: .grad holds true gradients")], facts=loss.name)


def unscale_leaves(gm: fx.GraphModule, scale_node: fx.Node) -> int:
    """Rule L4: route every trainable parameter, every input and every leaf module with
    trainable parameters through the division by the scale; returns how many were routed."""
    graph = gm.graph
    # the scale is read once, before anything reads a parameter or an input (torch.export's
    # graphs read their parameters before their placeholders)
    next(iter(graph.nodes)).prepend(scale_node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # parameters in groups, one per layer (the path up to a ModuleList index, else the owning
    # module): one autograd node and one foreach division each -- a node per parameter cost
    # measurable host time on the H200 benchmark (bench/true_gradients_cost.py)
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node is not scale_node:
            value = attribute(gm, str(node.target))
            if isinstance(value, torch.nn.Parameter) and value.requires_grad:
                groups.setdefault(_layer(str(node.target)), []).append(node)
    routed = 0
    if placeholders:
        routed += _route(graph, scale_node, placeholders, "inputs")
    for layer, members in groups.items():
        routed += _route(graph, scale_node, members, layer.replace(".", "_"))
    for node in list(graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if any(p.requires_grad for p in module.parameters()):
                with graph.inserting_before(node):
                    mod = graph.get_attr(str(node.target))
                    call = graph.call_function(module_unscaled, (mod, scale_node, *node.args), dict(node.kwargs))
                node.replace_all_uses_with(call)
                call.meta.update(node.meta)
                graph.erase_node(node)
                routed += 1
        elif node.op == "call_function" and node.target is module_in_dtype:
            node.kwargs = {**node.kwargs, "_amp_unscale": scale_node}
            routed += 1
    return routed


def _route(graph: fx.Graph, scale_node: fx.Node, members: list[fx.Node], name: str) -> int:
    """Read ``members`` through one ``unscale_grads(scale, *members)`` node: placed after the
    last of them (parameter reads read no value, so they move up beside the first), each
    member's other users rewired to its ``getitem``."""
    last = members[0]
    for node in members[1:]:
        if node.op == "get_attr":
            last.append(node)
        last = node
    with graph.inserting_after(last):
        group = graph.call_function(unscale_grads, (scale_node, *members))
    group._rename(f"unscaled_{name}")
    last = group
    for i, node in enumerate(members):
        with graph.inserting_after(last):
            item = graph.call_function(operator.getitem, (group, i))
        node.replace_all_uses_with(item, delete_user_cb=lambda user: user is not group)
        item._rename(f"{node.name}_unscaled")
        if "val" in node.meta:
            item.meta["val"] = node.meta["val"]
        last = item
    return len(members)


def _layer(target: str) -> str:
    """The layer a parameter belongs to: its path up to the first ModuleList/Sequential index
    (``transformer.h.3``), else its owning module (``transformer.wte``)."""
    parts = target.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or "root"
