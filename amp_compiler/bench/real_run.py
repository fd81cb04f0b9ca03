"""One model of the real-model suite, measured: its fp32 master, each mode's variants built and
warmed up once, then at each batch shape their errors against fp32, their casts and their
interleaved timing, and the JSON-ready result of each mode (failed variants keep their rows).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import shlex
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

import amp_compiler
from amp_compiler.bench.common import Config, device_name, installed_version, no_tf32, tick
from amp_compiler.bench.measure import (allocated, measure_casts, prime, ratios, record_error,
                                        settle, timed_window, variant_json)
from amp_compiler.bench.real_config import LR, SuiteConfig, variant_name, variant_specs
from amp_compiler.bench.real_models import Spec, WithLoss, batch_shapes, make_batch, output_field
from amp_compiler.bench.real_variants import (MESSAGE_CHARS, attempt, build_variant, caller,
                                              convert_as_user, failure, first_line, free)
from amp_compiler.bench.variants import Variant, autocast_ctx, copy_of

__all__ = ["run_model"]


@dataclass
class _Shape:
    """One timed run of a mode: a batch shape and its inputs on the device."""

    label: str
    batch: int
    length: int
    inputs: dict[str, torch.Tensor]


class _ModelRun:
    """One model of the suite: its fp32 master (on the CPU) and what its modes share: the fp32
    eval copy that is the error reference, and the amp eval conversion (the inference mode's,
    which runs first, or one made for the training mode's errors)."""

    def __init__(self, spec: Spec, suite: SuiteConfig) -> None:
        self.spec, self.suite = spec, suite
        torch.manual_seed(0)
        self.master = spec.build(suite.tiny).float().cpu()
        self.reference: nn.Module | None = None
        self.eval_amp: Callable[[dict], Any] | None = None   # batch -> output
        self.eval_amp_failure: dict | None = None

    def shapes(self, mode: str, device: torch.device) -> list[_Shape]:
        out = []
        for b, n in batch_shapes(self.spec, mode, self.suite.tiny, self.suite.infer_batches):
            label = f"{b}x{n}" if self.spec.text else f"{b}x3x{n}x{n}"
            batch = make_batch(self.spec, self.master, b, n, labels=mode == "train")
            out.append(_Shape(label, b, n, {k: t.to(device) for k, t in batch.items()}))
        return out

    def eval_inputs(self, shape: _Shape, device: torch.device) -> dict[str, torch.Tensor]:
        """The eval forward's inputs at ``shape``: the same tokens or pixels, no labels."""
        batch = make_batch(self.spec, self.master, shape.batch, shape.length, labels=False)
        return {k: t.to(device) for k, t in batch.items()}

    def logits(self, kind: str, inputs: dict, cfg: Config) -> torch.Tensor:
        """The eval forward's logits of ``kind`` from the untrained master's weights."""
        if self.reference is None:
            self.reference = copy_of(self.master, cfg, train=False)
        if kind != "amp":
            with autocast_ctx(cfg)() if kind == "autocast" else no_tf32():
                return output_field(self.reference(**inputs), "logits").float()
        if self.eval_amp is None and self.eval_amp_failure is None:
            try:
                self.eval_amp = caller(convert_as_user(copy_of(self.master, cfg, train=False),
                                                       inputs, cfg.dtype, False))
            except Exception as e:  # noqa: BLE001 - said in the row's error_note
                self.eval_amp_failure = failure("convert", e)
        if self.eval_amp is None:
            f = self.eval_amp_failure
            raise RuntimeError(f"the eval conversion failed in {f['stage']}: "
                               f"{f['exception']}: {f['message']}")
        return output_field(self.eval_amp(inputs), "logits").float()


def _warm(v: Variant, n: int) -> None:
    for _ in range(n):
        v.step(v.inputs)


def _run_mode(run: _ModelRun, mode: str, progress, task) -> list[dict[str, Any]]:
    """Build and warm up every variant of one mode, then measure them at each batch shape;
    returns one JSON-ready entry per shape."""
    suite, spec = run.suite, run.spec
    cfg = suite.bench_config(spec, mode)
    runs = run.shapes(mode, cfg.device)
    built: dict[str, tuple[Variant, list[str]]] = {}
    failed: dict[str, dict] = {}
    prime(cfg)
    example = max(runs, key=lambda r: (r.batch * r.length, r.batch))
    for kind, runtime in variant_specs(suite, mode):
        name = variant_name(kind, runtime)
        tick(progress, task, f"{spec.name} {mode}: building {name}")
        settle(cfg)
        before = allocated(cfg)
        stage, made = ["copy"], []

        def make():
            # converted at the largest shape (a batch-1 example could be specialised by
            # torch.export), warmed up at the first shape; kept only once it has run
            v = build_variant(kind, runtime, cfg, suite, run.master, example.inputs, stage)
            v.inputs = (runs[0].inputs,)
            _warm(v, suite.warmup)
            made.append(v)

        if attempt(make, failed, name, stage, cfg):
            v = made.pop()
            settle(cfg)
            # what the variant keeps between steps: weights, folded copies, optimizer state
            v.state_bytes = allocated(cfg) - before if cfg.cuda else None
            built[name] = (v, stage)
            if mode == "infer" and name == "amp":
                # the eval conversion the training mode's errors need: this one, not a second
                run.eval_amp = lambda inputs, _v=v: _v.forward((inputs,))
            del v
        tick(progress, task, advance=1)
    if mode == "infer" and "amp" in failed and run.eval_amp is None:
        run.eval_amp_failure = failed["amp"]
    results = [_run_shape(run, cfg, shape, i == 0, built, failed, progress, task)
               for i, shape in enumerate(runs)]
    built.clear()
    settle(cfg)
    if suite.compile:
        torch._dynamo.reset()  # the next mode's modules must not count against its cache limit
    return results


def _run_shape(run: _ModelRun, cfg: Config, shape: _Shape, first: bool,
               built: dict[str, tuple[Variant, list[str]]], build_failures: dict[str, dict],
               progress, task) -> dict[str, Any]:
    """Errors, casts and interleaved timing of every built variant at one batch shape."""
    suite, what = run.suite, f"{run.spec.name} {cfg.mode} {shape.label}"
    failures = dict(build_failures)
    variants: list[Variant] = []
    for name, (base, stage) in built.items():
        if first:
            variants.append(base)
            continue
        v = dataclasses.replace(base, inputs=(shape.inputs,), times_ms=[], peak_bytes=None,
                                error=None, error_nonfinite=False, casts=None,
                                profiled_to_copy=None)
        # compiled variants compile this shape here
        if attempt(lambda: _warm(v, suite.warmup), failures, name, stage, cfg):
            variants.append(v)
    tick(progress, task, f"{what}: errors vs fp32, casts")
    notes = _errors(run, cfg, shape, variants)
    for v in list(variants):
        if not attempt(lambda: measure_casts(v), failures, v.name, ["forward (casts)"], cfg):
            variants.remove(v)
    for r in range(suite.rounds):
        k = r % len(variants) if variants else 0
        # rotate the order so that no variant always runs right after the same neighbour
        for v in variants[k:] + variants[:k]:
            tick(progress, task, f"{what}, round {r + 1}/{suite.rounds}: {v.name}")
            if not attempt(lambda: timed_window(v, cfg), failures, v.name,
                            built[v.name][1], cfg):
                variants.remove(v)
            tick(progress, task, advance=1)
    return _shape_json(run, shape, variants, failures, notes, cfg.mode)


def _errors(run: _ModelRun, cfg: Config, shape: _Shape,
            variants: list[Variant]) -> dict[str, str]:
    """Fill each variant's ``error`` against fp32 (eval forward, logits, untrained weights);
    returns a note for each variant whose error could not be measured.

    Inference variants are measured on their own forward (they are eval modules and inference
    leaves their weights as they were); training variants through eval modules of the master by
    kind, as ``amp-compiler bench`` does, compiled ones left out (they share their eager twin's
    plan)."""
    notes: dict[str, str] = {}
    inputs = run.eval_inputs(shape, cfg.device) if cfg.train else shape.inputs
    with torch.no_grad():
        ref = run.logits("fp32", inputs, cfg)
        for v in variants:
            if cfg.train and v.compiled:
                continue
            try:
                out = (run.logits(v.kind, inputs, cfg) if cfg.train else
                       output_field(v.forward((inputs,)), "logits").float())
            except Exception as e:  # noqa: BLE001 - the row says why it has no error
                notes[v.name] = f"{type(e).__name__}: {str(e)[:MESSAGE_CHARS]}"
                continue
            record_error(v, out, ref)
            del out
    return notes


def _shape_json(run: _ModelRun, shape: _Shape, variants: list[Variant],
                failures: dict[str, dict], notes: dict[str, str], mode: str) -> dict[str, Any]:
    alive = {v.name: v for v in variants}
    # a failed variant keeps its row, with nothing measured and the failure said
    rows_of = [alive.get(variant_name(k, r))
               or Variant(variant_name(k, r), k, r.startswith("compile"), None, None, None, ())
               for k, r in variant_specs(run.suite, mode)]
    rows = {}
    for v in rows_of:
        rows[v.name] = {**variant_json(v), "failure": failures.get(v.name),
                        "error_note": notes.get(v.name),
                        "final_scale": v.scaler.get_scale() if v.scaler is not None else None}
    return {
        "label": shape.label,
        "batch": {"batch": shape.batch,
                  "seq_len": shape.length if run.spec.text else None,
                  "image_size": None if run.spec.text else shape.length,
                  "inputs": {k: {"shape": list(t.shape),
                                 "dtype": str(t.dtype).removeprefix("torch.")}
                             for k, t in shape.inputs.items()}},
        "variants": rows,
        "ratios": ratios(rows_of),
    }


def run_model(spec: Spec, suite: SuiteConfig, modes: list[str], progress,
               task) -> Iterator[tuple[str, dict[str, Any]]]:
    """(mode, JSON-ready result) of each mode of one model, each as soon as it is done."""
    try:
        importlib.import_module(spec.library)
    except ImportError:
        reason = f"needs `pip install {spec.library}` (no weights are downloaded)"
        for mode in modes:
            yield mode, _result(suite, spec, mode, None, [], status="skipped", reason=reason)
        return
    try:
        run = _ModelRun(spec, suite)
    except Exception as e:  # noqa: BLE001 - e.g. a library version without this model
        f = failure("build", e)
        for mode in modes:
            yield mode, _result(suite, spec, mode, None, [], status="failed", failed=f)
        return
    for mode in modes:
        ran = failed = None
        try:
            ran = _run_mode(run, mode, progress, task)
        except Exception as e:  # noqa: BLE001 - the mode fails, the suite goes on
            failed = failure(mode, e)
        if failed is not None:
            free(suite.bench_config(spec, mode))
        yield mode, _result(suite, spec, mode, run.master, ran or [],
                            status="ok" if failed is None else "failed", failed=failed)


def _result(suite: SuiteConfig, spec: Spec, mode: str, master: nn.Module | None,
            runs: list[dict], *, status: str, reason: str | None = None,
            failed: dict | None = None) -> dict[str, Any]:
    cfg = suite.bench_config(spec, mode)
    argv = suite.argv if "--suite" in suite.argv else ["--suite", "real", *suite.argv]
    inner = master.model if isinstance(master, WithLoss) else master
    if failed is not None and reason is None:
        reason = f"failed in {failed['stage']}: {failed['exception']}: {first_line(failed)}"
    return {
        "command": shlex.join(["amp-compiler", "bench", *argv]),
        "argv": argv,
        "suite": "real",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "libraries": {lib: installed_version(lib) for lib in ("transformers", "torchvision")},
        "amp_compiler": amp_compiler.__version__,
        "device": cfg.device.type,
        "device_name": device_name(cfg.device),
        "model": spec.name,
        "architecture": type(inner).__name__ if inner is not None else None,
        "config": "tiny" if suite.tiny else "full",
        "model_config": spec.config,
        "params": sum(p.numel() for p in master.parameters()) if master is not None else None,
        "mode": mode,
        "dtype": cfg.dtype_name,
        "status": status,
        "reason": reason,
        "failure": failed,
        "settings": {"steps": suite.steps, "rounds": suite.rounds, "warmup": suite.warmup,
                     "compile": suite.compile, "compile_backend": suite.compile_backend,
                     "compile_mode": suite.compile_mode,
                     "cuda_graphs": suite.cuda_graphs,
                     "infer_batches": list(suite.infer_batches) if mode == "infer" else None,
                     "variants": [variant_name(k, r) for k, r in variant_specs(suite, mode)],
                     "optimizer": ("AdamW(fused)" if cfg.cuda else "AdamW(foreach)")
                     if mode == "train" else None,
                     "lr": LR if mode == "train" else None,
                     "error_reference": "fp32 eval forward of the untrained weights, TF32 off"},
        "runs": runs,
    }
