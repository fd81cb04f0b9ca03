"""``amp-compiler bench --mode onnx``: ONNX Runtime latency, error and casts of mixed-precision
files, side by side in one process.

Every file comes from one fp32 model and runs in one ONNX Runtime on the same input:

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

Measured per file:

1. latency: median and inter-quartile range of ``run_with_iobinding`` over interleaved rounds
   (the order rotates each round), inputs and outputs bound on the device so no host copy is
   timed; ``time.perf_counter`` around a run that ONNX Runtime synchronises before returning;
2. error: ``max|out - ref| / max|ref|`` (``passes.metrics.rel_error``) of the first output against
   the torch fp32 model on the same input (TF32 off);
3. Cast nodes in the file, and its size;
4. ratios against onnxconverter-common's file (or against fp32 where there is none), and
   against the other converters: time over the faster of onnxconverter-common and ModelOpt,
   error over the smaller of theirs, casts over ModelOpt's, size over onnxconverter-common's.

    $ amp-compiler bench --mode onnx --model gpt --size bench --batch 1 --seq-len 64
    $ amp-compiler bench --mode onnx --model mlp --device cpu --rounds 2 --out /tmp/onnx.json

The CUDA run needs onnxruntime-gpu (``CUDAExecutionProvider``); ``--device cuda`` without it is an
error that says so. Results print as a table and are written as JSON (default
``bench/results/<model>-onnx-<device>-<dtype>.json``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import hashlib
import importlib.util
import io
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from amp_compiler.bench.suite import (DTYPES, MODELS, SIZES, BenchError, _fmt, _Parser, _summary,
                                check_counts, installed_version, write_json)
from amp_compiler.onnx.export import onnx_session, ort_providers
from amp_compiler.passes.metrics import rel_error

__all__ = ["main", "run", "export_fp32", "build_model", "example_inputs", "FILES", "MINCAST"]

# The files, in display order. The first one present is the baseline of the ratios.
FILES = ("fp32", "onnxconverter-common", "modelopt", "convert_onnx", "convert_onnx-lowtables",
         "convert_onnx-islands", "convert_onnx-mincast", "export_onnx")
# ModelOpt: an optional extra; the other two: choices of ours beside the default, asked for by name
DEFAULT_FILES = tuple(f for f in FILES if f not in ("modelopt", "convert_onnx-lowtables",
                                                     "convert_onnx-islands"))
ISLAND_TOLERANCE = 0.1  # convert_onnx-islands: the error may grow by 10% for fewer Casts
BASELINES = ("onnxconverter-common", "fp32")
OTHERS = ("onnxconverter-common", "modelopt")  # the converters we compare against
# The fewest-casts recipe: the residual stream (add) and the LayerNorms on it low as well.
MINCAST = ("add", "layer_norm")
PROVIDERS = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "cpu": ["CPUExecutionProvider"]}


def build_parser(prog: str = "amp-compiler bench --mode onnx") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="ONNX Runtime latency, error vs torch fp32 and Cast count "
                "of the fp32 file, onnxconverter-common's fp16 file and ours, side by side.")
    p.add_argument("--mode", choices=("onnx",), default="onnx")
    p.add_argument("--model", choices=MODELS + tuple(_suite()), default="gpt")
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
class Config:
    argv: list[str]
    model: str
    size: str
    device: str
    dtype: torch.dtype
    dtype_name: str
    batches: tuple[int | None, ...]
    seq_len: int | None
    steps: int
    rounds: int
    warmup: int
    files: tuple[str, ...]
    opset: int | None
    out: str
    files_dir: str | None = None
    build_only: bool = False
    error_batch: int = 32


def _suite() -> dict:
    from amp_compiler.bench.real import SPECS

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


def _resolve(argv: list[str]) -> Config:
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
    return Config(list(argv), a.model, a.size, device, DTYPES[a.dtype], a.dtype, batches,
                  a.seq_len, a.steps, a.rounds, a.warmup, files, a.opset, out, a.files_dir,
                  a.build_only, a.error_batch)


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
    from torch.export import Dim

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
        from amp_compiler.bench.real import output_field

        return output_field(self.model(**dict(zip(self.names, tensors))), "logits")


def build_model(name: str, size: str, batch: int | None, seq_len: int | None) -> tuple[nn.Module, tuple]:
    """(fp32 model in eval mode, positional inputs) of a reference or suite model."""
    suite = _suite()
    if name not in suite:
        from amp_compiler.models import build

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
    if name not in _suite():
        return build_model(name, size, batch, seq_len)[1]
    return _suite_inputs(name, size, model.model, batch, seq_len)[1]


def _suite_inputs(name: str, size: str, model: nn.Module, batch: int,
                  seq_len: int | None) -> tuple[tuple[str, ...], tuple]:
    from amp_compiler.bench.real import PROMPT, make_batch

    spec = _suite()[name]
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


def _make_files(cfg: Config, model: nn.Module, inputs: tuple, progress) -> dict[str, onnx.ModelProto]:
    """Every requested file, built from one fp32 model (never modified)."""
    import tempfile

    import amp_compiler as ac
    from amp_compiler.onnx.frontend import convert_onnx

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
            amp = ac.convert(copy.deepcopy(model).to(cfg.device).eval(),
                             tuple(t.to(cfg.device) for t in inputs), dtype=cfg.dtype_name,
                             training=False)
            with tempfile.TemporaryDirectory() as tmp:
                path = ac.export_onnx(amp, tuple(t.to(cfg.device) for t in inputs),
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
    import amp_compiler
    import amp_compiler.passes

    digest = hashlib.sha256()
    for package in (amp_compiler, amp_compiler.passes):
        root = Path(package.__file__).parent
        for source in sorted(root.glob("*.py")):
            digest.update(source.name.encode())
            digest.update(source.read_bytes())
    for dist in ("torch", "transformers", "onnx", "onnxconverter-common", "nvidia-modelopt"):
        digest.update(f"{dist}={installed_version(dist)}".encode())
    return digest.hexdigest()[:8]


def _occ(fp32: onnx.ModelProto) -> onnx.ModelProto:
    try:
        from onnxconverter_common import float16
    except ImportError as e:
        raise BenchError("the onnxconverter-common file needs `pip install onnxconverter-common`; "
                         "or leave it out with --files") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(fp32, keep_io_types=True)


def _modelopt(fp32: onnx.ModelProto) -> onnx.ModelProto:
    import logging
    import tempfile

    try:
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


# ----------------------------------------------------------------------------- running


@dataclass
class Runner:
    """One file in one InferenceSession, its inputs and outputs bound on the device."""

    name: str
    session: Any
    casts: int
    size_bytes: int
    binding: Any = None
    times_ms: list[float] = field(default_factory=list)
    error: float | None = None

    def bind(self, feeds: dict[str, np.ndarray], device: str) -> None:
        import onnxruntime as ort

        self.binding, self.times_ms, self.error = self.session.io_binding(), [], None
        for i, arr in zip(self.session.get_inputs(), feeds.values()):
            self.binding.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(arr, device, 0))
        for o in self.session.get_outputs():
            self.binding.bind_output(o.name, device)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()

    def output(self) -> np.ndarray:
        return self.binding.copy_outputs_to_cpu()[0]


def _runner(name: str, model: onnx.ModelProto, cfg: Config) -> Runner:
    blob = model.SerializeToString()
    session = onnx_session(blob, PROVIDERS[cfg.device], quiet=True)
    casts = sum(n.op_type == "Cast" for n in model.graph.node)
    return Runner(name, session, casts, len(blob))


def _time(r: Runner, n: int) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        r.run()
        r.times_ms.append((time.perf_counter() - t0) * 1e3)


def _reference(model: nn.Module, inputs: tuple, device: str) -> torch.Tensor:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            out = model.to(device)(*(t.to(device) for t in inputs))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model.cpu()
    first = out[0] if isinstance(out, (tuple, list)) else out
    return first.float().cpu()


def run(cfg: Config, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Build every file once; at each batch check its error and time them interleaved; returns
    the JSON-ready result."""
    import onnxruntime as ort

    model, inputs = build_model(cfg.model, cfg.size, cfg.batches[0], cfg.seq_len)
    files = _make_files(cfg, model, inputs, progress)
    if cfg.build_only:
        return {"built": sorted(files), "files_dir": cfg.files_dir}
    runners: list[Runner] = []
    for name, proto in files.items():
        progress(f"loading {name}")
        try:
            runners.append(_runner(name, proto, cfg))
        except Exception as exc:  # noqa: BLE001 -- a file ORT refuses is a result, not a crash
            print(f"{name}: ONNX Runtime refuses it: {str(exc).splitlines()[0][:200]}",
                  file=sys.stderr)
    if not runners:
        raise BenchError("ONNX Runtime refused every file (the reasons are printed above)")
    runs = []
    for batch in cfg.batches:
        batch_inputs = inputs if batch is None else _batch_of(inputs, batch)
        ref = _reference(model, batch_inputs, cfg.device)
        feeds = {f"input_{i}": t.cpu().numpy() for i, t in enumerate(batch_inputs)}
        for r in runners:
            r.bind(feeds, cfg.device)
            for _ in range(max(cfg.warmup, 1)):
                r.run()
            r.error = rel_error(torch.from_numpy(np.asarray(r.output(), np.float32)), ref)
        for k in range(cfg.rounds):
            for r in runners[k % len(runners):] + runners[:k % len(runners)]:
                progress(f"batch {batch_inputs[0].shape[0]}, round {k + 1}/{cfg.rounds}: {r.name}")
                _time(r, cfg.steps)
        runs.append(_rows(runners, batch_inputs))
    result = _result(cfg, runs, files, {r.name for r in runners}, ort.__version__)
    if cfg.error_batch:
        progress(f"errors on {cfg.error_batch} samples")
        result["errors"] = _errors(cfg, model, runners)
    return result


