"""``amp-compiler bench --mode onnx``: the request (which model, which files, where they are
kept) and the mixed-precision files it compares, each built from one fp32 model. ``onnx_run``
runs them in ONNX Runtime.

1. ``fp32``: ``torch.onnx.export`` of the fp32 model, batch dynamic (what deployment users have);
2. ``onnxconverter-common``: ``convert_float_to_float16(fp32, keep_io_types=True)`` (float16 only);
3. ``convert_onnx``: ours, on the same fp32 file, default plan;
4. ``convert_onnx-mincast``: ours with ``force_low=("add", "layer_norm")``, the residual stream
   and its LayerNorms low too: the fewest casts the plan allows; asked for by name:
   ``convert_onnx-lowtables`` (``embedding_tables="low"``: every Gather table low, the smallest
   file) and ``convert_onnx-islands`` (``islands="measure"`` at a 10% tolerance: fp32 islands
   traded for Casts where the error allows, rule O9);
5. ``export_onnx``: ours, exported from the AmpModule (``convert(training=False)`` on the bench
   device, so the device's policy and the attention rewrite apply);
6. ``modelopt``: NVIDIA ModelOpt AutoCast's ``convert_to_mixed_precision(keep_io_types=True)``
   without calibration data (asked for by name: ``--files ...,modelopt``; the ``dev`` extra
   installs it).

``--model`` takes our reference models (``gpt``, ``mlp``, ...) and the real-model suite's
(``gpt2``, ``llama``, ``bert``, ``vit``, ``resnet50``, ...; ``--size tiny`` for their small
configurations): those are exported with the dynamo exporter (what the ONNX converters were
compared on), batch dynamic, and called as users call them (``input_ids`` and, for BERT, an
``attention_mask`` with padding); the file's output is the logits. ``--batch 1,8`` times every
file at each batch (64-token prompts, or images), one set of files.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import importlib.util
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn
from torch.export import Dim

import amp_compiler
import amp_compiler.passes  # code_digest hashes its source
from amp_compiler.bench.common import (DTYPES, MODELS, SIZES, BenchError, Parser, Request,
                                       check_counts, installed_version)
from amp_compiler.bench.real_models import PROMPT, SPECS, make_batch, output_field
from amp_compiler.models import build
from amp_compiler.onnx.convert import convert_onnx
from amp_compiler.onnx.session import ort_providers

__all__ = ["build_parser", "OnnxConfig", "export_fp32", "Positional", "build_model",
           "example_inputs", "make_files", "code_digest", "FILES", "DEFAULT_FILES", "MINCAST"]

# The files, in display order. The first one present is the baseline of the ratios.
FILES = ("fp32", "onnxconverter-common", "modelopt", "convert_onnx", "convert_onnx-lowtables",
         "convert_onnx-islands", "convert_onnx-mincast", "export_onnx")
# ModelOpt: an optional extra; the other two: choices of ours beside the default, asked for by name
DEFAULT_FILES = tuple(f for f in FILES if f not in ("modelopt", "convert_onnx-lowtables",
                                                     "convert_onnx-islands"))
ISLAND_TOLERANCE = 0.1  # convert_onnx-islands: the error may grow by 10% for fewer Casts
OTHERS = ("onnxconverter-common", "modelopt")  # the converters we compare against
# The fewest-casts recipe: the residual stream (add) and the LayerNorms on it low as well.
MINCAST = ("add", "layer_norm")


def build_parser(prog: str = "amp-compiler bench --mode onnx") -> argparse.ArgumentParser:
    """The ``bench --mode onnx`` argument parser."""
    p = Parser(prog=prog, description="ONNX Runtime latency, error vs torch fp32 and Cast count "
               "of the fp32 file, onnxconverter-common's fp16 file and ours, side by side.")
    p.add_argument("--mode", choices=("onnx",), default="onnx")
    p.add_argument("--model", choices=MODELS + tuple(_suite_models()), default="gpt")
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda when ONNX Runtime has CUDAExecutionProvider and torch sees a GPU")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16")
    p.add_argument("--batch", default=None, help="a batch size, or several: 1,8")
    p.add_argument("--error-batch", type=int, default=32,
                   help="distinct samples the errors are also measured on (max and RMS relative "
                        "error; a classifier's few logits per sample make one batch's maximum "
                        "coarse); 0: off")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="timed runs per file per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--files", default=",".join(DEFAULT_FILES), help=f"subset of {','.join(FILES)}")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--files-dir", default=None,
                   help="keep the built files there and reuse them on the next run (same model, "
                        "size, dtype, opset, amp_compiler source and converter versions)")
    p.add_argument("--build-only", action="store_true",
                   help="build (or find) the files in --files-dir and stop: no ONNX Runtime run")
    p.add_argument("--out", default=None)
    return p


@dataclass
class OnnxConfig(Request):
    """The resolved ``--mode onnx`` request: the files, the device ONNX Runtime runs them on
    (``"cuda"`` or ``"cpu"``), the batches they are timed at."""

    device: str
    batches: tuple[int | None, ...]
    files: tuple[str, ...]
    opset: int | None
    files_dir: str | None = None
    build_only: bool = False
    error_batch: int = 32


def _suite_models() -> dict:
    """The real-model suite's models that the ONNX bench takes (not the seq2seq one)."""
    return {k: v for k, v in SPECS.items() if v.task != "seq2seq"}


