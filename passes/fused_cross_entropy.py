"""fused_cross_entropy (FX rewrite): a cross-entropy over a vocabulary-sized linear layer is
computed chunk by chunk, so that the logits in fp32, their log-softmax and their gradient are
never held for all rows at once.

Rules:

    X1  the pattern is ``cross_entropy(reshape(float(linear(h, W, b))), target)``: a linear
        layer whose output reaches a cross-entropy only through casts to fp32, reshapes that
        flatten its leading dimensions and ``contiguous`` (the causal-LM loss of Hugging Face
        models, ``logits.float()`` then ``view(-1, V)``; whole slices are gone already by
        hygiene's H7, a slice that drops logits is not fused); ``reduction`` "mean" or
        "sum", any ``ignore_index`` and ``label_smoothing``, no class weights;
    X2  only for a vocabulary of at least ``MIN_VOCAB`` classes (Llama-2's 32000; GPT-2 has
        50257, Llama-3 128256): below it the logits are small and chunking buys little;
    X3  the cross-entropy becomes ``runtime.linear_cross_entropy(h, W, b, target, ...)``: rows
        in chunks of at most ``runtime.CHUNK_ELEMENTS`` logits, each chunk's logits computed in the
        linear layer's dtype and its softmax in fp32 (what the unfused graph computes), the
        loss summed in fp32, and, when gradients are wanted, each chunk's gradients for
        ``h``, ``W`` and ``b`` computed at once, so backward only scales them;
    X4  when something else reads the logits too (every Hugging Face causal LM returns them:
        ``CausalLMOutput.logits``), the node computes them as well, once, chunk by chunk in the
        linear layer's dtype, and returns ``(loss, logits)``: the readers get those, and the
        gradient flowing back through them, if any, is added in backward. The label
        computations the loss reads are moved before the linear layer (they never read the
        logits; a label chain that does, or that draws random numbers, is not fused). Nothing
        reads the logits but the loss: the linear layer and the chain are dropped;
        When every reader of the linear layer widens its output to fp32 (the ``.float()`` of
        the loss, the output restored to fp32), the node returns the logits in fp32 directly:
        no low copy is held beside them;
    X5  in fp16 training the loss scaling pass (rule L5) hands the node the loss scale, so the
        gradients it computes ahead are scaled as the unfused backward's are (no underflow);
    X6  under ``torch.compile`` the node computes the unfused expression: the chunk loop would
        break the compiled graph, and inductor fuses the cross-entropy itself.
    X7  on CUDA the chunks compute the classes padded to a multiple of 64 (zero rows of the
        weight, their logits -inf before the softmax, never returned): with an odd vocabulary
        (GPT-2's 50257) cuBLAS picks unaligned fp16 kernels; measured on the H200 at 8192 rows
        (``bench/fused_ce_compare.py``), the chunks' forward and backward took 27.3 ms unpadded
        and 12.4 ms padded (the unfused loss: 21.8 ms).
    X8  in a training graph, logits returned beside the fused loss come back in the linear
        layer's dtype, as ``torch.autocast`` returns them: the output reads the logits, not
        the restoring cast of rule I5 (insert_casts). The loss is what training reads; the
        logits are a by-product, and in fp32 they were the largest tensor of the step (GPT-2 at
        8 x 1024: 1.6 GB; the compiled step's peak went from 1.20x compiled autocast's to 1.10x
        on the H200, `amp-compiler bench --suite real --compile`). A ``logits.float()`` the
        model returns is read the same way (in the captured fp32 graph it is the same no-op
        as the loss's own ``.float()``); inference graphs restore the model's dtype (I5).

    >>> remarks = fuse_linear_cross_entropy(gm)
    >>> [r.rule for r in remarks]
    ['X3:fused']
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import runtime
from .graph import attribute
from .kinds import casts_to_fp32, node_arg, target_name
from .rules import Rule
from .infra import PassResult, Remark, result

MIN_VOCAB = 32000
_CASTS = frozenset({"to", "_to_copy", "float"})
_RESHAPES = frozenset({"view", "reshape", "_unsafe_view", "contiguous", "flatten"})
_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def fuse_linear_cross_entropy(gm: fx.GraphModule, *, training: bool = False) -> PassResult:
    """Rules X1-X8 on ``gm`` in place (X8 when ``training``); one remark per cross-entropy
    examined, fused or missed."""
    remarks = []
    for ce in [n for n in gm.graph.nodes if _is_cross_entropy(n)]:
        found = _match(gm, ce)
        if isinstance(found, str):
            remarks.append(Remark("fused_cross_entropy", Rule.X1_NO_MATCH, ce.name, found, missed=True))
            continue
        linear, options = found
        h, w = linear.args[0], linear.args[1]
        b = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        kwargs = {"reduction": options["reduction"], "ignore_index": options["ignore_index"],
                  "label_smoothing": options["label_smoothing"], "scale": None}
        rows = max(1, runtime.CHUNK_ELEMENTS // options["vocab"])
        reason = (f"cross-entropy over linear '{linear.name}' ({options['vocab']} classes) computed "
                  f"in chunks of {rows} rows: its fp32 logits, log-softmax and gradient are never "
                  "held for all rows at once")
        if options["others"]:
            moved = _labels_first(gm, options["target"], linear)
            if isinstance(moved, str):
                remarks.append(Remark("fused_cross_entropy", Rule.X4_NO_MATCH, ce.name, moved, missed=True))
                continue
            low_out = _returned_low(gm, linear) if training else False
            fused = _fuse_returning_logits(gm, runtime.linear_cross_entropy, linear, ce, (h, w, b, options["target"]), kwargs)
            wide = fused.kwargs["logits"] is torch.float32
            reason += (f"; the logits, which {', '.join(options['others'])} also read, are computed "
                       "once in the same chunks, " + ("in fp32 as every reader widens them" if wide
                                                     else "in the layer's dtype"))
            if low_out:
                reason += ("; returned in that dtype, as autocast returns them (X8: a training "
                           "graph's loss is what it is run for)")
        else:
            with gm.graph.inserting_before(ce):
                fused = gm.graph.call_function(runtime.linear_cross_entropy, (h, w, b, options["target"]), kwargs)
            fused.meta.update({k: v for k, v in ce.meta.items() if k in ("val", "tensor_meta")})
            ce.replace_all_uses_with(fused)
            gm.graph.erase_node(ce)
            fused._rename(f"{ce.name}_fused")
        fused.meta["amp_fused_cross_entropy"] = {"linear": linear.name, "cross_entropy": ce.name}
        remarks.append(Remark("fused_cross_entropy", Rule.X3_FUSED, ce.name, reason))
    gm.graph.eliminate_dead_code()  # the logits chain to the loss had no other reader
    gm.recompile()
    return result(gm, remarks)


def _is_cross_entropy(node: fx.Node) -> bool:
    return node.op == "call_function" and target_name(node) in ("cross_entropy_loss", "cross_entropy")


def _match(gm: fx.GraphModule, ce: fx.Node):
    """(linear node, options) when ``ce`` follows X1-X2, else the reason it does not."""
    aten = target_name(ce) == "cross_entropy_loss"
    # aten: (input, target, weight, reduction, ignore_index, label_smoothing)
    # torch.nn.functional: (input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    if node_arg(ce, 2, "weight", None) is not None:
        return "class weights: not fused"
    if aten:
        reduction = _REDUCTIONS.get(node_arg(ce, 3, "reduction", 1), "?")
        ignore_index, smoothing = node_arg(ce, 4, "ignore_index", -100), node_arg(ce, 5, "label_smoothing", 0.0)
    else:
        if node_arg(ce, 3, "size_average", None) is not None or node_arg(ce, 5, "reduce", None) is not None:
            return "legacy size_average/reduce arguments: not fused"
        reduction = node_arg(ce, 6, "reduction", "mean")
        ignore_index, smoothing = node_arg(ce, 4, "ignore_index", -100), node_arg(ce, 7, "label_smoothing", 0.0)
    if reduction not in ("mean", "sum"):
        return f"reduction={reduction!r}: only 'mean' and 'sum' are fused"
    if not all(isinstance(v, (int, float)) for v in (ignore_index, smoothing)):
        return "ignore_index or label_smoothing computed at run time: not fused"
    chain, value = [], ce.args[0]
    while isinstance(value, fx.Node) and value.op in ("call_function", "call_method") \
            and target_name(value) in _CASTS | _RESHAPES | {"slice"}:
        chain.append(value)
        value = value.args[0]
    if not (isinstance(value, fx.Node) and target_name(value) == "linear"):
        return "its input is not a linear layer's output (through casts and reshapes)"
    vocab = _vocab(gm, value.args[1])
    if vocab is None:
        return "the linear layer's output size is not known at capture time"
    for node in chain:
        name = target_name(node)
        if name in _CASTS and not casts_to_fp32(node):
            return f"'{node.name}' casts to a dtype other than float32"
        if name == "slice":  # whole slices are gone already (hygiene H7)
            return f"'{node.name}' slices the logits"
        if name in ("view", "reshape", "_unsafe_view") and _last(node) not in (vocab, None):
            return f"'{node.name}' reshapes the class dimension"
    if vocab < MIN_VOCAB:
        return f"{vocab} classes < {MIN_VOCAB}: chunking buys little"
    others = sorted({u.name if u.op != "output" else "the output" for node in [value, *chain]
                     for u in node.users if u not in chain and u is not ce})
    return value, {"target": ce.args[1], "reduction": reduction, "ignore_index": int(ignore_index),
                   "label_smoothing": float(smoothing), "vocab": vocab, "others": others}


def _labels_first(gm: fx.GraphModule, target, linear: fx.Node) -> str | None:
    """X4: move the nodes computing ``target`` that come after ``linear`` to before it, in
    their order; the reason when they cannot move."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    late, stack, seen = [], [target] if isinstance(target, fx.Node) else [], set()
    while stack:
        node = stack.pop()
        if node in seen or order[node] < order[linear]:
            continue
        seen.add(node)
        if node is linear:
            return "the labels are computed from the logits: not fused"
        if node.is_impure() or node.op != "call_function" and node.op != "call_method":
            return f"the labels' '{node.name}' cannot move before the logits: not fused"
        late.append(node)
        stack.extend(node.all_input_nodes)
    for node in sorted(late, key=order.__getitem__):
        linear.prepend(node)
    return None


