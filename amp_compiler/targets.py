"""What a command-line TARGET names, loaded: a model and its example inputs, or an ONNX file.

TARGET is a reference model name (``amp_compiler.models.NAMES``), ``module.path:factory`` or
``file.py:factory`` (a callable returning an ``nn.Module`` or ``(model, example_inputs)``; an
``nn.Module`` instance works too), or an ``.onnx`` file. ``--example-shape`` specs
(``InputSpec``) become example inputs: random floats from a fixed seed, integer zeros.

Every failure (missing file, bad factory path, a factory that raises, unknown model) is a
``ConfigError`` naming the TARGET: the command line prints it as one line and exits with 2.

    >>> loaded = load_target("mypkg.models:make_model", example_shape=[InputSpec((8, 784))])
    >>> loaded.model, loaded.example_inputs
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from amp_compiler.errors import ConfigError
from amp_compiler.passes.graph import attribute


@dataclass(frozen=True)
class InputSpec:
    """One ``--example-shape``: the shape and element type (a torch dtype's name)."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class Loaded:
    """What TARGET names: a model and its example inputs, or an ONNX file."""

    name: str
    model: Any = None
    example_inputs: tuple | None = None
    onnx_path: Path | None = None


def make_inputs(specs: Sequence[InputSpec], device: str) -> tuple:
    """Example inputs of these shapes and dtypes: floats from a fixed seed, integer zeros."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in specs:
        dtype = getattr(torch, s.dtype)
        if dtype.is_floating_point:
            t = torch.randn(s.shape, generator=gen).to(dtype)
        else:  # zero is a valid index, mask and class label for any model
            t = torch.zeros(s.shape, dtype=dtype)
        out.append(t.to(device))
    return tuple(out)


def _exec_file(path: Path, spec: str):
    """Run ``path`` as a module, as ``python path`` would: its folder first on ``sys.path`` (it
    imports its sibling modules) and the module in ``sys.modules`` while it runs (``@dataclass``
    and pickling look their module up there by name). The folder stays on the path: a factory
    or a forward may import siblings later."""
    path = path.resolve()
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = path.stem
    taken = sys.modules.get(name)
    if not name.isidentifier() or (taken is not None and getattr(taken, "__file__", None) != str(path)):
        # another module of that name (a user's "torch.py", "models.py"...): do not replace it
        name = f"_amp_factory_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if not isinstance(e, Exception):
            raise
        raise ConfigError(f"bad factory {spec!r}: running {spec.rpartition(':')[0]} raised "
                          f"{type(e).__name__}: {e}") from e
    return module


def _import_factory(spec: str):
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"bad factory {spec!r}: write module.path:factory or file.py:factory")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"bad factory {spec!r}: file {module_name!r} does not exist")
        module = _exec_file(path, spec)
    else:
        # the user's own package is usually in the current folder, not installed
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"bad factory {spec!r}: cannot import {module_name!r} ({e})") from e
        except Exception as e:
            raise ConfigError(f"bad factory {spec!r}: importing {module_name} raised "
                              f"{type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(os.getcwd())
    try:
        return attribute(module, attr)
    except AttributeError:
        raise ConfigError(f"bad factory {spec!r}: {module_name!r} has no attribute {attr!r}") from None


def load_target(target: str, *, size: str = "tiny", example_shape=None,
                device: str = "cpu") -> Loaded:
    """Resolve TARGET (reference model name, ``module:factory``, ``file.py:factory`` or
    ``.onnx``) into a model and example inputs; every failure is a ConfigError.

    Example:
        >>> loaded = load_target("mlp")
        >>> type(loaded.model).__name__, loaded.example_inputs[0].shape
        ('MLP', torch.Size([8, 784]))
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
    if target.lower().endswith(".onnx"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"ONNX file {target!r} does not exist")
        return Loaded(path.stem, onnx_path=path)
    inputs = make_inputs(example_shape, device) if example_shape else None
    if ":" in target and not Path(target).exists():
        obj = _import_factory(target)
        if not isinstance(obj, nn.Module):
            if not callable(obj):
                raise ConfigError(f"bad factory {target!r}: {type(obj).__name__} is neither an "
                                  f"nn.Module nor callable")
            try:
                obj = obj()
            except Exception as e:
                raise ConfigError(f"factory {target!r} raised {type(e).__name__}: {e}") from e
        model, own = obj, None
        if isinstance(obj, tuple) and len(obj) == 2:
            model, own = obj
            own = own if isinstance(own, tuple) else (own,)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"factory {target!r} returned {type(obj).__name__}; return an "
                              f"nn.Module or (model, example_inputs)")
        model = model.to(device)
        if own is not None:
            own = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in own)
        return Loaded(target.rpartition(":")[2], model, inputs or own)
    if Path(target).exists():
        raise ConfigError(f"{target!r} is a file or folder but not an .onnx model; give a "
                          f"reference model name, module.path:factory or file.py:factory")
    try:  # the reference models are an optional part of the install
        from amp_compiler.models import UnknownModelError, build
    except ImportError as e:
        raise ConfigError(f"{target!r}: the reference models are not installed ({e})") from e
    try:
        model, own = build(target, size, device=device)
    except UnknownModelError as e:
        hint = " (no such file either)" if ("/" in target or "." in target) else ""
        raise ConfigError(f"{e}{hint}; or give module.path:factory or an .onnx file") from None
    return Loaded(target, model, inputs or own)