def _batches(value: str | None) -> tuple[int | None, ...]:
    if value is None:
        return (None,)
    try:
        out = tuple(dict.fromkeys(int(v) for v in value.split(",") if v.strip()))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise BenchError(f"--batch {value!r}: a positive integer or a comma list of them (1,8)")
    return out


def _resolve(argv: list[str]) -> OnnxConfig:
    a = build_parser().parse_args(argv)
    check_counts(a, ("seq_len", "steps"), ("rounds", "warmup", "error_batch"))
    batches = _batches(a.batch)
    cuda_ok = torch.cuda.is_available() and "CUDAExecutionProvider" in ort_providers()
    if a.device == "cuda" and not cuda_ok:
        raise BenchError("--device cuda needs a GPU and onnxruntime-gpu (CUDAExecutionProvider "
                         "missing from onnxruntime.get_available_providers()); use --device cpu")
    device = "cuda" if a.device == "cuda" or (a.device == "auto" and cuda_ok) else "cpu"
    asked = [f.strip() for f in a.files.split(",") if f.strip()]
    if not asked or set(asked) - set(FILES):
        raise BenchError(f"--files {a.files!r}: choose from {','.join(FILES)}")
    files = tuple(f for f in FILES if f in asked)
    if a.dtype == "bfloat16":  # onnxconverter-common and ModelOpt's defaults: float16 only
        files = tuple(f for f in files if f not in OTHERS)
    out = a.out or f"bench/results/{a.model}-onnx-{device}-{a.dtype}.json"
    if a.build_only and not a.files_dir:
        raise BenchError("--build-only needs --files-dir (where the files are kept)")
    return OnnxConfig(argv=list(argv), model=a.model, size=a.size, device=device,
                      dtype=DTYPES[a.dtype], dtype_name=a.dtype, batches=batches,
                      seq_len=a.seq_len, steps=a.steps, rounds=a.rounds, warmup=a.warmup,
                      files=files, opset=a.opset, out=out, files_dir=a.files_dir,
                      build_only=a.build_only, error_batch=a.error_batch)


# ----------------------------------------------------------------------------- the files


def export_fp32(model: nn.Module, inputs: tuple, opset: int | None = None, *,
                dynamo: bool = False) -> onnx.ModelProto:
    """The fp32 file as users make it: ``torch.onnx.export``, batch dimension dynamic.

    The TorchScript exporter is used where torch still has it (8x faster on small models, and
    the file most users have) unless ``dynamo``; otherwise the dynamo exporter.
    """
    names = [f"input_{i}" for i in range(len(inputs))]
    kwargs = {} if opset is None else {"opset_version": opset}
    if not dynamo:
        f = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, inputs, f, dynamo=False, input_names=names,
                                  dynamic_axes={n: {0: "batch"} for n in names}, **kwargs)
            return onnx.load_from_string(f.getvalue())
        except Exception:  # noqa: BLE001 -- torch without the TorchScript exporter
            pass
    shapes = tuple({0: Dim.AUTO} for _ in inputs)
    if isinstance(model, Positional):  # one *tensors argument
        shapes = (shapes,)
    inputs = _batch_of(inputs, max(2, inputs[0].shape[0]))  # a batch of 1 would be specialised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset or 18,
                                    input_names=names, verbose=False, dynamic_shapes=shapes)
    return program.model_proto


