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
    F5  every stored copy is recorded (``gm.meta["amp_folded"]``, a list of ``FoldedWeight``):
        its name, the state-dict key of the original it was cast from, and a *weak* reference
        to that original with its version counter at folding time. A weak reference, so F2
        still holds: once the caller drops the model, the fp32 original is freed. While it is
        alive, ``refold`` brings the copies of originals changed in place since folding
        (``optimizer.step()``, ``w.mul_(2)``, ``load_state_dict``) back in line, and
        ``AmpModule`` maps the user's state-dict keys onto the copies.
        ``gm.meta["amp_state_keys"]`` keeps the graph module's state-dict keys before folding
        (the user model's, in its order).

    >>> folded = fold_weights(gm, casts).taken
    >>> "to(" in gm.code
    False
    >>> [(f.copy, f.source) for f in folded_weights(gm)][:1]
    [('_amp_fc1_weight_f16', 'fc1.weight')]
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph import attribute
from .infra import PassResult, Remark, result
from .insert_casts import CastRecord
from .rules import Rule


def _delete(root, target: str) -> None:
    owner_path, _, leaf = target.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    for table in (owner._parameters, owner._buffers):
        if leaf in table:
            del table[leaf]
            return
    if hasattr(owner, leaf):
        delattr(owner, leaf)


def _version_of(t: torch.Tensor) -> int | None:
    """``t._version``; None for tensors that keep no version counter (inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None


@dataclass(eq=False)
class FoldedWeight:
    """One stored low-precision copy (F1, or one tensor of an F3 module copy) and its origin.

    ``copy``: its state-dict key in the graph module (``_amp_linear_weight_f16``,
    ``_amp_lstm_float16.weight_ih_l0``); ``source``: the original's key (``fc1.weight``, the
    user model's state-dict key); ``persistent``: whether the original is part of the state
    dict; ``ref``: a weak reference to the original (None once pickled or copied without it);
    ``version``: the original's version counter when the copy was last made.
    """

    copy: str
    source: str
    dtype: torch.dtype
    persistent: bool
    ref: weakref.ref | None
    version: int | None

    def original(self) -> torch.Tensor | None:
        """The fp32 original, while something (the user's model) keeps it alive."""
        return self.ref() if self.ref is not None else None

    def stale(self) -> bool:
        """True when the live original was changed in place since the copy was made."""
        t = self.original()
        return t is not None and self.version is not None and _version_of(t) != self.version

    def __getstate__(self) -> dict:
        # pickled or deep-copied (``copy.deepcopy(amp)``: an independent copy, an EMA model),
        # the copy owns its weights and follows no original: a weak reference is not kept
        return {**self.__dict__, "ref": None}


def folded_weights(gm: fx.GraphModule) -> list[FoldedWeight]:
    """The copies ``fold_weights`` stored in ``gm`` (rule F5); empty when nothing was folded."""
    return gm.meta.get("amp_folded", [])


def refold(gm: fx.GraphModule, *, stale_only: bool = True) -> list[FoldedWeight]:
    """Copy each live original into its stored copy again (cast to the copy's dtype), in place;
    with ``stale_only`` only those whose version counter moved since (one pass over a list).
    Returns the records refolded. Originals that are gone are skipped: nothing to compare with.

    >>> with torch.no_grad():
    ...     model.fc1.weight.mul_(2)
    >>> [f.source for f in refold(gm)]
    ['fc1.weight']
    """
    done = []
    for rec in folded_weights(gm):
        src = rec.original()
        if src is None or (stale_only and not rec.stale()):
            continue
        with torch.no_grad():
            attribute(gm, rec.copy).copy_(src)
        rec.version = _version_of(src)
        done.append(rec)
    return done


def _record(records: list, state_keys: set[str], copy_key: str, source_key: str,
            original: torch.Tensor, dtype: torch.dtype) -> None:
    try:
        ref = weakref.ref(original)
    except TypeError:
        ref = None
    records.append(FoldedWeight(copy_key, source_key, dtype, source_key in state_keys, ref,
                                _version_of(original)))


def _written_attrs(gm: fx.GraphModule) -> set[str]:
    """Targets of ``get_attr`` nodes written into: after capture's functionalize every write
    into a buffer is a ``copy_`` whose destination is argument 0."""
    return {str(n.args[0].target) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method") and n.args
            and getattr(n.target, "__name__", str(n.target)).split(".")[0] == "copy_"
            and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"}


def fold_weights(gm: fx.GraphModule, casts: list[CastRecord]) -> PassResult:
    """Apply F1-F5 to ``gm`` in place; one remark per weight folded (F1, F3) or left (F4)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    written = _written_attrs(gm)
    state_keys = list(gm.state_dict(keep_vars=True))
    gm.meta.setdefault("amp_state_keys", state_keys)
    records = gm.meta.setdefault("amp_folded", [])
    state_keys = set(state_keys)
    remarks: list[Remark] = []
    for rec in casts:
        if not rec.is_param or rec.node not in nodes:
            continue
        if str(nodes[rec.source].target) in written:  # F4
            remarks.append(Remark("fold_weights", Rule.F4_WRITTEN_BUFFER, rec.node, f"'{rec.source}' is "
                                  "written by the graph: a stored copy would go stale, cast per call",
                                  missed=True))
            continue
        cast_node = nodes[rec.node]
        src = nodes[rec.source]
        original = attribute(gm, str(src.target))
        with torch.no_grad():
            value = original.detach().to(rec.dtype)
        attr = f"_amp_{rec.node}"
        gm.register_buffer(attr, value)
        _record(records, state_keys, attr, str(src.target), original, rec.dtype)  # F5
        with gm.graph.inserting_before(cast_node):
            new = gm.graph.get_attr(attr)
        cast_node.replace_all_uses_with(new)
        gm.graph.erase_node(cast_node)
        remarks.append(Remark("fold_weights", Rule.F1_FOLD, rec.node, f"'{rec.source}' is stored as a "
                              f"{str(rec.dtype).split('.')[-1]} copy '{attr}', cast once instead of per call"))
    for node in list(gm.graph.nodes):  # F3
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "module_in_dtype":
            mod_node, dtype = node.args[0], node.args[1]
            module = attribute(gm, str(mod_node.target))
            low = copy.deepcopy(module).to(dtype)
            name = f"_amp_{str(mod_node.target).replace('.', '_')}_{str(dtype).split('.')[-1]}"
            gm.add_submodule(name, low)
            originals = dict(module.state_dict(keep_vars=True))
            for key, t in low.state_dict(keep_vars=True).items():  # F5, tensor by tensor
                if key in originals:
                    _record(records, state_keys, f"{name}.{key}", f"{mod_node.target}.{key}",
                            originals[key], t.dtype)
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(name, tuple(node.args[2:]), dict(node.kwargs))
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            remarks.append(Remark("fold_weights", Rule.F3_LEAF_COPY, node.name, f"'{mod_node.target}' "
                                  f"runs as a stored {str(dtype).split('.')[-1]} copy '{name}'"))
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            target = str(node.target)
            gm.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                _delete(gm, target)
    gm.recompile()
    return result(gm, remarks)
