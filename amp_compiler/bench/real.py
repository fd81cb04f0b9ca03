"""``amp-compiler bench --suite real``: torch.autocast and amp_compiler on the models users bring.

The real-model suite of the design's targets: seven models nobody here wrote, built from their
libraries' default configurations with random weights (nothing is downloaded), with the default
attention implementation and dropout, trained on the library's own loss with labels:

- ``gpt2``: ``GPT2LMHeadModel(GPT2Config())``, 124M (12 x 768); float16, 8 x 1024 tokens.
- ``llama``: ``LlamaForCausalLM``, hidden 1024, 12 layers, 16 heads, intermediate 2816, vocab
  32000: 220M, 66M of it the untied embedding and head; bfloat16, 8 x 1024.
- ``bert``: ``BertForSequenceClassification(BertConfig())``, BERT-base, 109M; float16, 32 x 128.
- ``t5``: ``T5ForConditionalGeneration(T5Config(decoder_start_token_id=0))``, t5-small's values
  (d_model 512, 6 + 6 layers, 8 heads, d_ff 2048, vocab 32128), 61M; bfloat16, 16 x 512 tokens
  in, 128 labels. bfloat16 because T5 overflows float16: its own code clamps infinities only when
  the residual stream is float16, which under autocast it is not, while the feed-forward's
  float16 matmul outputs still overflow; T5 was pretrained in bfloat16 (on TPUs).
- ``vit``: ``ViTForImageClassification(ViTConfig())``, ViT-B/16, 86M; float16, 64 x 224 x 224.
- ``resnet50``: ``torchvision.models.resnet50(weights=None)`` and cross entropy, 26M; float16,
  128 x 224 x 224.
- ``convnext_tiny``: ``torchvision.models.convnext_tiny(weights=None)`` and cross entropy, 29M;
  float16, 128 x 224 x 224 (the design's CNN batch).

Per model and mode (``--modes train,infer``) one JSON file,
``<out>/real-<model>-<mode>-<dtype>[-compile[-<compile mode>]][-tiny].json``, written as soon
as that mode is done (a suite stopped half way keeps what it finished). Inference is timed at
batch 1 (64 tokens, or one image) and at the training batch; training at the training batch.
Everything else is ``amp-compiler bench``'s, reused from ``amp_compiler.bench.suite``: variants built
from copies of one fp32 master and timed interleaved in one process (median and IQR per step),
the steady-state peak memory of each variant's own window, the error ``max|out - ref| /
max|ref|`` of the eval forward's logits against fp32 (TF32 off), casts per forward, ratios to
autocast (compiled variants: to compiled autocast). A training step is
``loss = model(**batch).loss`` (torchvision: ``F.cross_entropy(model(x), labels)`` in a
wrapper), ``backward()``, fused AdamW (CUDA) and for float16 the loss scaler:
``torch.amp.GradScaler`` for autocast, ``amp.scaler`` for amp_compiler (driven by its graph
where the loss_scaling pass scales the loss gradient, like GradScaler otherwise). amp_compiler
is ``amp = convert(copy, example_kwargs=batch, dtype=..., training=...)`` called as
``amp(**batch)``; ``--compile`` adds ``torch.compile(amp)`` and ``torch.compile(model)`` called
under autocast, both with ``dynamic=False``.

A variant that fails anywhere (convert, forward, backward, optimizer step, OOM) is recorded with
its stage and exception text and the suite goes on; a model whose library is missing is
recorded as skipped with the ``pip install`` that enables it.

    $ amp-compiler bench --suite real                          # all seven models, eager
    $ amp-compiler bench --suite real --models gpt2,bert --modes train --compile
    $ amp-compiler bench --suite real --tiny --device cpu --steps 2 --rounds 1   # smoke test
    $ python -m amp_compiler.bench.table bench/results/real-*.json   # the README table
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import os
import shlex
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from amp_compiler.bench import suite as bench
from amp_compiler.bench.suite import BenchError, Variant

__all__ = ["main", "build_parser", "run", "print_results", "out_path", "batch_shapes",
           "make_batch", "output_field", "failure", "SPECS", "Spec", "SuiteConfig", "WithLoss"]

# ----------------------------------------------------------------------------- the models

# timed kinds in display order (fp32 only if asked), each with a "+compile" twin under --compile
KINDS = ("fp32", "autocast", "amp")
MODES = ("train", "infer")
PROMPT = 64                  # tokens of the batch-1 inference run (the design's GPT latency case)
# Timing does not depend on the learning rate, but a large one can make float16 training
# overflow, and a skipped step (GradScaler found inf) is faster than a real one.
LR = 1e-4
# --tiny: every model small enough for a CPU test (2 layers, hidden 32, 2 x 16 tokens, 32 x 32
# images); the architecture, the loss and the call path stay the real ones.
TINY_BATCH, TINY_SEQ, TINY_IMAGE = 2, 16, 32
TINY_TEXT = {"vocab_size": 128}
MESSAGE_CHARS = 2000         # of an exception message kept in the JSON (dynamo's run long)


@dataclass(frozen=True)
class Spec:
    """One model of the suite: how to build it and how to feed it."""

    name: str
    library: str                       # the import that provides it; missing: skipped
    task: str                          # "causal_lm" | "classify" | "seq2seq" | "image"
    dtype: str                         # the suite's low dtype for it (--dtype overrides)
    batch: int                         # training batch of the full configuration
    length: int                        # tokens per sequence, or the image side
    build: Callable[[bool], nn.Module]  # tiny -> a fresh fp32 model with random weights
    config: str                        # the configuration in words, for the JSON

    @property
    def text(self) -> bool:
        return self.task != "image"


def _hf(model_class: str, config_class: str, full: dict, tiny: dict) -> Callable[[bool], nn.Module]:
    def build(is_tiny: bool) -> nn.Module:
        import transformers

        config = getattr(transformers, config_class)(**(tiny if is_tiny else full))
        return getattr(transformers, model_class)(config)
    return build


class WithLoss(nn.Module):
    """A torchvision classifier with the loss Hugging Face models compute themselves, so that
    every model of the suite is called alike, ``model(**batch)``: the cross entropy when
    ``labels`` are given, the logits otherwise."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model, self.num_classes = model, num_classes

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.model(pixel_values)
        return logits if labels is None else F.cross_entropy(logits, labels)


