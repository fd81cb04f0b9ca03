"""save(): a converted model as one file -- its plan, its weights, its loss-scaler state -- with
no pickled code (``amp_compiler.loading`` reads it back).

    >>> amp = ac.convert(model, example_kwargs=batch, dtype="float16")   # ... train ...
    >>> ac.save(amp, "gpt2.amp")
    >>> amp = ac.load("gpt2.amp", GPT2LMHeadModel(config))   # same casts, same weights, same scale

``load`` (``amp_compiler.loading``) never unpickles anything: the plan and the manifest are
JSON, the weights are safetensors (or, without the ``safetensors`` package, ``torch.save`` of a
flat dict of tensors read back with ``torch.load(weights_only=True)``). The code is the user's
own model class: the file brings the numbers, ``load`` re-captures the model and re-applies the
saved plan (``convert(model, ..., plan=saved)``), so the casts are the same ones, even after the
policy tables change in a later version.

The file is one zip archive (members written uncompressed but for the JSON). One file and not a
folder because one file can be replaced atomically: it is written to a temporary file in the
same folder, flushed to disk and ``os.replace``d onto ``path``, so a reader (or a run that
crashes mid-save) sees the previous file or the whole new one, never a mix; a folder cannot be
swapped in one step. Any zip tool lists it, and its JSON members read as text:

    manifest.json        format tag and version, amp_compiler and torch versions, the model's
                         class name, low dtype, conversion mode (training / inference) and the
                         mode it was in, capture path (fx / export), the convert options a
                         re-capture needs (loss_scale, dynamic_shapes, rewrite_attention), the
                         example inputs' shapes and dtypes (export captures), the weights' index
                         (file, format, tied names), the loss scaler's state
    plan.json            ``amp.plan.to_json()``
    weights.safetensors  ``amp.state_dict()``: the weights under the user model's keys
    or weights.pt        (``model.state_dict()``'s): a training module's fp32 master weights; an
                         inference module's fp32 weights while the user's model keeps them
                         alive, else the low-precision copies it folded (what it computes with;
                         ``load`` upcasts them into the model and folds the same bits again).
                         Tied names (GPT-2's ``lm_head.weight`` / ``transformer.wte.weight``) are
                         stored once, the others listed in the manifest as aliases.

keep_fp32 / force_low are not recorded (``convert`` keeps no copy of them): their effect is in
the plan's decisions, which ``load`` re-applies as they are.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Mapping

import torch
from torch import nn

import amp_compiler
from amp_compiler.errors import ConfigError, SavedFileError
from amp_compiler.module import AmpModule
from amp_compiler.passes.dtypes import dtype_name
from amp_compiler.passes.plan import PrecisionPlan

FORMAT = "amp_compiler.saved"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
WEIGHTS = {"safetensors": "weights.safetensors", "torch": "weights.pt"}
_PREFIX = "graph_module."          # AmpModule.state_dict()'s keys before they became the model's


def save(amp: nn.Module, path: str | os.PathLike) -> str:
    """Write ``amp`` (an ``AmpModule``) to one file at ``path``: plan, weights, scaler state.

    The write is atomic: a temporary file in the same folder, fsync, ``os.replace``; an
    existing file at ``path`` is replaced only once the new one is complete, and a failure
    leaves nothing at ``path`` but what was there before. Returns the path written.

    A module captured by TorchDynamo (``capture="dynamo"``, or the fallback when torch.export
    cannot capture the model) has no single graph to re-apply a plan to: SavedFileError.

    Example:
        >>> amp = ac.convert(model, example_kwargs={"input_ids": ids, "labels": ids})
        >>> ac.save(amp, "checkpoints/gpt2.amp")
        'checkpoints/gpt2.amp'
    """
    path = os.fspath(path)
    if getattr(amp, "source", None) == "dynamo":
        raise SavedFileError(
            "this module was captured by TorchDynamo (capture='dynamo'): its graphs are planned "
            "at their first call, and there is no one graph to re-apply a saved plan to. Save "
            "the weights with torch.save(model.state_dict(), ...) and convert again after "
            "loading, or convert with capture='export' / 'fx' (example_inputs given or not) to "
            "use amp_compiler.save")
    if not isinstance(amp, AmpModule):
        raise ConfigError(f"save() takes the AmpModule convert() returns, got {type(amp).__name__}")
    if amp.source not in ("fx", "export"):
        raise SavedFileError(f"this module was captured by {amp.source!r}; save() re-applies plans "
                             f"to fx and torch.export captures only")
    from amp_compiler.onnx.io import check_destination, replacing  # ONNX is optional

    path = check_destination(path, overwrite=True, error=SavedFileError, example="model.amp")
    plan, gm, training, mode = _conversion_state(amp)
    tensors, aliases = _dedupe(_user_state_dict(amp))
    weights_format = "safetensors" if safetensors_torch() is not None else "torch"
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "amp_compiler_version": amp_compiler.__version__,
        "torch_version": torch.__version__,
        "model_class": _model_class(gm),
        "dtype": dtype_name(plan.low_dtype),
        "training": training,
        "mode": mode,
        "capture": amp.source,
        "convert_options": {
            "loss_scale": _loss_scale(amp.scaler) if training else None,
            "dynamic_shapes": _dynamic_shapes(gm) if amp.source == "export" else None,
            "rewrite_attention": bool(plan.meta.get("rewrite_attention", False)),
        },
        "inputs": _input_specs(gm) if amp.source == "export" else None,
        "weights": {"file": WEIGHTS[weights_format], "format": weights_format,
                    "tensors": len(tensors), "aliases": aliases},
        "scaler": _scaler_state(amp.scaler),
    }
    with replacing(path) as tmp:
        stage = os.path.join(os.path.dirname(tmp), "weights.stage")  # removed with the folder
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=1), zipfile.ZIP_DEFLATED)
            zf.writestr(PLAN, plan.to_json(), zipfile.ZIP_DEFLATED)
            _write_weights(zf, tensors, weights_format, stage)
    return path


def _conversion_state(amp) -> tuple[PrecisionPlan, Any, bool, str]:
    """(plan, graph module, conversion mode, current mode) of the conversion to re-apply.

    A training conversion switched to eval (``amp.eval()`` for validation) holds its eval
    graph's plan; the training graph's, the one ``convert(training=True)`` re-captures, is the
    one kept for the other mode."""
    mode = "train" if amp.training else "eval"
    if amp.folded:  # an inference conversion (or a frozen one): weights folded, eval only
        return amp.plan, amp.graph_module, False, "eval"
    if amp.training:
        return amp.plan, amp.graph_module, True, mode
    other = getattr(amp, "_other_modes", {}).get(True)
    if getattr(other, "_plan", None) is None:
        raise SavedFileError("this training module is in eval mode and its training graph is "
                             "not at hand: call amp.train() before save()")
    return other._plan, other.graph_module, True, mode


def _user_state_dict(amp) -> dict[str, torch.Tensor]:
    """``amp.state_dict()`` under the user model's keys, whichever keys AmpModule gives: the
    model's own, or (nn.Module's default, as earlier versions gave) the graph module's
    prefixed with ``graph_module.``."""
    sd = amp.state_dict()
    own = list(amp.graph_module.state_dict())
    if own and sorted(sd) == sorted(_PREFIX + k for k in own):
        sd = {k[len(_PREFIX):]: v for k, v in sd.items()}
    internal = [k for k in sd if k.split(".")[0].startswith("_amp_")]
    if internal:
        # a folded copy under the graph module's name: no key of the user's model to load it by
        raise SavedFileError(f"amp.state_dict() names {len(internal)} weights by their "
                             f"low-precision copies (e.g. '{internal[0]}'), not by the model's "
                             f"keys; save the model's weights with torch.save(model.state_dict(), "
                             f"...) and convert after loading them")
    return dict(sd)


def _dedupe(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied names stored once (safetensors refuses tensors that share memory): ``aliases``
    maps each other name to the stored one. Views into shared memory that are not the same
    tensor (rare: a slice of another weight) are copied, as are non-contiguous ones."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise SavedFileError(f"state_dict entry '{key}' is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.device.type == "meta":
            raise SavedFileError(f"weight '{key}' is on the meta device (no values to save); "
                                 f"load or materialise the model's weights first")
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                t.stride(), t.dtype)
        if t.numel() and view in seen:
            aliases[key] = seen[view]
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        if t.numel() and storage in storages or not t.is_contiguous():
            t = t.contiguous().clone()
        else:
            storages.add(storage)
        if t.numel():
            seen[view] = key
        kept[key] = t
    return kept, aliases


def safetensors_torch():
    """``safetensors.torch``, or None when the package is not installed (looked up at each call:
    the package is optional, and a test may hide it)."""
    try:
        from safetensors import torch as st
    except ImportError:
        return None
    return st


def _write_weights(zf: zipfile.ZipFile, tensors: dict[str, torch.Tensor], fmt: str,
                   stage: str) -> None:
    name = WEIGHTS[fmt]
    if fmt == "safetensors":
        # staged in a file beside the archive: safetensors writes a file (or returns the whole
        # payload as bytes); zipfile then streams it in without a second copy in memory
        safetensors_torch().save_file({k: t.cpu() for k, t in tensors.items()}, stage)
        zf.write(stage, name)
    else:
        with zf.open(name, "w", force_zip64=True) as f:
            torch.save({k: t.cpu() for k, t in tensors.items()}, f)


def _model_class(gm) -> str | None:
    """The user model's class name: fx names its GraphModule class after it; torch.export
    records it as the root of each node's module stack."""
    name = type(gm).__name__
    if name not in ("GraphModule", "GraphModuleImpl"):
        return name
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if path == "":
                return (cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
                        ).rsplit(".", 1)[-1]
    return None