def _returned_low(gm: fx.GraphModule, linear: fx.Node) -> bool:
    """X8: the graph outputs read ``linear``'s logits directly, not through a cast to fp32
    (the restoring cast, or the model's own ``.float()``, which the capture cannot tell from
    the loss's: in the fp32 graph both are the same no-op); whether any did."""
    widened = [u for u in linear.users if u.op in ("call_function", "call_method")
               and target_name(u) in _CASTS and casts_to_fp32(u)
               and any(r.op == "output" for r in u.users)]
    for cast in widened:
        for out in [r for r in cast.users if r.op == "output"]:
            out.replace_input_with(cast, linear)
        if not cast.users:
            gm.graph.erase_node(cast)
    return bool(widened)


def _fuse_returning_logits(gm: fx.GraphModule, fn, linear: fx.Node, ce: fx.Node, args: tuple,
                           kwargs: dict) -> fx.Node:
    """X4: ``fused = fn(*args, logits=True)`` where the linear layer was; its readers read
    ``fused[1]``, the loss's readers ``fused[0]``."""
    # every reader widens them to fp32 (the model's ``.float()``, the restored output): the
    # node returns them in fp32 and those casts are no-ops, with no low copy held beside
    wide = all(u.op in ("call_function", "call_method") and target_name(u) in _CASTS and casts_to_fp32(u)
               for u in linear.users)
    with gm.graph.inserting_before(linear):
        fused = gm.graph.call_function(fn, args, {**kwargs, "logits": torch.float32 if wide else True})
        loss = gm.graph.call_function(operator.getitem, (fused, 0))
        logits = gm.graph.call_function(operator.getitem, (fused, 1))
    for new, old in ((loss, ce), (logits, linear)):
        new.meta.update({k: v for k, v in old.meta.items() if k in ("val", "tensor_meta")})
        old.replace_all_uses_with(new)
    if "val" in loss.meta and "val" in logits.meta:
        fused.meta["val"] = (loss.meta["val"], logits.meta["val"])
    fused._rename(f"{ce.name}_fused")
    loss._rename(f"{ce.name}_loss")
    logits._rename(f"{linear.name}_logits")
    gm.graph.erase_node(ce)
    gm.graph.erase_node(linear)
    return fused


def _vocab(gm: fx.GraphModule, weight: fx.Node) -> int | None:
    """The linear layer's output size: its weight's first dimension."""
    val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    node = weight
    while val is None and isinstance(node, fx.Node) and node.op != "get_attr" and node.args:
        node = node.args[0]  # through our casts (fx graphs carry no shapes)
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if val is None and isinstance(node, fx.Node) and node.op == "get_attr":
        val = attribute(gm, str(node.target))
    if isinstance(val, torch.Tensor) and val.dim() == 2 and isinstance(val.shape[0], int):
        return int(val.shape[0])
    return None


def _last(node: fx.Node):
    """The last size a view/reshape asks for (None: not a plain int)."""
    shape = node.args[1] if len(node.args) == 2 else node.args[1:]
    last = shape[-1] if isinstance(shape, (list, tuple)) and shape else None
    return last if isinstance(last, int) and last != -1 else None