def _resnet50(is_tiny: bool) -> nn.Module:
    import torchvision
    from torchvision.models.resnet import Bottleneck, ResNet

    if is_tiny:  # one bottleneck per stage, narrow: the same blocks, batch norm and head
        return WithLoss(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16), 10)
    return WithLoss(torchvision.models.resnet50(weights=None), 1000)


def _convnext_tiny(is_tiny: bool) -> nn.Module:
    import torchvision
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    if is_tiny:  # two stages of one block, stochastic depth as convnext_tiny sets it
        blocks = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
        return WithLoss(ConvNeXt(blocks, stochastic_depth_prob=0.1, num_classes=10), 10)
    return WithLoss(torchvision.models.convnext_tiny(weights=None), 1000)


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("gpt2", "transformers", "causal_lm", "float16", 8, 1024,
         _hf("GPT2LMHeadModel", "GPT2Config", {},
             {**TINY_TEXT, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
              "bos_token_id": 0, "eos_token_id": 0}),
         "GPT2LMHeadModel(GPT2Config()): 124M, 12 layers x 768, vocab 50257"),
    Spec("llama", "transformers", "causal_lm", "bfloat16", 8, 1024,
         _hf("LlamaForCausalLM", "LlamaConfig",
             {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16,
              "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 32000},
             {**TINY_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}),
         "LlamaForCausalLM(LlamaConfig(hidden_size=1024, num_hidden_layers=12, "
         "num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816, "
         "vocab_size=32000)): 220M (66M of it the untied embedding and head)"),
    Spec("bert", "transformers", "classify", "float16", 32, 128,
         _hf("BertForSequenceClassification", "BertConfig", {},
             {**TINY_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64}),
         "BertForSequenceClassification(BertConfig()): BERT-base, 109M, 2 labels"),
    Spec("t5", "transformers", "seq2seq", "bfloat16", 16, 512,
         # decoder_start_token_id: t5-small's value (the pad token), which T5Config() lacks
         # and the model needs to shift labels into decoder inputs
         _hf("T5ForConditionalGeneration", "T5Config", {"decoder_start_token_id": 0},
             {**TINY_TEXT, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2,
              "num_heads": 2, "decoder_start_token_id": 0}),
         "T5ForConditionalGeneration(T5Config(decoder_start_token_id=0)): t5-small's values "
         "(d_model 512, 6 + 6 layers, 8 heads, d_ff 2048, vocab 32128), 61M; labels of a "
         "quarter of the input length; bfloat16 because T5 overflows float16, under autocast "
         "too"),
    Spec("vit", "transformers", "image", "float16", 64, 224,
         _hf("ViTForImageClassification", "ViTConfig", {},
             {"image_size": TINY_IMAGE, "patch_size": 8, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}),
         "ViTForImageClassification(ViTConfig()): ViT-B/16 at 224 x 224, 86M, 2 labels"),
    Spec("resnet50", "torchvision", "image", "float16", 128, 224, _resnet50,
         "torchvision.models.resnet50(weights=None), 26M, cross entropy on 1000 classes"),
    Spec("convnext_tiny", "torchvision", "image", "float16", 128, 224, _convnext_tiny,
         "torchvision.models.convnext_tiny(weights=None) (stochastic depth 0.1), 29M, cross "
         "entropy on 1000 classes"),
)}