def _loss_scale(scaler):
    """What convert's ``loss_scale`` was: None (no scaler), a number (static: the scaler's floor
    and ceiling pin it) or "dynamic"."""
    if scaler is None:
        return None
    if scaler.min_scale == scaler.max_scale:
        return float(scaler.min_scale)
    return "dynamic"


def _scaler_state(scaler) -> dict | None:
    if scaler is None:
        return None
    state = dict(scaler.state_dict())
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def _placeholder_values(gm) -> list:
    return [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]


def _hint(size) -> int:
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:
            # torch's private helper, looked up only for a symbol with no hint
            from torch.fx.experimental.symbolic_shapes import optimization_hint

            hint = optimization_hint(size)
        return int(hint)
    return int(size)


def _dynamic_shapes(gm) -> str | None:
    """"auto" when the capture kept a dimension symbolic; None when every size was fixed (as
    ``dynamic_shapes=None`` captures, and as "auto" does when the model fixes every size)."""
    for v in _placeholder_values(gm):
        if isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape):
            return "auto"
    return None


def _input_specs(gm) -> dict | None:
    """The example inputs torch.export captured, as JSON: {"args": [...], "kwargs": {...}},
    each tensor as its shape (the sizes the capture traced with), dtype and position among the
    inputs, each constant as its value, tuples / lists / dicts as such. An input that was the
    same tensor as an earlier one (``{"input_ids": ids, "labels": ids}``, as Trainer batches
    often are) says so: torch.export captures one placeholder's reads through the other, and
    a re-capture from two different tensors would give another graph. None when the inputs
    cannot be described (load then needs the caller's own examples)."""
    spec = getattr(gm, "_in_spec", None)
    values = _placeholder_values(gm)
    if spec is None or spec.num_leaves != len(values):
        return None
    views: dict[tuple, int] = {}
    storages: set = set()
    leaves = []
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            leaves.append(_Leaf(i, v, None))
            continue
        try:
            storage = v.untyped_storage()._cdata
            # sizes may be symbols, which do not hash: their names do (same name, same size)
            view = (storage, str(v.storage_offset()), str(tuple(v.shape)), str(v.stride()), v.dtype)
        except (RuntimeError, AttributeError, TypeError):
            return None
        if view in views:
            leaves.append(_Leaf(i, v, views[view]))
            continue
        if storage in storages:
            return None  # a view into another input: not described, the caller passes examples
        storages.add(storage)
        views[view] = i
        leaves.append(_Leaf(i, v, None))
    try:
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, spec)
        return {"args": [_describe(a) for a in args],
                "kwargs": {str(k): _describe(v) for k, v in kwargs.items()}}
    except (TypeError, ValueError):
        return None


class _Leaf:
    """One captured input: its position among the flattened inputs, its (fake) value, and the
    position of the earlier input it is the same tensor as."""

    def __init__(self, index: int, value, same_as: int | None) -> None:
        self.index, self.value, self.same_as = index, value, same_as


def _describe(value) -> dict:
    if isinstance(value, _Leaf):
        if not isinstance(value.value, torch.Tensor):
            return _describe(value.value)
        v = value.value
        spec = {"shape": [_hint(s) for s in v.shape], "dtype": dtype_name(v.dtype),
                "input": value.index}
        return spec if value.same_as is None else {**spec, "same_as": value.same_as}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_describe(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _describe(v) for k, v in value.items()}}
    raise TypeError(type(value).__name__)
