"""An AmpModule's state dict under the user model's keys: checkpoints move both ways.

``amp.state_dict()`` has ``model.state_dict()``'s keys, in its order (not the graph module's
``graph_module.*`` ones); nested modules (``nn.Sequential(amp)``, DDP) prefix them as usual, and
``load_state_dict`` takes the same keys, so checkpoints move freely between ``model`` and
``amp``. Where each key's value lives (``UserStateDict._entries``):

- ``graph``: a tensor of the graph module, the user's own (a training module's fp32 master
  weights, shared);
- ``folded``: an inference module's low-precision copies only (rule F2): the state dict gives
  the user's fp32 tensor while the user's model keeps it alive, else the low-precision copy;
  loading writes the value into the live original and refolds the copy from it
  (``refold_after_load``), or casts it straight into the copy;
- ``held``: a tensor the graph never reads (fx captures leave out unused parameters and all but
  one name of a tied weight), kept so that every key of the model is there.

    >>> amp = ac.convert(model, dtype="bfloat16", training=True)
    >>> list(amp.state_dict()) == list(model.state_dict())
    True
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from amp_compiler.passes.fold_weights import FoldedWeight, folded_weights, refold
from amp_compiler.passes.graph import attribute


class UserStateDict(nn.Module):
    """``state_dict`` / ``load_state_dict`` under the user model's keys, for ``AmpModule``.

    The subclass holds ``graph_module`` and the layout ``user_layout`` gives
    (``_user_keys``, ``_aliases``, ``_held``), and registers ``refold_after_load`` as a
    ``load_state_dict`` post-hook."""

    def state_dict(self, *args, destination: dict | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """The state under the user model's keys (``model.state_dict()``'s), not the graph
        module's; ``destination`` / ``prefix`` / ``keep_vars`` as ``nn.Module.state_dict``, so a
        parent module (``nn.Sequential(amp)``, DDP) gets ``prefix + key``.

        Training module: the user's own tensors (fp32 master weights, shared). Inference
        module: for a folded weight, the user's fp32 tensor while their model keeps it alive,
        else the low-precision copy the module computes with (``model.load_state_dict``
        upcasts it).

        Example:
            >>> amp = ac.convert(model, dtype="bfloat16", training=True)
            >>> list(amp.state_dict()) == list(model.state_dict())
            True
            >>> model.load_state_dict(amp.state_dict())   # strict: same keys
            <All keys matched successfully>
        """
        if args:  # nn.Module's deprecated positional form: (destination, prefix, keep_vars)
            destination = args[0]
            prefix = args[1] if len(args) > 1 and prefix == "" else prefix
            keep_vars = args[2] if len(args) > 2 and keep_vars is False else keep_vars
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()  # type: ignore[attr-defined]
        for hook in getattr(self, "_state_dict_pre_hooks", {}).values():
            hook(self, prefix, keep_vars)
        inner = self.graph_module.state_dict(keep_vars=True)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata[prefix[:-1]] = {"version": self._version}
            for path, meta in getattr(inner, "_metadata", {}).items():
                if path and not path.startswith("_amp_"):
                    metadata[prefix + path] = meta
        for key, kind, where in self._entries(inner):
            if kind == "graph":
                value = inner[where]
            elif kind == "folded":
                value = where[0].original()
                if value is None:
                    value = attribute(self.graph_module, where[0].copy)
            else:
                value = where
            destination[prefix + key] = value if keep_vars else value.detach()
        local_metadata = metadata.get(prefix[:-1], {}) if metadata is not None else {}
        for hook in getattr(self, "_state_dict_hooks", {}).values():  # hooks on amp itself
            result = hook(self, destination, prefix, local_metadata)
            if result is not None and not getattr(hook, "_from_public_api", False):
                destination = result
        return destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """``load_state_dict`` calls this before the graph module's own: the user model's keys
        become the graph module's (``prefix + "graph_module." + key``); a folded weight's value
        goes into its live original (refolded by the post-hook) or, the original gone, straight
        into its low-precision copy. Keys of neither kind are left for nn.Module to report."""
        inner_prefix = prefix + "graph_module."
        gm = self.graph_module
        inner = gm.state_dict(keep_vars=True)
        entries = self._entries(inner)
        ours = [k for k in state_dict if k.startswith(prefix)]
        if not any(prefix + key in state_dict for key, _, _ in entries) and any(
                k.startswith(inner_prefix) for k in ours):
            # a checkpoint of the graph module's keys, as state_dict() wrote them before
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                 missing_keys, unexpected_keys, error_msgs)
        for key, kind, where in entries:
            full = prefix + key
            if full not in state_dict:
                missing_keys.append(full)
                continue
            value = state_dict.pop(full)
            if kind == "graph":
                targets = [inner[where]]
            elif kind == "folded":
                live = [r.original() for r in where if r.original() is not None]
                targets = live[:1] or [attribute(gm, r.copy) for r in where]
            else:
                targets = [where]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(f'While copying the parameter named "{full}", expected '
                                  f'torch.Tensor or Tensor-like object from checkpoint but '
                                  f'received {type(value)}')
            elif value.shape != targets[0].shape:
                error_msgs.append(f"size mismatch for {full}: copying a param with shape "
                                  f"{value.shape} from checkpoint, the shape in current model "
                                  f"is {targets[0].shape}.")
            elif kind == "graph":  # the graph module loads it (assign=True honoured there)
                state_dict[inner_prefix + where] = value
            else:
                with torch.no_grad():
                    for target in targets:
                        target.copy_(value)
        # the graph module's own entries that no key fed (the low copies, reported missing
        # user keys) load as themselves: a no-op rather than a second, internal "missing" key
        for key, value in inner.items():
            state_dict.setdefault(inner_prefix + key, value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _entries(self, inner: dict) -> list[tuple[str, str, Any]]:
        """The user's state-dict keys in order, each with where its value lives now:
        ``("graph", key)`` a tensor of the graph module (the user's own, shared);
        ``("folded", [FoldedWeight])`` low-precision copies only, the original maybe alive;
        ``("held", tensor)`` a tensor the graph does not read (see ``__init__``'s ``model``)."""
        folded: dict[str, list[FoldedWeight]] = {}
        for rec in folded_weights(self.graph_module):
            if rec.persistent:
                folded.setdefault(rec.source, []).append(rec)
        if self._user_keys is not None:
            keys = self._user_keys
        else:  # the graph module's keys, in the order they had before folding
            keys = list(self.graph_module.meta.get("amp_state_keys", ()))
            seen = set(keys)
            keys += [k for k in inner if k not in seen]
        out = []
        for key in keys:
            name = self._aliases.get(key, key)
            if name.startswith("_amp_"):
                continue
            if name in inner:
                out.append((key, "graph", name))
            elif name in folded:
                out.append((key, "folded", folded[name]))
            elif key in self._held:
                out.append((key, "held", self._held[key]))
        return out


def user_layout(model: nn.Module | None, gm: fx.GraphModule):
    """(keys, aliases, held) for ``UserStateDict._entries``: the model's state-dict keys in order
    (None without a model: the graph's keys are used), each key the graph module knows under
    another name (a tied weight) mapped to that name, and the tensors it does not hold."""
    if model is None:
        return None, {}, {}
    inner = gm.state_dict(keep_vars=True)
    known = {id(t): k for k, t in inner.items() if not k.startswith("_amp_")}
    folded = {}
    for rec in folded_weights(gm):
        folded.setdefault(rec.source, rec)
        if rec.original() is not None:
            known.setdefault(id(rec.original()), rec.source)
    keys, aliases, held = [], {}, {}
    for key, t in model.state_dict(keep_vars=True).items():
        keys.append(key)
        if key in inner or key in folded:
            continue
        if id(t) in known:
            aliases[key] = known[id(t)]
        else:
            held[key] = t
    return keys, aliases, held


def refold_after_load(module: UserStateDict, incompatible_keys) -> None:
    """load_state_dict post-hook: refold the copies whose originals the load just wrote."""
    refold(module.graph_module)
