"""``amp-compiler demo``: the main job, end to end, on built-in models and data (no downloads).

Three steps, each printed as it runs and each independent (a missing optional component prints
"skipped: <why>" and the demo goes on):

1. convert the reference ``gpt`` decoder (CUDA fp16 when a GPU is there, else CPU bf16) and
   compare its output with fp32 and with ``torch.autocast`` on the same input, casts included;
2. train the 784-128-10 ``mlp`` on scikit-learn's digits in fp16 with dynamic loss scaling,
   beside fp32 from the same initial weights on the same batches, and compare test accuracy;
3. export the converted gpt to ONNX (fp16) and run it in ONNX Runtime against fp32.

    >>> figures = run_demo(quick=True)
    >>> figures["mlp"]["accuracy_fp16"] - figures["mlp"]["accuracy_fp32"]   # percentage points
    0.0

The measures are ``amp_compiler.passes.metrics``' (``rel_error``, ``count_casts``);
``compare_outputs`` is shared with the CLI.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from amp_compiler.passes.metrics import count_casts, onnx_cast_count, rel_error

__all__ = ["run_demo", "compare_outputs", "DEMO_SETTINGS"]

# What each mode runs. quick: the CPU test budget (well under a minute on 2 cores);
# full: still under two minutes on a 2-core CPU.
DEMO_SETTINGS: dict[bool, dict[str, Any]] = {
    True: {"gpt_size": "tiny", "epochs": 4, "batch": 64, "lr": 0.05},
    False: {"gpt_size": "small", "epochs": 10, "batch": 32, "lr": 0.02},
}


def compare_outputs(model, amp, inputs: tuple, dtype: torch.dtype) -> dict[str, Any]:
    """amp_compiler and ``torch.autocast`` against fp32, on the same input, same weights.

    ``model`` must be in eval mode. Returns relative errors and casts per forward of both;
    where autocast cannot run on this machine (``reference.ReferenceUnavailable``), its figures
    are None and ``autocast_unavailable`` says why.
    """
    from amp_compiler.reference import ReferenceUnavailable, autocast_run

    device_type = next((t.device.type for t in inputs if isinstance(t, torch.Tensor)), "cpu")
    with torch.no_grad():
        ref = model(*inputs)
        out = amp(*inputs)
        amp_casts = count_casts(lambda: amp(*inputs))
        numbers = {"error_amp": rel_error(out, ref), "casts_amp": amp_casts,
                   "error_autocast": None, "casts_autocast": None, "autocast_unavailable": None}
        try:
            auto = autocast_run(lambda: model(*inputs), device_type, dtype)
            # a fresh autocast region: its weight-cast cache lives as long as the region does
            auto_casts = autocast_run(lambda: count_casts(lambda: model(*inputs)), device_type, dtype)
        except ReferenceUnavailable as exc:
            numbers["autocast_unavailable"] = str(exc)
            return numbers
    numbers.update(error_autocast=rel_error(auto, ref), casts_autocast=auto_casts)
    return numbers


# -- the steps -----------------------------------------------------------------------------------

def _fmt(x: float | None) -> str:
    if x is None:
        return "unavailable"
    return f"{x:.2e}" if isinstance(x, float) and math.isfinite(x) else str(x)


def _gpt_step(ctx: dict, console: Console) -> dict:
    import amp_compiler as ac
    from amp_compiler.models import build

    device, size = ctx["device"], ctx["settings"]["gpt_size"]
    dtype = torch.float16 if device == "cuda" else torch.bfloat16  # CPU fp16 kernels are slow
    model, inputs = build("gpt", size, device=device)
    model.eval()
    t0 = time.perf_counter()
    amp = ac.convert(model, inputs, dtype=dtype)
    convert_s = time.perf_counter() - t0
    numbers = compare_outputs(model, amp, inputs, dtype)
    ctx.update(gpt=model, gpt_inputs=inputs, gpt_amp=amp, gpt_dtype=dtype)

    plan = amp.plan
    kinds: dict[str, Counter] = {}
    for name, d in plan.items():
        if d.category in ("input", "param", "const", "output") or d.precision is None:
            continue
        key = "low" if d.precision == dtype else "fp32"
        kinds.setdefault(key, Counter())[d.kind] += 1
    table = Table(title=f"gpt ({size}, input {tuple(inputs[0].shape)}) on {device}, "
                        f"{str(dtype).replace('torch.', '')}", show_header=True)
    table.add_column("")
    table.add_column("amp_compiler", justify="right")
    table.add_column("torch.autocast", justify="right")
    table.add_row("max relative error vs fp32", _fmt(numbers["error_amp"]),
                  _fmt(numbers["error_autocast"]))
    table.add_row("casts per forward", str(numbers["casts_amp"]), _fmt(numbers["casts_autocast"]))
    console.print(table)
    if numbers["autocast_unavailable"]:
        console.print(f"  {escape(numbers['autocast_unavailable'])}")
    low_name = str(dtype).replace("torch.", "")
    for key, label in (("low", low_name), ("fp32", "float32")):
        items = ", ".join(f"{k} ×{n}" for k, n in kinds.get(key, Counter()).most_common())
        console.print(f"  [bold]{label}[/]: {items or '-'}")
    fp32_why = {d.rule for d in plan.values() if d.precision == torch.float32
                and d.category not in ("input", "param", "const", "output")}
    console.print(f"  plan: {sum(kinds.get('low', Counter()).values())} nodes {low_name}, "
                  f"{sum(kinds.get('fp32', Counter()).values())} fp32 (rules: "
                  f"{', '.join(sorted(fp32_why))}); convert took {convert_s:.1f} s; "
                  f"`amp.report()` says why for each node")
    return {"size": size, "dtype": low_name, "convert_s": round(convert_s, 2),
            "nodes_low": sum(kinds.get("low", Counter()).values()),
            "nodes_fp32": sum(kinds.get("fp32", Counter()).values()), **numbers}


def _mlp_step(ctx: dict, console: Console) -> dict:
    import amp_compiler as ac
    from amp_compiler.models import build
    from amp_compiler.models.data import digits
    from amp_compiler.scaler import LossScaler

    device, s = ctx["device"], ctx["settings"]
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits())
    fp32_model, _ = build("mlp", "tiny", seed=0, device=device)
    fp16_model, _ = build("mlp", "tiny", seed=0, device=device)  # same seed: same weights
    fp32_model.train()
    fp16_model.train()
    amp = ac.convert(fp16_model, (x_train[: s["batch"]],), dtype="float16", training=True)
    scaler = amp.scaler if amp.scaler is not None else LossScaler(device)
    opt32 = torch.optim.SGD(fp32_model.parameters(), lr=s["lr"], momentum=0.9)
    opt16 = torch.optim.SGD(fp16_model.parameters(), lr=s["lr"], momentum=0.9)  # fp32 masters

    g = torch.Generator().manual_seed(1)
    per_epoch = len(x_train) // s["batch"]
    skipped, losses = 0, {"fp32": 0.0, "fp16": 0.0}
    t0 = time.perf_counter()
    with Progress(TextColumn("  [progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False) as progress:
        task = progress.add_task("mlp on digits, fp32 | fp16", total=s["epochs"] * per_epoch, info="")
        for epoch in range(s["epochs"]):
            perm = torch.randperm(len(x_train), generator=g).to(device)
            for i in range(per_epoch):
                idx = perm[i * s["batch"]:(i + 1) * s["batch"]]
                xb, yb = x_train[idx], y_train[idx]
                loss32 = F.cross_entropy(fp32_model(xb), yb)
                loss32.backward()
                opt32.step()
                opt32.zero_grad(set_to_none=True)

                loss16 = F.cross_entropy(amp(xb), yb)
                scale = scaler.get_scale()
                scaler.scale(loss16).backward()
                scaler.step(opt16)
                scaler.update()
                skipped += scaler.get_scale() < scale  # the scale halves exactly on a skipped step
                opt16.zero_grad(set_to_none=True)
                losses = {"fp32": loss32.item(), "fp16": loss16.item()}
                progress.update(task, advance=1, info=f"loss {losses['fp32']:.3f} | {losses['fp16']:.3f}")
    train_s = time.perf_counter() - t0

    fp32_model.eval()
    amp.eval()
    with torch.no_grad():
        acc32 = 100.0 * (fp32_model(x_test).argmax(-1) == y_test).float().mean().item()
        acc16 = 100.0 * (amp(x_test).argmax(-1) == y_test).float().mean().item()
    table = Table(title=f"mlp 784-128-10 on digits ({s['epochs']} epochs, batch {s['batch']}, "
                        f"{len(x_test)} test images)")
    for col in ("", "fp32", "fp16 + loss scaling"):
        table.add_column(col, justify="right")
    table.add_row("test accuracy %", f"{acc32:.2f}", f"{acc16:.2f}")
    table.add_row("last batch loss", f"{losses['fp32']:.4f}", f"{losses['fp16']:.4f}")
    table.add_row("loss scale (final) / skipped steps", "-", f"{scaler.get_scale():g} / {skipped}")
    console.print(table)
    return {"epochs": s["epochs"], "steps": s["epochs"] * per_epoch, "accuracy_fp32": acc32,
            "accuracy_fp16": acc16, "loss_fp32": losses["fp32"], "loss_fp16": losses["fp16"],
            "final_scale": scaler.get_scale(), "skipped_steps": int(skipped),
            "train_s": round(train_s, 2)}


def _onnx_step(ctx: dict, console: Console) -> dict:
    from amp_compiler.onnx.export import export_onnx  # ImportError: skipped
    from amp_compiler.onnx.session import onnx_session, verify_onnx
    import onnx

    import amp_compiler as ac

    if "gpt" not in ctx:
        raise ImportError("the gpt step did not run, so there is nothing to export")
    model, inputs = ctx["gpt"], ctx["gpt_inputs"]
    # ONNX Runtime's CPU provider has fp16 kernels (or inserts fp32 fallbacks) but not bf16 ones:
    # the file is fp16 whatever the demo computed in
    amp = ctx["gpt_amp"] if ctx["gpt_dtype"] == torch.float16 else ac.convert(model, inputs, dtype="float16")
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # torch's exporter warns about optional torchvision ops
    try:
        with tempfile.TemporaryDirectory(prefix="amp-demo-") as tmp:
            path = Path(tmp) / "gpt.onnx"
            t0 = time.perf_counter()
            export_onnx(amp, inputs, str(path))
            export_s = time.perf_counter() - t0
            session = onnx_session(str(path))
            vs_fp32 = verify_onnx(str(path), model, inputs, session=session)
            vs_amp = verify_onnx(str(path), amp, inputs, session=session)
            size_kb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1024
            casts = onnx_cast_count(onnx.load(str(path), load_external_data=False))
    finally:
        exporter_log.setLevel(level)
    console.print(f"  gpt.onnx (float16): {size_kb:.0f} KB, {casts} Cast nodes, exported in "
                  f"{export_s:.1f} s")
    console.print(f"  ONNX Runtime ({vs_fp32['provider']}) max relative error vs fp32: "
                  f"{_fmt(vs_fp32['max_rel'])}; vs amp_compiler in torch: {_fmt(vs_amp['max_rel'])}")
    return {"error_vs_fp32": vs_fp32["max_rel"], "error_vs_torch_amp": vs_amp["max_rel"],
            "cast_nodes": casts, "size_kb": round(size_kb, 1), "provider": vs_fp32["provider"],
            "export_s": round(export_s, 2)}


_STEPS: tuple[tuple[str, str, Callable[[dict, Console], dict]], ...] = (
    ("gpt", "1. convert the gpt decoder, compare with fp32 and torch.autocast", _gpt_step),
    ("mlp", "2. train an mlp on digits in fp16 with dynamic loss scaling, beside fp32", _mlp_step),
    ("onnx", "3. export the gpt to ONNX and run it in ONNX Runtime", _onnx_step),
)


def run_demo(quick: bool = False, console: Console | None = None) -> dict:
    """Run the demo; print as it goes; return the figures, one dict per step.

    A step whose optional component is missing returns ``{"skipped": why}``; a step that fails
    returns ``{"failed": message}`` (the demo goes on).

    Example:
        >>> figures = run_demo(quick=True)
        >>> figures["gpt"]["error_amp"] <= 1.1 * figures["gpt"]["error_autocast"]
        True
    """
    console = console or Console()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx: dict[str, Any] = {"device": device, "settings": DEMO_SETTINGS[bool(quick)]}
    figures: dict[str, Any] = {"device": device, "quick": bool(quick)}
    t0 = time.perf_counter()
    console.rule(f"amp_compiler demo ({'quick, ' if quick else ''}{device})")
    for key, title, step in _STEPS:
        console.print(f"\n[bold]{title}[/]")
        try:
            figures[key] = step(ctx, console)
        except ImportError as e:
            figures[key] = {"skipped": str(e)}
            console.print(f"  [yellow]skipped:[/] {e}")
        except Exception as e:  # noqa: BLE001 - one broken step must not hide the others' figures
            message = " ".join(f"{type(e).__name__}: {e}".split())
            figures[key] = {"failed": message}
            console.print(f"  [red]failed:[/] {message}")
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    console.print(f"\ndone in {figures['total_s']:.0f} s")
    return figures
