"""The ``amp-compiler bench --suite real`` request: its parser, the resolved ``SuiteConfig``, the
variants it names (each kind eager, compiled in each ``--compile-mode``, replayed from CUDA
graphs) and the JSON file each model and mode is written to.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from amp_compiler.bench.common import (DTYPES, BenchError, Config, Parser, check_counts,
                                       resolve_device)
from amp_compiler.bench.real_models import PROMPT, SPECS, Spec

__all__ = ["build_parser", "SuiteConfig", "out_path", "variant_name", "variant_specs",
           "compile_mode_of", "KINDS", "MODES", "LR"]

# timed kinds in display order (fp32 only if asked), each with a "+compile" twin under --compile
KINDS = ("fp32", "autocast", "amp")
MODES = ("train", "infer")
# Timing does not depend on the learning rate, but a large one can make float16 training
# overflow, and a skipped step (GradScaler found inf) is faster than a real one.
LR = 1e-4


def build_parser(prog: str = "amp-compiler bench --suite real") -> argparse.ArgumentParser:
    """The ``bench --suite real`` argument parser."""
    p = Parser(prog=prog, description="The real-model suite: torch.autocast vs "
               "amp_compiler on HF GPT-2, Llama, BERT, T5, ViT and torchvision ResNet-50 "
               "/ ConvNeXt-T, side by side: time, peak memory, error vs fp32, casts per "
               "forward.")
    p.add_argument("--suite", choices=("real",), default="real")
    p.add_argument("--models", default=",".join(SPECS), help="comma-separated subset of "
                   f"{','.join(SPECS)} (default: all)")
    p.add_argument("--modes", default=",".join(MODES), help="train, infer or both")
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps per variant per round (default 10)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds (default 3; 0: no timing)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per variant and batch shape (default 3; compiled "
                   "variants compile in the first)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also time torch.compile'd autocast and amp (files get -compile)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (the tests use eager: no kernels generated)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. reduce-overhead (CUDA graphs); a comma list "
                   "(default,reduce-overhead) times each, as +compile and +compile:<mode>")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="inference: also time each kind replayed from CUDA graphs "
                   "(amp_compiler.cuda_graphs; autocast inside the graph, its cast cache off), "
                   "as +cudagraphs")
    p.add_argument("--infer-batches", default="1,train",
                   help="inference batch sizes, comma-separated: a number (text models at "
                   f"{PROMPT} tokens, images at their side) or 'train' (the training batch "
                   "and length); default 1,train")
    p.add_argument("--variants", default="autocast,amp",
                   help="timed kinds, subset of fp32,autocast,amp (fp32 is always the error "
                   "reference)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="auto: each model's own (see the module docstring)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--tiny", action="store_true",
                   help="small configurations (2 layers, hidden 32, 2 x 16 tokens, 32 x 32 "
                   "images): a smoke test, not a benchmark")
    p.add_argument("--out", default=os.path.join("bench", "results"),
                   help="folder of the JSON files (default bench/results)")
    return p


@dataclass
class SuiteConfig:
    """The resolved ``--suite real`` request."""

    argv: list[str]
    models: tuple[str, ...]
    modes: tuple[str, ...]
    steps: int
    rounds: int
    warmup: int
    compile: bool
    compile_backend: str
    compile_mode: str | None
    kinds: tuple[str, ...]
    dtype: str | None                  # None: each model's own
    device: torch.device
    tiny: bool
    out: str
    cuda_graphs: bool = False
    infer_batches: tuple[int | str, ...] = (1, "train")

    def bench_config(self, spec: Spec, mode: str) -> Config:
        """The torch run's ``Config`` of one model and mode, for the shared helpers."""
        dtype = self.dtype or spec.dtype
        return Config(argv=self.argv, model=spec.name, size="tiny" if self.tiny else "full",
                      mode=mode, device=self.device, dtype=DTYPES[dtype],
                      dtype_name=dtype, batch=None, seq_len=None, steps=self.steps,
                      rounds=self.rounds, warmup=self.warmup, compile=self.compile,
                      kinds=self.kinds, out=self.out, loss_steps=None, lr=LR)


