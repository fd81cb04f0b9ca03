"""``amp-compiler bench --mode onnx``, run: the files of ``onnx_files`` in one ONNX Runtime
process, their latency, error and casts side by side, the JSON-ready result and its table.

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

import datetime
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import amp_compiler
from amp_compiler.bench import onnx_files
from amp_compiler.bench.common import (BenchError, device_name, fmt, no_tf32, ratio, summary,
                                       write_json)
from amp_compiler.bench.onnx_files import (OTHERS, OnnxConfig, _batch_of, _resolve, build_model,
                                           example_inputs)
from amp_compiler.onnx.session import onnx_session
from amp_compiler.passes.metrics import onnx_cast_count, rel_error

__all__ = ["main", "run", "print_table"]

BASELINES = ("onnxconverter-common", "fp32")  # the first one present is the ratios' baseline
PROVIDERS = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "cpu": ["CPUExecutionProvider"]}


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


def _runner(name: str, model: onnx.ModelProto, cfg: OnnxConfig) -> Runner:
    blob = model.SerializeToString()
    session = onnx_session(blob, PROVIDERS[cfg.device], quiet=True)
    return Runner(name, session, onnx_cast_count(model), len(blob))


def _time(r: Runner, n: int) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        r.run()
        r.times_ms.append((time.perf_counter() - t0) * 1e3)


def _reference(model: nn.Module, inputs: tuple, device: str) -> torch.Tensor:
    try:
        with no_tf32(), torch.no_grad():
            out = model.to(device)(*(t.to(device) for t in inputs))
    finally:
        model.cpu()
    first = out[0] if isinstance(out, (tuple, list)) else out
    return first.float().cpu()


def run(cfg: OnnxConfig, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Build every file once; at each batch check its error and time them interleaved; returns
    the JSON-ready result."""
    model, inputs = build_model(cfg.model, cfg.size, cfg.batches[0], cfg.seq_len)
    files = onnx_files.make_files(cfg, model, inputs, progress)
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


def _errors(cfg: OnnxConfig, model: nn.Module, runners: list[Runner]) -> dict[str, Any]:
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
            row[key.replace("_error", "_vs_best_other")] = ratio(row[key], best)
    return {"batch": cfg.error_batch, "input_shapes": [list(t.shape) for t in inputs], "files": rows}


def _median(r: Runner) -> float | None:
    return (summary(r.times_ms) or {}).get("median")


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
            "time_ms": summary(r.times_ms), "max_rel_error": r.error, "casts": r.casts,
            "size_bytes": r.size_bytes, "provider": r.session.get_providers()[0],
            "time_vs_baseline": ratio(_median(r), base and _median(base)),
            "error_vs_baseline": ratio(r.error, base and base.error),
            # against the other converters: the faster, the more accurate, ModelOpt's casts,
            # onnxconverter-common's size (the targets)
            "time_vs_fastest_other": ratio(_median(r), fastest),
            "error_vs_best_other": ratio(r.error, smallest_error),
            "casts_vs_modelopt": ratio(r.casts, by_name["modelopt"].casts) if "modelopt" in by_name else None,
            "size_vs_onnxconverter_common": ratio(r.size_bytes, by_name["onnxconverter-common"].size_bytes)
            if "onnxconverter-common" in by_name else None,
        }
    return {"input_shapes": [list(t.shape) for t in inputs],
            "baseline": base.name if base else None, "files": rows}


def _result(cfg: OnnxConfig, runs: list[dict], files: dict[str, onnx.ModelProto], loaded: set[str],
            ort_version: str) -> dict[str, Any]:
    return {
        "command": "amp-compiler bench " + shlex.join(cfg.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model, "size": cfg.size, "mode": "onnx", "dtype": cfg.dtype_name,
        "device": cfg.device, "device_name": device_name(torch.device(cfg.device)),
        "torch": torch.__version__, "onnxruntime": ort_version, "onnx": onnx.__version__,
        "amp_compiler": amp_compiler.__version__, "steps": cfg.steps, "rounds": cfg.rounds,
        # the first batch's run at the top level (one batch: the whole result), every run in runs
        **runs[0], "runs": runs, "refused_by_ort": sorted(set(files) - loaded),
    }


def print_table(result: dict[str, Any], console=None) -> None:
    """The result as rich tables: one per batch, then the errors on the error batch."""
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
                      fmt(tm.get("median"), ".3f"), fmt(tm.get("iqr"), ".3f"),
                      fmt(r["time_vs_baseline"], ".2f", "x"), fmt(r.get("time_vs_fastest_other"), ".2f", "x"),
                      fmt(r["max_rel_error"], ".2e"), fmt(r["error_vs_baseline"], ".2f", "x"),
                      fmt(r.get("error_vs_best_other"), ".2f", "x"), str(r["casts"]),
                      f"{r['size_bytes'] / 2**20:.1f} MB")
        console.print(t)
    if result.get("errors"):
        e = result["errors"]
        t = Table(title=f"errors vs torch fp32 on {e['batch']} samples, inputs {e['input_shapes']}",
                  caption="/others: to the more accurate of onnxconverter-common and ModelOpt")
        for col in ("file", "max rel err", "/others", "RMS rel err", "/others "):
            t.add_column(col, justify="left" if col == "file" else "right")
        for name, r in e["files"].items():
            t.add_row(name, fmt(r["max_rel_error"], ".2e"), fmt(r["max_rel_vs_best_other"], ".2f", "x"),
                      fmt(r["rms_rel_error"], ".2e"), fmt(r["rms_rel_vs_best_other"], ".2f", "x"))
        console.print(t)


def main(argv: list[str]) -> int:
    """Build and run the files, write the JSON file, print the tables; returns 0. A bad request
    raises ``BenchError`` and a failed conversion ``AmpCompilerError``:
    ``amp_compiler.bench.command`` turns them into exit codes.

    Example (through the command)::

        amp_compiler.bench.command.main(["--mode", "onnx", "--model", "mlp", "--device", "cpu",
                                         "--rounds", "1", "--out", "bench/results/mlp-onnx.json"])
    """
    cfg = _resolve(argv)
    with Console(stderr=True).status("starting") as status:
        result = run(cfg, progress=lambda s: status.update(s))
    if cfg.build_only:
        print(f"built {', '.join(result['built'])} in {cfg.files_dir}")
        return 0
    write_json(result, cfg.out)
    print_table(result)
    print(f"wrote {cfg.out}")
    return 0
