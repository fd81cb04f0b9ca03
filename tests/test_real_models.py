"""Models nobody here wrote: Hugging Face ``transformers`` BERT, GPT-2, T5, Llama and ViT built
from small configs, torchvision's resnet50, mobilenet_v3_small, efficientnet_b0, vit_b_16,
convnext_tiny and swin_t, and timm families (ViT, ConvNeXt, RegNet), all with random weights
(nothing is downloaded), converted with example inputs.

For each model and low dtype: conversion succeeds; the forward error against fp32 is within
1.1x torch.autocast's on the same input (the project's target); one training-mode backward
reaches the user's fp32 parameters with finite gradients close to fp32's; the user's model is
unchanged; the inference conversion exports to ONNX, and ONNX Runtime opens and runs the file in
a child process without crashing (``amp_compiler.onnx.check``; a CPU EP that refuses bfloat16
MatMuls is fine, a signal is not). Marked ``slow`` (deselected by default):

    pytest -m slow tests/test_real_models.py
    python tests/test_real_models.py --jobs 8   # measures every model whose library is installed
                                                # and rewrites docs/real_models.md

A model whose library is not installed is skipped with the ``pip install`` that enables it
(torchvision and timm pin torch versions, so they are absent beside some torch builds).
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
import amp_compiler as ac  # noqa: E402
from conftest import assert_unchanged, rel_err, snapshot  # noqa: E402

pytestmark = pytest.mark.slow

DTYPES = (torch.float16, torch.bfloat16)
SEQ, BATCH, VOCAB = 16, 2, 128


class Main(nn.Module):
    """Calls a Hugging Face model with keyword inputs and returns its main tensor output."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], output: str) -> None:
        super().__init__()
        self.model, self.names, self.output = model, names, output

    # explicit parameters, not *args: convert()'s torch.export front end builds one dynamic-shape
    # spec per input, which does not match a variadic signature (see test_bad_input.py)
    def forward(self, first, second=None):
        args = (first, second)[:len(self.names)]
        return getattr(self.model(**dict(zip(self.names, args)), return_dict=True), self.output)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


# model -> the library that provides it
LIBRARY = {"bert": "transformers", "gpt2": "transformers", "t5": "transformers",
           "llama": "transformers", "vit": "transformers",
           "resnet50": "torchvision", "mobilenet_v3_small": "torchvision",
           "efficientnet_b0": "torchvision", "vit_b_16": "torchvision",
           "convnext_tiny": "torchvision", "swin_t": "torchvision",
           "timm_vit_tiny_patch16_224": "timm", "timm_convnext_atto": "timm",
           "timm_regnetx_002": "timm"}
# input side of the image models: the smallest their architecture accepts (ViTs: 224, fixed
# position embeddings; swin: windows of 7 after 4x4 patches and three 2x merges)
IMAGE_SIZE = {"vit_b_16": 224, "timm_vit_tiny_patch16_224": 224, "swin_t": 224}


def library(name: str):
    """The model's library, or a pytest skip naming the install that enables it."""
    import importlib

    lib = LIBRARY[name]
    try:
        return importlib.import_module(lib)
    except ImportError:
        pytest.skip(f"{name} needs `pip install {lib}` (no weights are downloaded)")


def build(name: str) -> tuple[nn.Module, tuple]:
    """(model, example inputs); the library's default attention implementation; dropout off so
    train and eval forwards agree (the tests that need it say so in their names)."""
    lib = library(name)
    torch.manual_seed(0)
    if LIBRARY[name] != "transformers":
        size = IMAGE_SIZE.get(name, 64)
        x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(7))
        if LIBRARY[name] == "torchvision":
            model = getattr(lib.models, name)(weights=None)
        else:
            model = lib.create_model(name.removeprefix("timm_"), pretrained=False)
        return _as_if_trained(model, x), (x,)
    T = lib
    if name == "bert":
        cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, SEQ // 2:] = 0
        return Main(T.BertModel(cfg), ("input_ids", "attention_mask"), "last_hidden_state"), (_ids(1), mask)
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        return Main(T.GPT2LMHeadModel(cfg), ("input_ids",), "logits"), (_ids(2),)
    if name == "t5":
        cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                         dropout_rate=0.0, use_cache=False, decoder_start_token_id=0)
        return Main(T.T5ForConditionalGeneration(cfg), ("input_ids", "decoder_input_ids"),
                    "logits"), (_ids(3), _ids(4))
    if name == "llama":
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                            use_cache=False)
        return Main(T.LlamaForCausalLM(cfg), ("input_ids",), "logits"), (_ids(5),)
    if name == "vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
        x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(6))
        return Main(T.ViTModel(cfg, add_pooling_layer=False), ("pixel_values",),
                    "last_hidden_state"), (x,)
    raise KeyError(name)


