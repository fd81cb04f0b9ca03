"""One variant of the real-model suite, built as users build it and failing as data: the
conversion called with keyword inputs, torch.compile or CUDA graphs around it, its optimizer and
loss scaler, and step closures that keep the stage they are in current, so that a variant that
fails anywhere (convert, forward, backward, optimizer step, OOM) is recorded with its stage and
exception text while the suite goes on.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from typing import Any, Callable

import torch
from torch import nn

import amp_compiler
from amp_compiler.bench.common import Config
from amp_compiler.bench.real_config import SuiteConfig, compile_mode_of, variant_name
from amp_compiler.bench.real_models import output_field
from amp_compiler.bench.variants import (Variant, autocast_ctx, copy_of, infer_step, loss_scaler,
                                         make_optimizer, no_ctx, train_step)

__all__ = ["convert_as_user", "caller", "build_variant", "failure", "first_line", "free",
           "attempt", "MESSAGE_CHARS"]

MESSAGE_CHARS = 2000         # of an exception message kept in the JSON (dynamo's run long)


def convert_as_user(model: nn.Module, batch: dict, dtype: torch.dtype, train: bool):
    """The user's call: keyword inputs, so that ``amp(**batch)`` returns the library's output."""
    return amp_compiler.convert(model, example_kwargs=batch, dtype=dtype, training=train)


def caller(module: Callable) -> Callable[[dict], Any]:
    """batch -> output, as Trainer and Accelerate call a model."""
    return lambda b: module(**b)


def _in_cuda_graphs(module: nn.Module, kind: str, cfg: Config):
    """``amp_compiler.cuda_graphs`` of the module; for autocast, of a call that enters autocast
    itself with its cast cache off: under CUDA graphs autocast is part of what is recorded, and
    the cache cannot serve a replay (the runner switches it off while capturing either way)."""
    if kind != "autocast":
        return amp_compiler.cuda_graphs(module)

    def autocast_call(*args, **kwargs):
        with torch.autocast(cfg.device.type, dtype=cfg.dtype, cache_enabled=False):
            return module(*args, **kwargs)
    return amp_compiler.cuda_graphs(autocast_call)


def build_variant(kind: str, runtime: str, cfg: Config, suite: SuiteConfig, master: nn.Module,
           example: dict, stage: list[str]) -> Variant:
    """One variant: its own copy of the master (converted for amp, wrapped by torch.compile or
    CUDA graphs if asked), its optimizer and loss scaler, and step closures that keep
    ``stage`` current."""
    compiled = runtime.startswith("compile")
    t0 = time.perf_counter()
    stage[0] = "copy"
    module = copy_of(master, cfg, train=cfg.train)
    ctx = autocast_ctx(cfg) if kind == "autocast" else no_ctx
    amp = None
    if kind == "amp":
        stage[0] = "convert"
        # the fp32 copy is not kept: an inference conversion holds folded low-precision
        # weights only, as it would for a user who converts and drops the original
        module = amp = convert_as_user(module, example, cfg.dtype, cfg.train)
    if compiled:
        stage[0] = "compile"
        # dynamic=False: inference runs two batch shapes; each gets its own static graph,
        # for autocast and amp alike, instead of one generic dynamic-shape graph
        module = torch.compile(module, backend=suite.compile_backend,
                               mode=compile_mode_of(suite, runtime), dynamic=False)
    if runtime == "cudagraphs":
        module = _in_cuda_graphs(module, kind, cfg)
        ctx = no_ctx  # autocast is inside the graph's call
    call = caller(module)
    opt = scaler = note = None
    if cfg.train:
        opt = make_optimizer((amp if amp is not None else module).parameters(), cfg)
        scaler, in_graph, note = loss_scaler(kind, amp, cfg)
        opt.register_step_pre_hook(lambda *_: stage.__setitem__(0, "step"))

        def loss_of(batch):
            stage[0] = "forward"
            loss = output_field(call(batch), "loss")
            stage[0] = "backward"
            return loss
        step = train_step(loss_of, ctx, opt, scaler, in_graph)
    else:
        step = infer_step(call, ctx)

    def forward(inp, _ctx=ctx):
        with _ctx():
            return call(inp[0])

    stage[0] = "forward"
    return Variant(name=variant_name(kind, runtime), kind=kind, compiled=compiled, module=module,
                   forward=forward, step=step, inputs=(example,), amp=amp, optimizer=opt,
                   scaler=scaler, scaler_note=note, setup_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- failures


def failure(stage: str, exc: BaseException) -> dict[str, Any]:
    """An exception as data: where it happened (stage, innermost frame) and what it said."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = (f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}"
             if frames else None)
    return {"stage": stage, "exception": type(exc).__name__,
            "message": str(exc)[:MESSAGE_CHARS], "where": where}


def free(cfg: Config) -> None:
    """After a failure (often an OOM): drop its garbage and give the cached blocks back."""
    gc.collect()
    if cfg.cuda:
        try:
            torch.cuda.synchronize(cfg.device)
            torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error: what follows fails too, and is recorded
            pass


def attempt(fn: Callable[[], Any], failures: dict[str, dict], name: str, stage: list[str],
             cfg: Config) -> bool:
    """Run ``fn``; if it raises, record the failure under ``name`` with the stage it was in
    (``stage[0]`` then) and free what it left."""
    try:
        fn()
        return True
    except Exception as e:  # noqa: BLE001 - a failing variant is data; the suite goes on
        where = stage[0] + (" (compiled)" if "+compile" in name else "")
        failures[name] = failure(where, e)
    free(cfg)  # after the except block: its traceback no longer holds the tensors
    return False


def first_line(f: dict) -> str:
    """The first line of a failure's message (empty when it has none)."""
    lines = f["message"].strip().splitlines()
    return lines[0] if lines else ""