class Positional(nn.Module):
    """A suite model called with positional tensors (an exporter's inputs), as users call it
    (``model(input_ids=..., attention_mask=...)``), returning the logits."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return output_field(self.model(**dict(zip(self.names, tensors))), "logits")


def build_model(name: str, size: str, batch: int | None, seq_len: int | None) -> tuple[nn.Module, tuple]:
    """(fp32 model in eval mode, positional inputs) of a reference or suite model."""
    suite = _suite_models()
    if name not in suite:
        extra = {"seq_len": seq_len} if seq_len is not None else {}
        model, inputs = build(name, size, batch=batch, **extra)
        return model.eval(), inputs
    spec = suite[name]
    if importlib.util.find_spec(spec.library) is None:
        raise BenchError(f"--model {name} needs {spec.library} (pip install {spec.library})")
    torch.manual_seed(0)
    model = spec.build(size == "tiny").eval()
    names, inputs = _suite_inputs(name, size, model, batch or 1, seq_len)
    return Positional(model, names).eval(), inputs


def example_inputs(name: str, size: str, model: nn.Module, batch: int, seq_len: int | None) -> tuple:
    """``batch`` distinct samples for ``model`` (as ``build_model`` built it)."""
    if name not in _suite_models():
        return build_model(name, size, batch, seq_len)[1]
    return _suite_inputs(name, size, model.model, batch, seq_len)[1]


def _suite_inputs(name: str, size: str, model: nn.Module, batch: int,
                  seq_len: int | None) -> tuple[tuple[str, ...], tuple]:
    spec = _suite_models()[name]
    length = (seq_len or min(PROMPT, spec.length)) if spec.text else (32 if size == "tiny" else spec.length)
    feed = make_batch(spec, model, batch, length, labels=False)
    if spec.task == "classify":  # padding, so the mask matters
        feed["attention_mask"] = torch.ones_like(feed["input_ids"])
        feed["attention_mask"][-1, length // 2:] = 0
    return tuple(feed), tuple(feed.values())


def _batch_of(inputs: tuple, batch: int) -> tuple:
    """``inputs`` at another batch size: rows repeated (the same tokens or pixels)."""
    reps = -(-batch // inputs[0].shape[0])
    return tuple(t.repeat(reps, *([1] * (t.dim() - 1)))[:batch] for t in inputs)


def make_files(cfg: OnnxConfig, model: nn.Module, inputs: tuple,
               progress) -> dict[str, onnx.ModelProto]:
    """Every requested file, built from one fp32 model (never modified)."""
    cpu_inputs = tuple(t.cpu() for t in inputs)

    def kept(name: str, make: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
        if cfg.files_dir is None:
            return make()
        path = os.path.join(cfg.files_dir, f"{cfg.model}-{cfg.size}-{cfg.dtype_name}-"
                                           f"opset{cfg.opset or 'default'}-{code_digest()}-{name}.onnx")
        if os.path.exists(path):
            return onnx.load(path)
        proto = make()
        os.makedirs(cfg.files_dir, exist_ok=True)
        onnx.save(proto, path + ".part")
        os.replace(path + ".part", path)
        return proto

    progress("exporting the fp32 file")
    fp32 = kept("fp32", lambda: export_fp32(copy.deepcopy(model).cpu().eval(), cpu_inputs, cfg.opset,
                                            dynamo=isinstance(model, Positional)))
    makers: dict[str, Callable[[], onnx.ModelProto]] = {
        "fp32": lambda: fp32,
        "onnxconverter-common": lambda: _occ(fp32),
        "modelopt": lambda: _modelopt(fp32),
        "convert_onnx": lambda: convert_onnx(fp32, dtype=cfg.dtype_name),
        "convert_onnx-mincast": lambda: convert_onnx(fp32, dtype=cfg.dtype_name, force_low=MINCAST),
        "convert_onnx-lowtables": lambda: convert_onnx(fp32, dtype=cfg.dtype_name, embedding_tables="low"),
        "convert_onnx-islands": lambda: convert_onnx(fp32, dtype=cfg.dtype_name, islands="measure",
                                                     island_tolerance=ISLAND_TOLERANCE),
    }
    files: dict[str, onnx.ModelProto] = {}
    for name in cfg.files:
        progress(f"building {name}")
        if name == "export_onnx":
            amp = amp_compiler.convert(copy.deepcopy(model).to(cfg.device).eval(),
                                       tuple(t.to(cfg.device) for t in inputs),
                                       dtype=cfg.dtype_name, training=False)
            with tempfile.TemporaryDirectory() as tmp:
                path = amp_compiler.export_onnx(amp, tuple(t.to(cfg.device) for t in inputs),
                                                f"{tmp}/amp.onnx", opset=cfg.opset)
                files[name] = onnx.load(path)
        else:
            files[name] = kept(name, makers[name])
    return files


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """Eight hex digits naming the code a kept file (``--files-dir``) was built by: amp_compiler's
    source (the package and its passes) and the versions of what exports and converts (torch,
    transformers, onnx, onnxconverter-common, nvidia-modelopt). A file built before a change to
    any of them is not reused."""
    digest = hashlib.sha256()
    for package in (amp_compiler, amp_compiler.passes):
        root = Path(package.__file__).parent
        for source in sorted(root.rglob("*.py")):  # the rooms (onnx/, capture/...) too
            digest.update(source.relative_to(root).as_posix().encode())
            digest.update(source.read_bytes())
    for dist in ("torch", "transformers", "onnx", "onnxconverter-common", "nvidia-modelopt"):
        digest.update(f"{dist}={installed_version(dist)}".encode())
    return digest.hexdigest()[:8]


def _occ(fp32: onnx.ModelProto) -> onnx.ModelProto:
    try:  # optional (the dev extra): only this file needs it
        from onnxconverter_common import float16
    except ImportError as e:
        raise BenchError("the onnxconverter-common file needs `pip install onnxconverter-common`; "
                         "or leave it out with --files") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(fp32, keep_io_types=True)


def _modelopt(fp32: onnx.ModelProto) -> onnx.ModelProto:
    try:  # optional (the dev extra): only this file needs it
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as e:
        raise BenchError("the modelopt file needs `pip install nvidia-modelopt onnx-graphsurgeon onnxslim "
                         "polygraphy lief` (the dev extra has them); or leave it out of --files") from e
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = f"{tmp}/fp32.onnx"
        onnx.save(fp32, path)
        loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                   if n.startswith("modelopt")]  # its INFO lines, one per node
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            return convert_to_mixed_precision(path, keep_io_types=True)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