def _subset(value: str, choices: tuple[str, ...] | list[str], option: str) -> tuple[str, ...]:
    asked = [v.strip() for v in value.split(",") if v.strip()]
    if not asked or set(asked) - set(choices):
        raise BenchError(f"{option} {value!r}: choose from {','.join(choices)}")
    return tuple(c for c in choices if c in asked)


def _batches(value: str) -> tuple[int | str, ...]:
    out: list[int | str] = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        if item != "train" and not (item.isdigit() and int(item) >= 1):
            raise BenchError(f"--infer-batches {value!r}: each entry a batch size >= 1 or 'train'")
        out.append(item if item == "train" else int(item))
    if not out:
        raise BenchError("--infer-batches: give at least one batch size")
    return tuple(dict.fromkeys(out))


def _resolve(argv: list[str]) -> SuiteConfig:
    a = build_parser().parse_args(argv)
    check_counts(a, ("steps",), ("rounds", "warmup"))
    return SuiteConfig(argv=list(argv), models=_subset(a.models, list(SPECS), "--models"),
                       modes=_subset(a.modes, MODES, "--modes"), steps=a.steps,
                       rounds=a.rounds, warmup=a.warmup, compile=a.compile,
                       compile_backend=a.compile_backend, compile_mode=a.compile_mode,
                       kinds=_subset(a.variants, KINDS, "--variants"),
                       cuda_graphs=a.cuda_graphs, infer_batches=_batches(a.infer_batches),
                       dtype=None if a.dtype == "auto" else a.dtype,
                       device=resolve_device(a.device), tiny=a.tiny, out=a.out)


# ----------------------------------------------------------------------------- variants


def variant_name(kind: str, runtime: str) -> str:
    return f"{kind}+{runtime}" if runtime else kind


def _compile_modes(suite: SuiteConfig) -> list[str | None]:
    if not suite.compile_mode:
        return [None]
    return [m.strip() for m in suite.compile_mode.split(",") if m.strip()] or [None]


def _runtimes(suite: SuiteConfig, mode: str) -> list[str]:
    """How each kind runs: ``""`` eager, ``"compile"`` (the one ``--compile-mode``, or
    default of a list), ``"compile:<mode>"`` (the others of a list), ``"cudagraphs"``."""
    out = [""]
    if suite.compile:
        modes = _compile_modes(suite)
        out += (["compile"] if len(modes) == 1 else
                ["compile" if m in (None, "default") else f"compile:{m}" for m in modes])
    if suite.cuda_graphs and mode == "infer":
        out.append("cudagraphs")
    return out


def compile_mode_of(suite: SuiteConfig, runtime: str) -> str | None:
    """The torch.compile mode of a ``compile`` runtime."""
    if runtime.startswith("compile:"):
        return runtime.split(":", 1)[1]
    modes = _compile_modes(suite)
    return modes[0] if len(modes) == 1 else None


def variant_specs(suite: SuiteConfig, mode: str) -> list[tuple[str, str]]:
    """(kind, runtime) of every variant of ``mode``, in display order; fp32 (the reference
    the others are measured against) eager only."""
    return [(k, r) for r in _runtimes(suite, mode) for k in suite.kinds if k != "fp32" or not r]


def out_path(suite: SuiteConfig, spec: Spec, mode: str) -> str:
    """Where one model's mode is written: ``real-<model>-<mode>-<dtype>[-compile[-<compile
    modes>]][-cudagraphs][-b<batches>][-tiny].json`` (cudagraphs and batches: inference only,
    batches where not the default 1,train)."""
    modes = "-".join(m or "default" for m in _compile_modes(suite)) if suite.compile_mode else ""
    compiled = f"-compile-{modes}" if modes else "-compile"
    infer = mode == "infer"
    batches = ("-b" + "-".join(str(b) for b in suite.infer_batches)
               if infer and suite.infer_batches != (1, "train") else "")
    return os.path.join(suite.out, f"real-{spec.name}-{mode}-{suite.dtype or spec.dtype}"
                                   f"{compiled if suite.compile else ''}"
                                   f"{'-cudagraphs' if suite.cuda_graphs and infer else ''}"
                                   f"{batches}{'-tiny' if suite.tiny else ''}.json")
