"""load() / read(): a file ``amp_compiler.save`` wrote, checked and read back into a model.

    >>> amp = ac.load("gpt2.amp", GPT2LMHeadModel(config))   # same casts, same weights, same scale
    >>> manifest, plan, weights = amp_compiler.loading.read("gpt2.amp")   # nothing converted

``read`` checks the archive before anything is used: the manifest's format tag, version and
fields (a newer format says which version to upgrade to), the plan's dtype against the
manifest's, the weights' index; it never unpickles (JSON members, safetensors, or
``torch.load(weights_only=True)``). ``load`` then checks the weights' keys and shapes against
the model (another architecture is refused before anything is written into it), loads them,
and re-applies the saved plan with ``convert(model, ..., plan=saved)``: torch.export captures
get example inputs rebuilt from the saved shapes and dtypes, fx captures need none. The file's
layout is described in ``amp_compiler.saving``, which writes it.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from typing import Any

import torch
from torch import nn

import amp_compiler
from amp_compiler.convert import convert
from amp_compiler.errors import AmpCompilerError, ConfigError, SavedFileError
from amp_compiler.passes.dtypes import LOW_DTYPES, TORCH_DTYPES, dtype_name, resolve_dtype
from amp_compiler.passes.plan import PrecisionPlan
from amp_compiler.saving import FORMAT, FORMAT_VERSION, MANIFEST, PLAN, WEIGHTS, safetensors_torch

_MAX_MANIFEST_BYTES = 16 * 2**20   # the example-input specs and scaler state: kilobytes


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
    path = os.fspath(path)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load() takes the model to load into, an nn.Module, got "
                          f"{type(model).__name__}")
    manifest, plan, weights = read(path)
    saved = LOW_DTYPES[manifest["dtype"]]
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
        >>> manifest, plan, weights = amp_compiler.loading.read("gpt2.amp")
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
        if plan.low_dtype != LOW_DTYPES[manifest["dtype"]]:
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
            f"format {version}; this amp_compiler ({amp_compiler.__version__}) reads format "
            f"{FORMAT_VERSION} and older: upgrade amp_compiler to load it")
    expect = {"dtype": str, "training": bool, "mode": str, "capture": str,
              "convert_options": dict, "weights": dict}
    for key, kind in expect.items():
        if not isinstance(m.get(key), kind):
            raise SavedFileError(f"{where}: {key!r} is missing or not a JSON {kind.__name__}")
    if m["dtype"] not in LOW_DTYPES:
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
        st = safetensors_torch()
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
        dtype = TORCH_DTYPES[spec["dtype"]]
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