def _errors(cfg: Config, model: nn.Module, runners: list[Runner]) -> dict[str, Any]:
    """Max and RMS relative error of every file on ``cfg.error_batch`` distinct samples, with
    their ratios to the more accurate of the other converters."""
    inputs = example_inputs(cfg.model, cfg.size, model, cfg.error_batch, cfg.seq_len)
    ref = _reference(model, inputs, cfg.device).double()
    feeds = {f"input_{i}": t.cpu().numpy() for i, t in enumerate(inputs)}
    rows: dict[str, dict[str, float]] = {}
    for r in runners:
        r.bind(feeds, cfg.device)
        r.run()
        out = torch.from_numpy(np.asarray(r.output(), np.float64))
        rms = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
        rows[r.name] = {"max_rel_error": rel_error(out, ref), "rms_rel_error": rms}
    for key in ("max_rel_error", "rms_rel_error"):
        best = min((rows[o][key] for o in OTHERS if o in rows), default=None)
        for row in rows.values():
            row[key.replace("_error", "_vs_best_other")] = _ratio(row[key], best)
    return {"batch": cfg.error_batch, "input_shapes": [list(t.shape) for t in inputs], "files": rows}


def _median(r: Runner) -> float | None:
    return (_summary(r.times_ms) or {}).get("median")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _rows(runners: list[Runner], inputs: tuple) -> dict[str, Any]:
    """One batch's measurements, with the ratios."""
    by_name = {r.name: r for r in runners}
    base = next((by_name[b] for b in BASELINES if b in by_name), None)
    others = [by_name[o] for o in OTHERS if o in by_name]
    fastest = min((_median(o) for o in others), default=None)
    smallest_error = min((o.error for o in others if o.error is not None), default=None)
    rows = {}
    for r in runners:
        rows[r.name] = {
            "time_ms": _summary(r.times_ms), "max_rel_error": r.error, "casts": r.casts,
            "size_bytes": r.size_bytes, "provider": r.session.get_providers()[0],
            "time_vs_baseline": _ratio(_median(r), base and _median(base)),
            "error_vs_baseline": _ratio(r.error, base and base.error),
            # against the other converters: the faster, the more accurate, ModelOpt's casts,
            # onnxconverter-common's size (the targets)
            "time_vs_fastest_other": _ratio(_median(r), fastest),
            "error_vs_best_other": _ratio(r.error, smallest_error),
            "casts_vs_modelopt": _ratio(r.casts, by_name["modelopt"].casts) if "modelopt" in by_name else None,
            "size_vs_onnxconverter_common": _ratio(r.size_bytes, by_name["onnxconverter-common"].size_bytes)
            if "onnxconverter-common" in by_name else None,
        }
    return {"input_shapes": [list(t.shape) for t in inputs],
            "baseline": base.name if base else None, "files": rows}