def batch_shapes(spec: Spec, mode: str, tiny: bool,
                 infer_batches: tuple[int | str, ...] = (1, "train")) -> list[tuple[int, int]]:
    """(batch, tokens or image side) of each timed run of ``mode``: the training batch; for
    inference each of ``infer_batches`` in order (a number: that many 64-token prompts or
    images; ``"train"``: the training batch)."""
    if tiny:
        train = (TINY_BATCH, TINY_SEQ if spec.text else TINY_IMAGE)
    else:
        train = (spec.batch, spec.length)
    if mode == "train":
        return [train]
    length = min(PROMPT, train[1]) if spec.text else train[1]
    return list(dict.fromkeys(train if b == "train" else (b, length) for b in infer_batches))


def _classes(model: nn.Module) -> int:
    return model.num_classes if isinstance(model, WithLoss) else model.config.num_labels


def make_batch(spec: Spec, model: nn.Module, batch: int, length: int, *, labels: bool,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """The keyword inputs of one step, on the CPU. With the same seed, the batch without labels
    (the eval forward's) holds the same tokens or pixels as the one with them.

    Example:
        >>> make_batch(SPECS["bert"], model, 2, 16, labels=True).keys()
        dict_keys(['input_ids', 'labels'])
    """
    g = torch.Generator().manual_seed(seed)
    if spec.task == "image":
        out = {"pixel_values": torch.randn(batch, 3, length, length, generator=g)}
        if labels:
            out["labels"] = torch.randint(0, _classes(model), (batch,), generator=g)
        return out
    vocab = model.config.vocab_size
    out = {"input_ids": torch.randint(0, vocab, (batch, length), generator=g)}
    if spec.task == "causal_lm" and labels:
        out["labels"] = out["input_ids"].clone()  # the model shifts them itself
    elif spec.task == "classify" and labels:
        out["labels"] = torch.randint(0, _classes(model), (batch,), generator=g)
    elif spec.task == "seq2seq":
        # with labels the model builds its decoder inputs from them; without, it needs them
        target = torch.randint(0, vocab, (batch, max(1, length // 4)), generator=g)
        out["labels" if labels else "decoder_input_ids"] = target
    return out


def output_field(out: Any, name: str) -> torch.Tensor:
    """``out.loss`` / ``out.logits`` of a library output (a ModelOutput or dict), or ``out``
    itself where the model returns one tensor (``WithLoss``: the loss with labels, else the
    logits). A tuple (``return_dict=False``) starts with the loss when there is one."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return out[name]
    return out[0]


# ----------------------------------------------------------------------------- amp_compiler


def _convert(model: nn.Module, batch: dict, dtype: torch.dtype, train: bool):
    """The user's call: keyword inputs, so that ``amp(**batch)`` returns the library's output."""
    import amp_compiler

    return amp_compiler.convert(model, example_kwargs=batch, dtype=dtype, training=train)


def _caller(module: Callable) -> Callable[[dict], Any]:
    """batch -> output, as Trainer and Accelerate call a model."""
    return lambda b: module(**b)


# ----------------------------------------------------------------------------- request


def build_parser(prog: str = "amp-compiler bench --suite real") -> argparse.ArgumentParser:
    """The ``bench --suite real`` argument parser."""
    p = bench._Parser(prog=prog, description="The real-model suite: torch.autocast vs "
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
    p.add_argument("--dtype", choices=("auto", *bench.DTYPES), default="auto",
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

    def bench_config(self, spec: Spec, mode: str) -> bench.Config:
        """The ``amp_compiler.bench.suite`` Config of one model and mode, for its helpers."""
        dtype = self.dtype or spec.dtype
        return bench.Config(argv=self.argv, model=spec.name, size="tiny" if self.tiny else "full",
                            mode=mode, device=self.device, dtype=bench.DTYPES[dtype],
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
    for name, low in (("steps", 1), ("rounds", 0), ("warmup", 0)):
        if getattr(a, name) < low:
            raise BenchError(f"--{name} must be >= {low}, got {getattr(a, name)}")
    return SuiteConfig(argv=list(argv), models=_subset(a.models, list(SPECS), "--models"),
                       modes=_subset(a.modes, MODES, "--modes"), steps=a.steps,
                       rounds=a.rounds, warmup=a.warmup, compile=a.compile,
                       compile_backend=a.compile_backend, compile_mode=a.compile_mode,
                       kinds=_subset(a.variants, KINDS, "--variants"),
                       cuda_graphs=a.cuda_graphs, infer_batches=_batches(a.infer_batches),
                       dtype=None if a.dtype == "auto" else a.dtype,
                       device=bench.resolve_device(a.device), tiny=a.tiny, out=a.out)


# ----------------------------------------------------------------------------- failures


def failure(stage: str, exc: BaseException) -> dict[str, Any]:
    """An exception as data: where it happened (stage, innermost frame) and what it said."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = (f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}"
             if frames else None)
    return {"stage": stage, "exception": type(exc).__name__,
            "message": str(exc)[:MESSAGE_CHARS], "where": where}


def _free(cfg: bench.Config) -> None:
    """After a failure (often an OOM): drop its garbage and give the cached blocks back."""
    gc.collect()
    if cfg.cuda:
        try:
            torch.cuda.synchronize(cfg.device)
            torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error: what follows fails too, and is recorded
            pass


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """fp32 that is fp32: the error reference must not round its matmuls/convs to TF32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------- variants


def _name(kind: str, runtime: str) -> str:
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


def _mode_of(suite: SuiteConfig, runtime: str) -> str | None:
    """The torch.compile mode of a ``compile`` runtime."""
    if runtime.startswith("compile:"):
        return runtime.split(":", 1)[1]
    modes = _compile_modes(suite)
    return modes[0] if len(modes) == 1 else None


def _in_cuda_graphs(module: nn.Module, kind: str, cfg: bench.Config):
    """``amp_compiler.cuda_graphs`` of the module; for autocast, of a call that enters autocast
    itself with its cast cache off: under CUDA graphs autocast is part of what is recorded, and
    the cache cannot serve a replay (the runner switches it off while capturing either way)."""
    import amp_compiler

    if kind != "autocast":
        return amp_compiler.cuda_graphs(module)

    def autocast_call(*args, **kwargs):
        with torch.autocast(cfg.device.type, dtype=cfg.dtype, cache_enabled=False):
            return module(*args, **kwargs)
    return amp_compiler.cuda_graphs(autocast_call)


def _build(kind: str, runtime: str, cfg: bench.Config, suite: SuiteConfig, master: nn.Module,
           example: dict, stage: list[str]) -> Variant:
    """One variant: its own copy of the master (converted for amp, wrapped by torch.compile or
    CUDA graphs if asked), its optimizer and loss scaler, and step closures that keep
    ``stage`` current."""
    compiled = runtime.startswith("compile")
    t0 = time.perf_counter()
    stage[0] = "copy"
    module = bench._copy(master, cfg, train=cfg.train)
    ctx = bench._autocast_ctx(cfg) if kind == "autocast" else bench._no_ctx
    amp = None
    if kind == "amp":
        stage[0] = "convert"
        # the fp32 copy is not kept: an inference conversion holds folded low-precision
        # weights only, as it would for a user who converts and drops the original
        module = amp = _convert(module, example, cfg.dtype, cfg.train)
    if compiled:
        stage[0] = "compile"
        # dynamic=False: inference runs two batch shapes; each gets its own static graph,
        # for autocast and amp alike, instead of one generic dynamic-shape graph
        module = torch.compile(module, backend=suite.compile_backend,
                               mode=_mode_of(suite, runtime), dynamic=False)
    if runtime == "cudagraphs":
        module = _in_cuda_graphs(module, kind, cfg)
        ctx = bench._no_ctx  # autocast is inside the graph's call
    call = _caller(module)
    opt = scaler = note = None
    if cfg.train:
        opt = bench._optimizer((amp if amp is not None else module).parameters(), cfg)
        scaler, in_graph, note = bench.loss_scaler(kind, amp, cfg)
        opt.register_step_pre_hook(lambda *_: stage.__setitem__(0, "step"))

        def loss_of(batch):
            stage[0] = "forward"
            loss = output_field(call(batch), "loss")
            stage[0] = "backward"
            return loss
        step = bench._train_step(loss_of, ctx, opt, scaler, in_graph)
    else:
        step = bench._infer_step(call, ctx)

    def forward(inp, _ctx=ctx):
        with _ctx():
            return call(inp[0])

    stage[0] = "forward"
    return Variant(name=_name(kind, runtime), kind=kind, compiled=compiled, module=module,
                   forward=forward, step=step, inputs=(example,), amp=amp, optimizer=opt,
                   scaler=scaler, scaler_note=note, setup_s=time.perf_counter() - t0)


def _attempt(fn: Callable[[], Any], failures: dict[str, dict], name: str, stage: list[str],
             cfg: bench.Config) -> bool:
    """Run ``fn``; if it raises, record the failure under ``name`` with the stage it was in
    (``stage[0]`` then) and free what it left."""
    try:
        fn()
        return True
    except Exception as e:  # noqa: BLE001 - a failing variant is data; the suite goes on
        where = stage[0] + (" (compiled)" if "+compile" in name else "")
        failures[name] = failure(where, e)
    _free(cfg)  # after the except block: its traceback no longer holds the tensors
    return False


# ----------------------------------------------------------------------------- one model


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

    def logits(self, kind: str, inputs: dict, cfg: bench.Config) -> torch.Tensor:
        """The eval forward's logits of ``kind`` from the untrained master's weights."""
        if self.reference is None:
            self.reference = bench._copy(self.master, cfg, train=False)
        if kind != "amp":
            with bench._autocast_ctx(cfg)() if kind == "autocast" else _no_tf32():
                return output_field(self.reference(**inputs), "logits").float()
        if self.eval_amp is None and self.eval_amp_failure is None:
            try:
                self.eval_amp = _caller(_convert(bench._copy(self.master, cfg, train=False),
                                                 inputs, cfg.dtype, False))
            except Exception as e:  # noqa: BLE001 - said in the row's error_note
                self.eval_amp_failure = failure("convert", e)
        if self.eval_amp is None:
            f = self.eval_amp_failure
            raise RuntimeError(f"the eval conversion failed in {f['stage']}: "
                               f"{f['exception']}: {f['message']}")
        return output_field(self.eval_amp(inputs), "logits").float()


def _variant_specs(suite: SuiteConfig, mode: str) -> list[tuple[str, str]]:
    """(kind, runtime) of every variant of ``mode``, in display order; fp32 (the reference
    the others are measured against) eager only."""
    return [(k, r) for r in _runtimes(suite, mode) for k in suite.kinds if k != "fp32" or not r]


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
    bench._prime(cfg)
    example = max(runs, key=lambda r: (r.batch * r.length, r.batch))
    for kind, runtime in _variant_specs(suite, mode):
        name = _name(kind, runtime)
        bench._tick(progress, task, f"{spec.name} {mode}: building {name}")
        bench._settle(cfg)
        before = bench._allocated(cfg)
        stage, made = ["copy"], []

        def make():
            # converted at the largest shape (a batch-1 example could be specialised by
            # torch.export), warmed up at the first shape; kept only once it has run
            v = _build(kind, runtime, cfg, suite, run.master, example.inputs, stage)
            v.inputs = (runs[0].inputs,)
            _warm(v, suite.warmup)
            made.append(v)

        if _attempt(make, failed, name, stage, cfg):
            v = made.pop()
            bench._settle(cfg)
            # what the variant keeps between steps: weights, folded copies, optimizer state
            v.state_bytes = bench._allocated(cfg) - before if cfg.cuda else None
            built[name] = (v, stage)
            if mode == "infer" and name == "amp":
                # the eval conversion the training mode's errors need: this one, not a second
                run.eval_amp = lambda inputs, _v=v: _v.forward((inputs,))
            del v
        bench._tick(progress, task, advance=1)
    if mode == "infer" and "amp" in failed and run.eval_amp is None:
        run.eval_amp_failure = failed["amp"]
    results = [_run_shape(run, cfg, shape, i == 0, built, failed, progress, task)
               for i, shape in enumerate(runs)]
    built.clear()
    bench._settle(cfg)
    if suite.compile:
        torch._dynamo.reset()  # the next mode's modules must not count against its cache limit
    return results


def _run_shape(run: _ModelRun, cfg: bench.Config, shape: _Shape, first: bool,
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
        if _attempt(lambda: _warm(v, suite.warmup), failures, name, stage, cfg):
            variants.append(v)
    bench._tick(progress, task, f"{what}: errors vs fp32, casts")
    notes = _errors(run, cfg, shape, variants)
    for v in list(variants):
        if not _attempt(lambda: bench._casts(v), failures, v.name, ["forward (casts)"], cfg):
            variants.remove(v)
    for r in range(suite.rounds):
        k = r % len(variants) if variants else 0
        # rotate the order so that no variant always runs right after the same neighbour
        for v in variants[k:] + variants[:k]:
            bench._tick(progress, task, f"{what}, round {r + 1}/{suite.rounds}: {v.name}")
            if not _attempt(lambda: bench._timed_window(v, cfg), failures, v.name,
                            built[v.name][1], cfg):
                variants.remove(v)
            bench._tick(progress, task, advance=1)
    return _shape_json(run, shape, variants, failures, notes, cfg.mode)


def _errors(run: _ModelRun, cfg: bench.Config, shape: _Shape,
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
            if torch.isfinite(out).all():
                v.error = bench.rel_error(out, ref)
            else:
                v.error_nonfinite = True
            del out
    return notes


def _shape_json(run: _ModelRun, shape: _Shape, variants: list[Variant],
                failures: dict[str, dict], notes: dict[str, str], mode: str) -> dict[str, Any]:
    alive = {v.name: v for v in variants}
    # a failed variant keeps its row, with nothing measured and the failure said
    rows_of = [alive.get(_name(k, r)) or Variant(_name(k, r), k, r.startswith("compile"), None,
                                                 None, None, ())
               for k, r in _variant_specs(run.suite, mode)]
    rows = {}
    for v in rows_of:
        rows[v.name] = {**bench._variant_json(v), "failure": failures.get(v.name),
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
        "ratios": bench._ratios(rows_of),
    }


def _run_model(spec: Spec, suite: SuiteConfig, modes: list[str], progress,
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
            _free(suite.bench_config(spec, mode))
        yield mode, _result(suite, spec, mode, run.master, ran or [],
                            status="ok" if failed is None else "failed", failed=failed)


def _result(suite: SuiteConfig, spec: Spec, mode: str, master: nn.Module | None,
            runs: list[dict], *, status: str, reason: str | None = None,
            failed: dict | None = None) -> dict[str, Any]:
    import amp_compiler

    cfg = suite.bench_config(spec, mode)
    argv = suite.argv if "--suite" in suite.argv else ["--suite", "real", *suite.argv]
    inner = master.model if isinstance(master, WithLoss) else master
    if failed is not None and reason is None:
        reason = f"failed in {failed['stage']}: {failed['exception']}: {_first_line(failed)}"
    return {
        "command": shlex.join(["amp-compiler", "bench", *argv]),
        "argv": argv,
        "suite": "real",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "libraries": {lib: bench.installed_version(lib) for lib in ("transformers", "torchvision")},
        "amp_compiler": amp_compiler.__version__,
        "device": cfg.device.type,
        "device_name": bench._device_name(cfg),
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
                     "variants": [_name(k, r) for k, r in _variant_specs(suite, mode)],
                     "optimizer": ("AdamW(fused)" if cfg.cuda else "AdamW(foreach)")
                     if mode == "train" else None,
                     "lr": LR if mode == "train" else None,
                     "error_reference": "fp32 eval forward of the untrained weights, TF32 off"},
        "runs": runs,
    }


def _first_line(f: dict) -> str:
    lines = f["message"].strip().splitlines()
    return lines[0] if lines else ""


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


# ----------------------------------------------------------------------------- the suite


def run(suite: SuiteConfig) -> list[tuple[str, dict[str, Any]]]:
    """Run the suite, writing each model's modes as they finish; returns (path, result) of
    every file written."""
    specs = [SPECS[m] for m in suite.models]
    # inference first: its amp eval conversion is also the training mode's error reference
    modes = [m for m in ("infer", "train") if m in suite.modes]
    units = {(s.name, m): len(_variant_specs(suite, m))
             * (1 + len(batch_shapes(s, m, suite.tiny, suite.infer_batches)) * suite.rounds)
             for s in specs for m in modes}
    written = []
    done = 0
    with bench._progress() as progress:
        task = progress.add_task("starting", total=sum(units.values()))
        for spec in specs:
            for mode, result in _run_model(spec, suite, modes, progress, task):
                path = out_path(suite, spec, mode)
                bench.write_json(result, path)
                written.append((path, result))
                # failed variants skip their windows: keep the bar true to what is left
                done += units[spec.name, mode]
                progress.update(task, completed=done)
                bench._tick(progress, task, f"wrote {path}")
    return written


def print_results(written: list[tuple[str, dict[str, Any]]], console=None) -> None:
    """``amp-compiler bench``'s tables, one per model, mode and batch shape, each followed by
    the failures and missing errors of its variants."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: don't squeeze columns to 80
            console = Console(width=160)
    for path, r in written:
        if r["status"] != "ok":
            console.print(f"{r['model']} {r['mode']}: {r['status']}: {r['reason']}", markup=False)
        for shape in r["runs"]:
            bench.print_tables({**r, "size": r["config"], "batch": shape["batch"],
                                "variants": shape["variants"], "ratios": shape["ratios"],
                                "loss": None}, console)
            for name, v in shape["variants"].items():
                if v["failure"]:
                    f = v["failure"]
                    console.print(f"  {name}: failed in {f['stage']}: {f['exception']}: "
                                  f"{_first_line(f)}", markup=False)
                if v["error_note"]:
                    console.print(f"  {name}: no error vs fp32: {v['error_note'].splitlines()[0]}",
                                  markup=False)
        console.print(f"wrote {path}", markup=False)


def main(argv: list[str] | None = None) -> int:
    """``amp-compiler bench --suite real``: runs the suite, prints its tables, returns 0 (the
    failures of models and variants are in the files). A bad request raises ``BenchError``,
    which ``amp_compiler.bench.suite.main`` (the command) turns into exit code 2.

    Example (every model at its tiny configuration, on the CPU)::

        main(["--suite", "real", "--tiny", "--device", "cpu", "--steps", "2", "--rounds", "1",
              "--out", "out/real-tiny"])
    """
    print_results(run(_resolve(list(sys.argv[1:] if argv is None else argv))))
    return 0


if __name__ == "__main__":
    sys.exit(bench.main(["--suite", "real", *sys.argv[1:]]))
