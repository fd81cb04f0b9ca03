"""``amp-compiler bench --model ...``: the reference-model workloads' request, their model and
their variants (fp32, torch.autocast, amp_compiler, plain half), and each variant's error against
fp32. ``workloads_run`` runs them.

Every variant starts from the same initial weights (deep copies of one fp32 model made before
anything trains) and sees the same input tensors. Timing is interleaved: each round runs every
variant's timed steps in turn (the order rotates each round), so clock drift, thermal state and
allocator state are shared fairly. What is measured, per variant:

1. time per step: median and inter-quartile range over all timed steps of all rounds, taken with
   CUDA events around each step (``time.perf_counter`` on CPU, where nothing is asynchronous);
2. memory (CUDA only): the state the variant keeps between steps and the steady-state peak of a
   step in its own window (``amp_compiler.bench.measure`` says how);
3. error: ``max|out - ref| / max|ref|`` of the forward output (the logits, in eval mode, under
   ``no_grad``) against fp32 on the same input, computed once before any training;
4. casts per forward: ``amp.cast_count()`` for amp_compiler; for the others the number of
   ``aten::_to_copy`` events in one profiled forward (also reported for amp, like for like);
5. ratios against autocast (eager variants) or compiled autocast (compiled variants);
6. with ``--loss-steps N``: fp32, autocast and amp trained N steps from the same init on the same
   fixed batches; final loss (mean of the last 10 steps), its ratio to fp32, NaN flagged.

    $ amp-compiler bench --model gpt --size bench --mode train --dtype float16
    $ amp-compiler bench --model mlp_wide --size bench --batch 4096 --out bench/results/mlp.json

A training step is ``amp_compiler.bench.variants``'s. An inference step is a forward under
``no_grad``; amp is converted with ``training=False``, so its weights are folded to the low
dtype once.

Results print as a table and are written as JSON (default
``bench/results/<model>-<mode>-<device>-<dtype>[-compile].json``).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import torch
from torch import nn

import amp_compiler
from amp_compiler.bench.common import (DTYPES, MODELS, SIZES, BenchError, Config, Parser,
                                       check_counts, resolve_device)
from amp_compiler.bench.measure import record_error
from amp_compiler.bench.variants import (Variant, autocast_ctx, copy_of, infer_step, loss_scaler,
                                         make_optimizer, no_ctx, train_step)
from amp_compiler.models import build

__all__ = ["build_parser", "make_variant", "errors_vs_fp32", "KINDS", "COMPILABLE"]

KINDS = ("fp32", "autocast", "amp", "half")          # eager variants, in display order
COMPILABLE = ("fp32", "autocast", "amp")             # kinds that get a "+compile" twin

# Input shapes that differ from the model preset's, by (model, size, mode): the GPT inference
# target of the design document is one 64-token prompt, not the training batch.
DEFAULT_SHAPES: dict[tuple[str, str, str], dict[str, int]] = {
    ("gpt", "bench", "infer"): {"batch": 1, "seq_len": 64},
}

# AdamW learning rates for --loss-steps (timing does not depend on them): nanoGPT's for the
# decoder, BERT's fine-tuning rate for the encoder, Adam's usual default elsewhere.
LEARNING_RATES: dict[str, float] = {"gpt": 6e-4, "bert": 1e-4}
DEFAULT_LR = 1e-3


# ----------------------------------------------------------------------------- the request


def build_parser(prog: str = "amp-compiler bench") -> argparse.ArgumentParser:
    """The ``bench`` argument parser (exposed so the CLI can show its help)."""
    p = Parser(prog=prog, description="Benchmark fp32, torch.autocast and amp_compiler side by "
               "side: time, peak memory, error vs fp32 and casts per forward.")
    p.add_argument("--suite", choices=("real",), default=None,
                   help="real: the real-model suite instead of one reference model (HF GPT-2, "
                   "Llama, BERT, T5, ViT, torchvision ResNet-50 and ConvNeXt-T; see "
                   "`amp-compiler bench --suite real --help`)")
    p.add_argument("--model", choices=MODELS, default="gpt")
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--mode", choices=("train", "infer", "onnx"), default="train",
                   help="onnx: ONNX Runtime files side by side (see amp_compiler.bench.onnx_files)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (gpt, bert, lstm)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (0: no timing)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd fp32/autocast/amp (default inductor backend)")
    p.add_argument("--variants", default="fp32,autocast,amp",
                   help="comma-separated subset of fp32,autocast,amp,half (half: infer only)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<name>.json)")
    p.add_argument("--loss-steps", type=int, default=None,
                   help="also train fp32/autocast/amp N steps from one init; compare final losses")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate for --loss-steps")
    p.add_argument("--rewrite-attention", choices=("auto", "on", "off"), default="auto",
                   help="amp's attention-to-SDPA rewrite (auto: on for CUDA)")
    return p


def _resolve(argv: list[str]) -> Config:
    a = build_parser().parse_args(argv)
    check_counts(a, ("batch", "seq_len", "steps", "loss_steps"), ("rounds", "warmup"))
    if a.lr is not None and not a.lr > 0:
        raise BenchError(f"--lr must be > 0, got {a.lr}")
    device = resolve_device(a.device)
    asked = [k.strip() for k in a.variants.split(",") if k.strip()]
    unknown = sorted(set(asked) - set(KINDS))
    if unknown or not asked:
        raise BenchError(f"--variants {a.variants!r}: choose from {','.join(KINDS)}")
    kinds = tuple(k for k in KINDS if k in asked)
    if "half" in kinds and a.mode == "train":
        raise BenchError("the half variant is inference only (no master weights, no loss "
                         "scaling); use --mode infer or drop it from --variants")
    if a.loss_steps is not None and a.mode != "train":
        raise BenchError("--loss-steps trains the model: use it with --mode train")
    shape = DEFAULT_SHAPES.get((a.model, a.size, a.mode), {})
    batch = a.batch if a.batch is not None else shape.get("batch")
    seq_len = a.seq_len if a.seq_len is not None else shape.get("seq_len")
    out = a.out or os.path.join(
        "bench", "results",
        f"{a.model}-{a.mode}-{device.type}-{a.dtype}{'-compile' if a.compile else ''}.json")
    return Config(argv=list(argv), model=a.model, size=a.size, mode=a.mode, device=device,
                  dtype=DTYPES[a.dtype], dtype_name=a.dtype, batch=batch, seq_len=seq_len,
                  steps=a.steps, rounds=a.rounds, warmup=a.warmup, compile=a.compile,
                  kinds=kinds, out=out, loss_steps=a.loss_steps,
                  lr=a.lr if a.lr is not None else LEARNING_RATES.get(a.model, DEFAULT_LR),
                  rewrite_attention={"auto": None, "on": True, "off": False}[a.rewrite_attention])


# ----------------------------------------------------------------------------- the model


def _build(cfg: Config, *, with_targets: bool, seed: int = 0) -> tuple[nn.Module, tuple]:
    """A fresh fp32 reference model on the CPU (the master copy) and inputs on the device."""
    extra: dict[str, Any] = {}
    if cfg.seq_len is not None:
        extra["seq_len"] = cfg.seq_len
    try:
        model, inputs = build(cfg.model, cfg.size, batch=cfg.batch, seed=seed,
                              with_targets=with_targets, **extra)
    except (ValueError, TypeError) as e:  # e.g. seq_len beyond the model's block size
        raise BenchError(f"cannot build {cfg.model}/{cfg.size}: {e}") from None
    return model, tuple(t.to(cfg.device) for t in inputs)


# ----------------------------------------------------------------------------- the variants


def _low_inputs(inputs: tuple, dtype: torch.dtype) -> tuple:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def _fp32(model: nn.Module, inputs: tuple, cfg: Config, train: bool):
    return model, no_ctx, inputs, None


def _autocast(model: nn.Module, inputs: tuple, cfg: Config, train: bool):
    return model, autocast_ctx(cfg), inputs, None


def _amp(model: nn.Module, inputs: tuple, cfg: Config, train: bool):
    amp = amp_compiler.convert(model, inputs, dtype=cfg.dtype, training=train,
                               rewrite_attention=cfg.rewrite_attention)
    return amp, no_ctx, inputs, amp


def _half(model: nn.Module, inputs: tuple, cfg: Config, train: bool):
    return model.to(cfg.dtype), no_ctx, _low_inputs(inputs, cfg.dtype), None


# kind -> builder(fp32 copy, inputs, cfg, train) -> (module, context factory, inputs, AmpModule)
_MODULE_BUILDERS: dict[str, Callable[..., tuple]] = {
    "fp32": _fp32, "autocast": _autocast, "amp": _amp, "half": _half,
}


def _make_module(kind: str, master: nn.Module, inputs: tuple, cfg: Config, *, train: bool):
    """(module, ctx factory, inputs it takes, AmpModule or None) for one kind, from the master."""
    return _MODULE_BUILDERS[kind](copy_of(master, cfg, train=train), inputs, cfg, train)


def make_variant(kind: str, master: nn.Module, inputs: tuple, cfg: Config, *,
                 compiled: bool = False) -> Variant:
    """Build one variant: its own copy of the weights, its optimizer and scaler, its step."""
    t0 = time.perf_counter()
    module, ctx, own_inputs, amp = _make_module(kind, master, inputs, cfg, train=cfg.train)
    if compiled:
        module = torch.compile(module)
    name = f"{kind}+compile" if compiled else kind
    opt = scaler = note = None
    if cfg.train:
        opt = make_optimizer((module if amp is None else amp).parameters(), cfg)
        scaler, in_graph, note = loss_scaler(kind, amp, cfg)
        step = train_step(module, ctx, opt, scaler, in_graph)
    else:
        step = infer_step(module, ctx)

    def forward(inp, _module=module, _ctx=ctx):
        with _ctx():
            return _module(*inp)

    return Variant(name=name, kind=kind, compiled=compiled, module=module, forward=forward,
                   step=step, inputs=own_inputs, amp=amp, optimizer=opt, scaler=scaler,
                   scaler_note=note, setup_s=time.perf_counter() - t0)


def errors_vs_fp32(cfg: Config, master: nn.Module, logits_inputs: tuple,
                   variants: list[Variant]) -> None:
    """Fill ``error`` of every variant: eval mode, no_grad, logits, from the initial weights.

    The reference is a fresh fp32 copy of the master, which never trains. In inference mode
    the timed modules are eval modules already and inference leaves their weights as they were;
    in training mode each kind gets its own eval-mode copy of the master, dropped afterwards,
    and compiled variants are left out (they share their eager twin's plan).
    """
    def logits(kind: str) -> torch.Tensor:
        module, ctx, inp, _ = _make_module(kind, master, logits_inputs, cfg, train=False)
        with ctx():
            return module(*inp).float()

    def output(v: Variant) -> torch.Tensor | None:
        if not cfg.train:
            return v.forward(v.inputs).float()
        return None if v.compiled else logits(v.kind)

    with torch.no_grad():
        ref = logits("fp32")
        for v in variants:
            out = output(v)
            if out is None:
                continue
            record_error(v, out, ref)
            del out