def _result(cfg: Config, runs: list[dict], files: dict[str, onnx.ModelProto], loaded: set[str],
            ort_version: str) -> dict[str, Any]:
    import amp_compiler

    device_name = torch.cuda.get_device_name() if cfg.device == "cuda" else (
        platform.processor() or platform.machine())
    return {
        "command": "amp-compiler bench " + shlex.join(cfg.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model, "size": cfg.size, "mode": "onnx", "dtype": cfg.dtype_name,
        "device": cfg.device, "device_name": device_name,
        "torch": torch.__version__, "onnxruntime": ort_version, "onnx": onnx.__version__,
        "amp_compiler": amp_compiler.__version__, "steps": cfg.steps, "rounds": cfg.rounds,
        # the first batch's run at the top level (one batch: the whole result), every run in runs
        **runs[0], "runs": runs, "refused_by_ort": sorted(set(files) - loaded),
    }


def print_table(result: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=180)
    for run_ in result.get("runs", [result]):
        t = Table(title=f"{result['model']} ({result['size']}) ONNX, inputs {run_['input_shapes']}, "
                        f"{result['dtype']}, ONNX Runtime {result['onnxruntime']} on "
                        f"{result['device_name']}",
                  caption=f"/base: ratio to {run_['baseline']}; /others: to the faster (time) or more "
                          f"accurate (error) of onnxconverter-common and ModelOpt; error: max rel vs "
                          f"torch fp32" + (f"; ORT refused: {', '.join(result['refused_by_ort'])}"
                                           if result["refused_by_ort"] else ""))
        for col in ("file", "provider", "ms/run", "IQR", "time/base", "time/others", "max rel err",
                    "err/base", "err/others", "Cast nodes", "size"):
            t.add_column(col, justify="left" if col in ("file", "provider") else "right")
        for name, r in run_["files"].items():
            tm = r["time_ms"] or {}
            t.add_row(name, r["provider"].replace("ExecutionProvider", ""),
                      _fmt(tm.get("median"), ".3f"), _fmt(tm.get("iqr"), ".3f"),
                      _fmt(r["time_vs_baseline"], ".2f", "x"), _fmt(r.get("time_vs_fastest_other"), ".2f", "x"),
                      _fmt(r["max_rel_error"], ".2e"), _fmt(r["error_vs_baseline"], ".2f", "x"),
                      _fmt(r.get("error_vs_best_other"), ".2f", "x"), str(r["casts"]),
                      f"{r['size_bytes'] / 2**20:.1f} MB")
        console.print(t)
    if result.get("errors"):
        e = result["errors"]
        t = Table(title=f"errors vs torch fp32 on {e['batch']} samples, inputs {e['input_shapes']}",
                  caption="/others: to the more accurate of onnxconverter-common and ModelOpt")
        for col in ("file", "max rel err", "/others", "RMS rel err", "/others "):
            t.add_column(col, justify="left" if col == "file" else "right")
        for name, r in e["files"].items():
            t.add_row(name, _fmt(r["max_rel_error"], ".2e"), _fmt(r["max_rel_vs_best_other"], ".2f", "x"),
                      _fmt(r["rms_rel_error"], ".2e"), _fmt(r["rms_rel_vs_best_other"], ".2f", "x"))
        console.print(t)


def main(argv: list[str] | None = None) -> int:
    """``amp-compiler bench --mode onnx``: 0, or 2 for a bad request, 1 when a conversion fails.

    Example::

        main(["--mode", "onnx", "--model", "mlp", "--device", "cpu", "--rounds", "1",
              "--out", "bench/results/mlp-onnx.json"])
    """
    from rich.console import Console

    from amp_compiler.errors import AmpCompilerError

    argv = list(sys.argv[1:] if argv is None else argv)
    err = Console(stderr=True)
    try:
        cfg = _resolve(argv)
        with err.status("starting") as status:
            result = run(cfg, progress=lambda s: status.update(s))
    except SystemExit as e:
        return int(e.code or 0)
    except BenchError as e:
        print(f"amp-compiler bench: error: {e}", file=sys.stderr)
        return 2
    except AmpCompilerError as e:
        print(f"amp-compiler bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if cfg.build_only:
        print(f"built {', '.join(result['built'])} in {cfg.files_dir}")
        return 0
    write_json(result, cfg.out)
    print_table(result)
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
