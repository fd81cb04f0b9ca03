"""save() / load(): a converted model as one file -- its plan, its weights, its loss-scaler
state -- and back, with no pickled code.

    >>> amp = ac.convert(model, example_kwargs=batch, dtype="float16")   # ... train ...
    >>> ac.save(amp, "gpt2.amp")
    >>> amp = ac.load("gpt2.amp", GPT2LMHeadModel(config))   # same casts, same weights, same scale

``load`` never unpickles anything: the plan and the manifest are JSON, the weights are
safetensors (or, without the ``safetensors`` package, ``torch.save`` of a flat dict of tensors
read back with ``torch.load(weights_only=True)``). The code is the user's own model class: the
file brings the numbers, ``load`` re-captures the model and re-applies the saved plan
(``convert(model, ..., plan=saved)``), so the casts are the same ones, even after the policy
tables change in a later version.

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

import io
import json
import os
import warnings
import zipfile
from typing import Any, Mapping

import torch
from torch import nn

from amp_compiler.errors import AmpCompilerError, ConfigError, SavedFileError
from amp_compiler.passes.plan import PrecisionPlan, dtype_name

FORMAT = "amp_compiler.saved"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
WEIGHTS = {"safetensors": "weights.safetensors", "torch": "weights.pt"}
_MAX_MANIFEST_BYTES = 16 * 2**20   # the example-input specs and scaler state: kilobytes
_PREFIX = "graph_module."          # AmpModule.state_dict()'s keys before they became the model's
_LOW = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPES = {dtype_name(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


# -- save ---------------------------------------------------------------------------------------

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
    from amp_compiler.module import AmpModule

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
    from amp_compiler.onnx.export import check_destination, replacing

    path = check_destination(path, overwrite=True, error=SavedFileError, example="model.amp")
    plan, gm, training, mode = _conversion_state(amp)
    tensors, aliases = _dedupe(_user_state_dict(amp))
    weights_format = "safetensors" if _safetensors() is not None else "torch"
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "amp_compiler_version": _version(),
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


def _safetensors():
    """``safetensors.torch``, or None when the package is not installed."""
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
        _safetensors().save_file({k: t.cpu() for k, t in tensors.items()}, stage)
        zf.write(stage, name)
    else:
        with zf.open(name, "w", force_zip64=True) as f:
            torch.save({k: t.cpu() for k, t in tensors.items()}, f)


def _version() -> str:
    import amp_compiler

    return amp_compiler.__version__


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


# -- load ---------------------------------------------------------------------------------------

def load(path: str | os.PathLike, model: nn.Module, example_inputs: tuple | None = None,
         example_kwargs: dict | None = None, *, dtype=None) -> nn.Module:
    """Load a file ``save`` wrote: the weights into ``model`` (which must be the same
    architecture), then ``convert(model, ..., plan=saved_plan)`` and the loss scaler's state.
    Returns the AmpModule.

    Args:
        path: the file ``save`` wrote.
        model: a model of the saved architecture (fresh weights are fine: they are replaced).
            Loading writes into its parameters and buffers, keys and shapes checked first
            (a model they do not fit is left as it was); the capture runs after, so when it
            fails (a model with the same weights and another forward) the weights are loaded.
        example_inputs / example_kwargs: inputs to capture with; by default rebuilt from the
            saved shapes and dtypes (random floats, integer zeros, boolean ones) on the model's
            device. A module saved from an fx capture (convert without examples) takes none.
        dtype: optional check: the low dtype you expect; a file saved with another raises.

    Raises SavedFileError (missing file, not a file ``save`` wrote, a format newer than this
    library, weights that do not fit ``model``), ConfigError (a dtype other than the saved
    one; a plan that does not match the model's graph), PlanError (a damaged plan).

    Example:
        >>> model = GPT2LMHeadModel(config)          # random weights
        >>> amp = ac.load("checkpoints/gpt2.amp", model)
        >>> amp(**batch).loss.backward()             # resumes with the saved loss scale
    """
    from amp_compiler.convert import convert, resolve_dtype

    path = os.fspath(path)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load() takes the model to load into, an nn.Module, got "
                          f"{type(model).__name__}")
    manifest, plan, weights = read(path)
    saved = _LOW[manifest["dtype"]]
    if dtype is not None and resolve_dtype(dtype) != saved:
        asked = dtype_name(resolve_dtype(dtype))
        raise ConfigError(f"'{path}' was saved as {manifest['dtype']}, not {asked}: load it as "
                          f"saved (dtype=None), or convert the model again with dtype={asked!r}")
    capture = manifest["capture"]
    given = example_inputs is not None or example_kwargs is not None
    if capture == "fx" and given:
        raise ConfigError(f"'{path}' was saved from an fx capture (convert without example "
                          f"inputs): load it without example_inputs / example_kwargs")
    if capture == "export" and not given:
        if manifest["inputs"] is None:
            raise ConfigError(f"'{path}' does not describe the example inputs it was captured "
                              f"with: pass example_inputs=(...) / example_kwargs={{...}} to load()")
        example_inputs, example_kwargs = _rebuild_inputs(manifest["inputs"], _device_of(model))
    # the weights first: an inference conversion folds its low-precision copies from them
    _load_weights(path, manifest, model, weights)
    options = manifest["convert_options"]
    try:
        amp = convert(model, example_inputs, example_kwargs=example_kwargs or None, dtype=saved,
                      training=manifest["training"], plan=plan, capture=capture,
                      loss_scale=options["loss_scale"] if manifest["training"] else "dynamic",
                      **({"dynamic_shapes": options["dynamic_shapes"] or None}
                         if capture == "export" else {}))
    except ConfigError as exc:  # check_saved_plan's (same keys, another forward): name the file
        if type(exc) is not ConfigError:
            raise
        raise ConfigError(f"'{path}' cannot be re-applied to this {type(model).__name__} (its "
                          f"weights are loaded): {exc}") from exc
    if manifest["scaler"] is not None:
        if amp.scaler is None:
            raise SavedFileError(f"'{path}' holds a loss scaler's state but the module loaded has "
                                 f"no scaler; the file's manifest is inconsistent")
        amp.scaler.load_state_dict(manifest["scaler"])
    if manifest["training"] and manifest["mode"] == "eval":
        try:
            amp.eval()
        except AmpCompilerError as exc:
            warnings.warn(f"'{path}' was saved in eval mode; the module loaded stays in training "
                          f"mode ({exc})", stacklevel=2)
    return amp


def read(path: str | os.PathLike) -> tuple[dict, PrecisionPlan, dict[str, torch.Tensor]]:
    """(manifest, plan, weights) of a file ``save`` wrote, each checked, nothing converted.
    Tied names come back as the same tensor under each name.

    Example:
        >>> manifest, plan, weights = amp_compiler.saving.read("gpt2.amp")
        >>> manifest["dtype"], plan["linear"].precision, weights["lm_head.weight"].shape
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SavedFileError(f"'{path}' does not exist; pass the path amp_compiler.save wrote")
    if os.path.isdir(path):
        raise SavedFileError(f"'{path}' is a folder; pass the file amp_compiler.save wrote")
    not_ours = f"'{path}' is not a file amp_compiler.save wrote"
    if not zipfile.is_zipfile(path):
        raise SavedFileError(f"{not_ours} (not a zip archive); to load a state_dict saved with "
                             f"torch.save, use model.load_state_dict(torch.load(...)) and convert")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        if MANIFEST not in names:
            raise SavedFileError(f"{not_ours} (no {MANIFEST} in the archive)")
        manifest = _check_manifest(path, _read_json(zf, path))
        if PLAN not in names or manifest["weights"]["file"] not in names:
            missing = [n for n in (PLAN, manifest["weights"]["file"]) if n not in names]
            raise SavedFileError(f"'{path}' is incomplete: {', '.join(missing)} missing from the "
                                 f"archive; save the model again")
        plan = PrecisionPlan.from_json(zf.read(PLAN), source=f"{path}:{PLAN}")
        if plan.low_dtype != _LOW[manifest["dtype"]]:
            raise SavedFileError(f"'{path}' is inconsistent: the manifest says "
                                 f"{manifest['dtype']}, the plan {dtype_name(plan.low_dtype)}; "
                                 f"save the model again")
        weights = _read_weights(zf, path, manifest["weights"])
    return manifest, plan, weights


def _read_json(zf: zipfile.ZipFile, path: str) -> Any:
    if zf.getinfo(MANIFEST).file_size > _MAX_MANIFEST_BYTES:
        raise SavedFileError(f"'{path}': {MANIFEST} is over {_MAX_MANIFEST_BYTES} bytes; this is "
                             f"not a file amp_compiler.save wrote")
    try:
        return json.loads(zf.read(MANIFEST).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise SavedFileError(f"'{path}': {MANIFEST} is not valid JSON ({e})") from None


def _check_manifest(path: str, m: Any) -> dict:
    where = f"'{path}': {MANIFEST}"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SavedFileError(f"'{path}' is not a file amp_compiler.save wrote ({MANIFEST} has no "
                             f"'format': {FORMAT!r})")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SavedFileError(f"{where}: 'format_version' {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise SavedFileError(
            f"'{path}' was written by amp_compiler {m.get('amp_compiler_version', '?')} in save "
            f"format {version}; this amp_compiler ({_version()}) reads format {FORMAT_VERSION} "
            f"and older: upgrade amp_compiler to load it")
    expect = {"dtype": str, "training": bool, "mode": str, "capture": str,
              "convert_options": dict, "weights": dict}
    for key, kind in expect.items():
        if not isinstance(m.get(key), kind):
            raise SavedFileError(f"{where}: {key!r} is missing or not a JSON {kind.__name__}")
    if m["dtype"] not in _LOW:
        raise SavedFileError(f"{where}: 'dtype' {m['dtype']!r} is not float16 or bfloat16")
    if m["capture"] not in ("fx", "export"):
        raise SavedFileError(f"{where}: 'capture' {m['capture']!r} is not 'fx' or 'export'")
    if m["mode"] not in ("train", "eval"):
        raise SavedFileError(f"{where}: 'mode' {m['mode']!r} is not 'train' or 'eval'")
    w = m["weights"]
    if w.get("format") not in WEIGHTS or w.get("file") != WEIGHTS[w.get("format")] \
            or not isinstance(w.get("aliases", {}), dict):
        raise SavedFileError(f"{where}: 'weights' {w!r} is not one of this version's formats "
                             f"({', '.join(WEIGHTS)})")
    opts = m["convert_options"]
    loss_scale = opts.get("loss_scale")
    if not (loss_scale in (None, "dynamic") or (isinstance(loss_scale, (int, float))
                                                and not isinstance(loss_scale, bool))):
        raise SavedFileError(f"{where}: 'convert_options.loss_scale' {loss_scale!r} is not "
                             f"'dynamic', a number or null")
    if opts.get("dynamic_shapes") not in (None, "auto"):
        raise SavedFileError(f"{where}: 'convert_options.dynamic_shapes' is not 'auto' or null")
    if m.get("inputs") is not None and not isinstance(m["inputs"], dict):
        raise SavedFileError(f"{where}: 'inputs' is not a JSON object or null")
    if m.get("scaler") is not None and not isinstance(m["scaler"], dict):
        raise SavedFileError(f"{where}: 'scaler' is not a JSON object or null")
    m.setdefault("inputs", None)
    m.setdefault("scaler", None)
    return m


def _read_weights(zf: zipfile.ZipFile, path: str, index: dict) -> dict[str, torch.Tensor]:
    data = zf.read(index["file"])
    if index["format"] == "safetensors":
        st = _safetensors()
        if st is None:
            raise SavedFileError(f"'{path}' holds its weights as safetensors: pip install "
                                 f"safetensors to load it")
        try:
            tensors = st.load(data)
        except Exception as e:  # noqa: BLE001 -- safetensors' own error types vary by version
            raise SavedFileError(f"'{path}': the weights are damaged "
                                 f"({type(e).__name__}: {e})") from e
    else:
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- unpickling errors of every kind
            raise SavedFileError(f"'{path}': the weights are damaged or hold more than tensors "
                                 f"({type(e).__name__}: {e})") from e
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise SavedFileError(f"'{path}': the weights are not a flat dict of named tensors")
    for name, stored in index.get("aliases", {}).items():
        if stored not in tensors:
            raise SavedFileError(f"'{path}': tied weight '{name}' names '{stored}', which the "
                                 f"file does not hold")
        tensors[name] = tensors[stored]
    return tensors


def _load_weights(path: str, manifest: dict, model: nn.Module,
                  weights: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(weights)``, strictly, after checking names and shapes so that a
    model of another architecture is refused before anything is written into it."""
    expected = model.state_dict(keep_vars=True)
    non_persistent = {n for n, _ in model.named_buffers(remove_duplicate=False)} - set(expected)
    # a non-persistent buffer is the model's own (recomputed or constant): not loaded
    weights = {k: v for k, v in weights.items() if k not in non_persistent}
    # tied names the file holds once (an AmpModule may list a tied weight under one name)
    where = {}
    for k, t in expected.items():
        if isinstance(t, torch.Tensor) and t.numel():
            where.setdefault((t.device, t.data_ptr(), tuple(t.shape)), []).append(k)
    for names in where.values():
        have = [n for n in names if n in weights]
        for n in names:
            if n not in weights and have:
                weights[n] = weights[have[0]]
    missing = [k for k in expected if k not in weights]
    unexpected = sorted(k for k in weights if k not in expected)
    shapes = [f"{k}: saved {tuple(weights[k].shape)}, model {tuple(expected[k].shape)}"
              for k in expected if k in weights and isinstance(expected[k], torch.Tensor)
              and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        saved_class = manifest.get("model_class")
        this = type(model).__name__
        was = (f"The file was saved from a {saved_class}, this model is a {this}: "
               if saved_class and saved_class != this else "")
        parts = [f"{len(missing)} missing ({_few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
                 f"{len(shapes)} of another shape ({_few(shapes)})" if shapes else ""]
        raise SavedFileError(
            f"the weights in '{path}' do not fit this model: "
            f"{'; '.join(p for p in parts if p)}. {was}{'l' if was else 'L'}oad() needs a model "
            f"of the same architecture (the same class and config) as the one saved")
    model.load_state_dict(weights, strict=True)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(f"'{i}'" if ":" not in i else i for i in items[:n])
    return shown + (f", ... {len(items) - n} more" if len(items) > n else "")


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _rebuild_inputs(specs: dict, device: torch.device) -> tuple[tuple, dict]:
    """Example inputs of the saved shapes and dtypes: floats from a fixed-seed generator (the
    caller's random state is left alone), integer zeros, boolean ones; an input saved as the
    same tensor as an earlier one is that tensor again."""
    gen = torch.Generator().manual_seed(0)
    made: dict[int, torch.Tensor] = {}
    try:
        args = tuple(_make(s, device, gen, made) for s in specs.get("args", ()))
        kwargs = {k: _make(s, device, gen, made) for k, s in specs.get("kwargs", {}).items()}
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise SavedFileError(f"the saved example-input description is damaged ({e!r}); pass "
                             f"example_inputs=(...) / example_kwargs={{...}} to load()") from None
    return args, kwargs


def _make(spec: dict, device: torch.device, gen: torch.Generator, made: dict):
    if "shape" in spec:
        if spec.get("same_as") is not None:
            return made[spec["same_as"]]
        dtype = _DTYPES[spec["dtype"]]
        shape = [int(s) for s in spec["shape"]]
        if dtype == torch.bool:
            t = torch.ones(shape, dtype=dtype, device=device)
        elif dtype.is_floating_point or dtype.is_complex:
            t = torch.randn(shape, dtype=dtype, generator=gen).to(device)
        else:
            t = torch.zeros(shape, dtype=dtype, device=device)
        made[spec.get("input", -1 - len(made))] = t
        return t
    if "value" in spec:
        return spec["value"]
    if "tuple" in spec:
        return tuple(_make(s, device, gen, made) for s in spec["tuple"])
    if "list" in spec:
        return [_make(s, device, gen, made) for s in spec["list"]]
    if "dict" in spec:
        return {k: _make(s, device, gen, made) for k, s in spec["dict"].items()}
    raise ValueError(f"unknown input spec {sorted(spec)}")