MODELS = tuple(LIBRARY)


def _as_if_trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random weights, but the state a trained model is in where it matters to the comparison:
    no dropout / stochastic depth (train and eval forwards, fp32 and low precision, see the same
    network), no all-zero weight (torchvision's ViT zero-initialises its head, whose output
    would be 0 for any input), and BatchNorm running statistics of real activations (fresh
    statistics, mean 0 / variance 1, let random deep CNNs' activations vanish or explode)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            for attr in ("p", "drop_prob"):  # Dropout, StochasticDepth / timm DropPath
                if isinstance(getattr(m, attr, None), float):
                    setattr(m, attr, 0.0)
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives this batch's statistics
        # statistics of a batch of 16 images like the input: one image's 2 x 2 last feature map
        # would leave near-zero variances that make eval-mode outputs ill-conditioned
        model.train()(torch.randn((16, *x.shape[1:]), generator=g))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return model.eval()


@dataclass
class Row:
    model: str
    dtype: str
    converted: str = "no"
    error: float | None = None
    autocast: float | None = None
    low_pct: float | None = None
    casts: int | None = None
    backward: str = "-"
    grad_error: float | None = None
    autocast_grad_error: float | None = None
    onnx: str = "-"
    unchanged: bool | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def measure(name: str, dtype: torch.dtype, *, onnx: bool = True) -> Row:
    """Every figure of one table row; failures are recorded, not raised."""
    row = Row(name, str(dtype).replace("torch.", ""))
    t0 = time.perf_counter()
    model, inputs = build(name)
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    # autocast with grad enabled: under no_grad nn.MultiheadAttention takes a fused fast path
    # (_native_multi_head_attention, its own rounding) that no captured graph contains; with
    # grad enabled autocast runs the ops the converted graph runs (vit_b_16 fp16: 1.26e-3 fast
    # path, 1.49e-3 ops, ours 1.49e-3)
    with torch.autocast("cpu", dtype=dtype):
        row.autocast = rel_err(model(*inputs).detach(), ref)
    snap = snapshot(model)
    try:
        amp = ac.convert(model, inputs, dtype=dtype)
        # grad enabled, as autocast's run above: CPU SDPA picks its kernel by grad mode (T5
        # bf16: 4.8e-3 with grad, 6.9e-3 under no_grad, for autocast and us alike)
        out = amp(*inputs).detach()
        row.error = rel_err(out, ref)
        row.converted = "yes" if out.dtype == ref.dtype and out.shape == ref.shape else f"dtype {out.dtype}"
        counts = amp.plan.counts()
        row.low_pct = 100.0 * counts["low"] / max(counts["low"] + counts["fp32"], 1)
        row.casts = amp.cast_count()
    except Exception as exc:  # noqa: BLE001 -- failures are data
        row.notes.append(f"convert: {_short(exc)}")
        amp = None
    row.unchanged = _unchanged(model, snap)

    # one backward in training mode, against fp32's gradients on the same parameters
    try:
        model.train()
        model.zero_grad()
        model(*inputs).float().pow(2).mean().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            out = model(*inputs)
        out.float().pow(2).mean().backward()
        theirs = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        row.autocast_grad_error = _grad_error(theirs, ref_grads)
        model.zero_grad()
        tamp = ac.convert(model, inputs, dtype=dtype, training=True, loss_scale=None)
        tamp(*inputs).float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        finite = all(torch.isfinite(g).all() for g in grads.values())
        row.grad_error = _grad_error(grads, ref_grads)
        missing = sorted(set(ref_grads) - set(grads))
        row.backward = "ok" if finite and not missing else ("non-finite" if not finite else f"{len(missing)} grads missing")
    except Exception as exc:  # noqa: BLE001
        row.backward = "failed"
        row.notes.append(f"backward: {_short(exc)}")
    finally:
        model.zero_grad()
        model.eval()

    if onnx and amp is not None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                from amp_compiler.onnx.check import probe_onnx

                path = ac.export_onnx(amp, inputs, os.path.join(tmp, f"{name}.onnx"))
                died = [r for r in probe_onnx(path, inputs) if r.died]
                row.onnx = "ok" if not died else f"ONNX Runtime {died[0].signal or died[0].status}"
                row.notes.extend(f"onnx: {r}" for r in died)
            except Exception as exc:  # noqa: BLE001
                row.onnx = "failed"
                row.notes.append(f"onnx: {_short(exc)}")
    row.seconds = time.perf_counter() - t0
    return row


def _grad_error(grads: dict, ref: dict) -> float | None:
    """All gradients as one vector: per-parameter ratios blow up on parameters whose fp32
    gradient is ~0 (masked positions, unused embedding rows)."""
    common = [n for n in ref if n in grads]
    if not common:
        return None
    return rel_err(torch.cat([grads[n].flatten() for n in common]),
                   torch.cat([ref[n].flatten() for n in common]))


def _unchanged(model: nn.Module, snap: dict) -> bool:
    try:
        assert_unchanged(model, snap)
        return True
    except AssertionError:
        return False


_ROWS: dict[tuple[str, torch.dtype], Row] = {}


def row_for(name: str, dtype: torch.dtype) -> Row:
    if (name, dtype) not in _ROWS:
        _ROWS[name, dtype] = measure(name, dtype)
    return _ROWS[name, dtype]


# measured on the H200 host (torch 2.11, torchvision 0.26): 8.27e-3 against autocast's 7.46e-3,
# 1.11x; fp16 is at 0.67x. keep_fp32=("avg_pool",) brings it to 7.37e-3 (autocast: 7.36e-3 at
# 16 threads): pooling in fp32 recovers the gap, but the pool's input is bf16 in our plan
# (making avg_pool an fp32_acc kind changed nothing), so the gap is made upstream; not found.
_SWIN_BF16 = pytest.mark.xfail(strict=True, reason=(
    "swin_t bfloat16: forward error 1.11x autocast's (target 1.1x), cause not found (see above)"))


@pytest.mark.parametrize("name, dtype", [
    pytest.param(n, d, marks=_SWIN_BF16 if (n, d) == ("swin_t", torch.bfloat16) else ())
    for n in MODELS for d in DTYPES])
def test_converts_within_autocast_error(name, dtype):
    row = row_for(name, dtype)
    assert row.converted == "yes", row.notes
    assert row.unchanged
    assert row.error <= 1.1 * row.autocast + 1e-6, f"{row.error:.3e} vs autocast {row.autocast:.3e}"
    assert row.low_pct > 0


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_backward_matches_fp32_dropout_off(name, dtype):
    """Dropout is off here (``build``/``_as_if_trained``: one backward compared with fp32's
    needs the same network in both); tests/test_hf_models.py trains with dropout on."""
    row = row_for(name, dtype)
    assert row.backward == "ok", row.notes
    assert row.grad_error is not None
    # no design target for gradients; 1.5x: torchvision's convnext_tiny in bf16 is at 1.33x
    # (autocast promotes its residual stream to fp32 through the fp32 layer-scale parameter;
    # our plan casts parameters per use and keeps the stream bf16; keep_fp32=("mul",) matches)
    assert row.grad_error <= 1.5 * row.autocast_grad_error + 1e-3, (
        f"gradient error {row.grad_error:.3e} vs autocast's {row.autocast_grad_error:.3e}")


# ViT's bf16 patch-embedding Conv has no tensor(bfloat16) in ONNX before opset 22: export_onnx's
# legaliser computes it in float32 (tests/test_onnx_export.py checks the structure)
# T5 with its default SDPA attention: re-tracing the converted graph for ONNX fails on a
# `view` of the transposed SDPA output ("Cannot view a tensor with shape [s, 16, 2, 16] and
# strides (512, 16, 256, 1)"): the capture recorded T5's reshape as a view under the fp32
# kernel's output layout. Turning views into reshapes in the hygiene pass did not fix it; open.
_T5_ONNX = pytest.mark.xfail(strict=True, reason="T5 + SDPA: ONNX re-trace fails on a captured view (see above)")


@pytest.mark.parametrize("name", [pytest.param(n, marks=_T5_ONNX if n == "t5" else ()) for n in MODELS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_onnx_export(name, dtype):
    row = row_for(name, dtype)
    assert row.onnx == "ok", row.notes


def _fmt(x, spec=".2e") -> str:
    return "-" if x is None else format(x, spec)


def _versions() -> str:
    import importlib

    found = []
    for lib in dict.fromkeys(LIBRARY.values()):
        try:
            found.append(f"{lib} {importlib.import_module(lib).__version__}")
        except ImportError:
            found.append(f"{lib} not installed")
    return ", ".join(found)


def write_table(rows: list[Row], path: str, *, machine: str) -> None:
    lines = [
        "# Models nobody here wrote",
        "",
        f"Produced by `python tests/test_real_models.py --jobs N` on {datetime.date.today()} "
        f"(torch {torch.__version__}, "
        f"{_versions()}; CPU of {machine}). Hugging Face models are built from small configs (2 "
        f"layers, hidden 32, default attention, dropout 0), batch {BATCH} x {SEQ} tokens (ViT: "
        f"{BATCH} x 3 x 32 x 32); torchvision and timm models are the library's own architectures "
        f"at full size, batch {BATCH}, images 64 x 64 (ViTs and swin_t: 224 x 224). Random weights "
        "throughout; converted with example inputs (torch.export front end).",
        "",
        "Errors are max|out - fp32| / max|fp32| on the model's main output; autocast is "
        "`torch.autocast('cpu', dtype)` on the same input, with grad enabled (under no_grad "
        "nn.MultiheadAttention takes a fused fast path no captured graph contains). Low % = low-precision compute nodes / "
        "(low + fp32). Backward: one training-mode conversion, `mean(out**2).backward()`, the "
        "relative error of all parameter gradients taken as one vector, against fp32's, ours / "
        "autocast's. The same figures are asserted by "
        "`pytest -m slow tests/test_real_models.py`.",
        "",
        "| model | library | dtype | converted | error vs fp32 | autocast error | low % | casts | backward (grad err ours / autocast) | ONNX | time s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.model} | {LIBRARY[r.model]} | {r.dtype} | {r.converted} | {_fmt(r.error)} | "
                     f"{_fmt(r.autocast)} | {_fmt(r.low_pct, '.0f')} | {_fmt(r.casts, 'd')} | "
                     f"{r.backward} ({_fmt(r.grad_error)} / {_fmt(r.autocast_grad_error)}) | {r.onnx} | {r.seconds:.1f} |")
    notes = [(r, n) for r in rows for n in r.notes] + [(r, "model modified by convert()") for r in rows
                                                         if r.unchanged is False]
    if notes:
        lines += ["", "## Failures", ""]
        lines += [f"- {r.model} / {r.dtype}: `{n}`" for r, n in notes]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _measure_job(job: tuple[str, str, int]) -> Row:
    name, dtype, threads = job
    torch.set_num_threads(threads)
    d = getattr(torch, dtype)
    try:
        row = measure(name, d)
    except BaseException as exc:  # noqa: BLE001 -- pytest.skip (library missing) or a build failure
        traceback.print_exc()
        row = Row(name, dtype, notes=[f"build: {_short(exc)}"])
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    import argparse
    import importlib.util
    import platform
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    p = argparse.ArgumentParser(description="Measure the real-model table (docs/real_models.md).")
    p.add_argument("models", nargs="*", help="default: every model whose library is installed")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (threads split evenly)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "..", "docs", "real_models.md"))
    a = p.parse_args(argv)
    names = a.models or [n for n in MODELS if importlib.util.find_spec(LIBRARY[n]) is not None]
    jobs = [(n, str(d).replace("torch.", ""), max(1, (os.cpu_count() or 1) // a.jobs))
            for n in names for d in DTYPES]
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(_measure_job, jobs))
    else:
        rows = [_measure_job(j) for j in jobs]
    machine = torch.cuda.get_device_name() + " host" if torch.cuda.is_available() else platform.machine()
    write_table(rows, a.out, machine=machine)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
