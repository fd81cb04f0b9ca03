"""What every bench suite shares: the request's pieces (the error a bad request raises, the parser
that raises it, the choices, the resolved request), the device (which one, its name, waiting for
it, fp32 without TF32), the statistics of a list of step times, the progress bar, and the output
(the console table of a torch run, strict JSON files).

The suites (``workloads*``, ``real*``, ``onnx_*``) import this module; it imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterator, Sequence

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)
from rich.table import Table

from amp_compiler.passes.dtypes import LOW_DTYPES

__all__ = ["BenchError", "Parser", "Request", "Config", "MODELS", "SIZES", "DTYPES",
           "SEQ_LEN_MODELS", "check_counts", "resolve_device", "device_name", "sync", "no_tf32",
           "installed_version", "summary", "ratio", "progress_bar", "tick", "fmt", "gb",
           "table_console", "print_tables", "write_json"]

# ----------------------------------------------------------------------------- choices

MODELS = ("mlp", "mlp_wide", "resnet", "gpt", "bert", "lstm", "mf")  # amp_compiler.models
SIZES = ("tiny", "small", "bench")
SEQ_LEN_MODELS = frozenset({"gpt", "bert", "lstm"})  # models whose inputs have a time axis
DTYPES = LOW_DTYPES  # --dtype: the low dtypes by name


# ----------------------------------------------------------------------------- the request


class BenchError(Exception):
    """A bad benchmark request (exit code 2): the message says what to change."""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: the command owns exit codes."""

    def error(self, message: str):  # type: ignore[override]
        raise BenchError(message)


@dataclass
class Request:
    """What a reference-model or ONNX run is asked, resolved and checked: the model, its low
    dtype, how long to time it and where to write the result."""

    argv: list[str]
    model: str
    size: str
    dtype: torch.dtype
    dtype_name: str
    seq_len: int | None
    steps: int
    rounds: int
    warmup: int
    out: str


@dataclass
class Config(Request):
    """A torch run (a reference-model workload, or one model and mode of the real-model suite):
    the request, the mode and device, and the variants it times."""

    mode: str
    device: torch.device
    batch: int | None
    compile: bool
    kinds: tuple[str, ...]
    loss_steps: int | None
    lr: float
    rewrite_attention: bool | None = None

    @property
    def train(self) -> bool:
        return self.mode == "train"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def check_counts(a: argparse.Namespace, positive: Sequence[str], non_negative: Sequence[str]) -> None:
    """The checks every bench suite shares: counts in range, --seq-len only where it applies
    (a suite without --seq-len has none to check)."""
    for name in positive:
        value = getattr(a, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in non_negative:
        if getattr(a, name) < 0:
            raise BenchError(f"--{name} must be >= 0, got {getattr(a, name)}")
    if getattr(a, "seq_len", None) is not None and a.model not in SEQ_LEN_MODELS:
        raise BenchError(f"--seq-len applies to {', '.join(sorted(SEQ_LEN_MODELS))}, "
                         f"not {a.model}")


# ----------------------------------------------------------------------------- the device


def resolve_device(choice: str) -> torch.device:
    """``--device auto|cuda|cpu`` as a device: auto is cuda when there is one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but CUDA is not available; use --device cpu")
    return torch.device("cuda" if choice == "auto" and torch.cuda.is_available()
                        else ("cpu" if choice == "auto" else choice))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's as the platform says it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU): what a timer around GPU work needs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 that is fp32: an error reference must not round its matmuls/convs to TF32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def installed_version(dist: str) -> str | None:
    """The version of an installed distribution (``transformers``, ``nvidia-modelopt``), read
    from its metadata without importing it; None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- statistics


def summary(times: Sequence[float]) -> dict[str, Any] | None:
    """Median, inter-quartile range and the rest of a list of step times (None: none timed)."""
    if not times:
        return None
    if len(times) >= 2:
        q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = med = q3 = times[0]
    return {"median": med, "iqr": q3 - q1, "q1": q1, "q3": q3, "min": min(times),
            "mean": statistics.fmean(times), "samples": len(times)}


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either is missing (or ``b`` is zero)."""
    return a / b if a is not None and b else None


# ----------------------------------------------------------------------------- progress


def progress_bar() -> Progress:
    """The bar on stderr that a suite advances between timing windows."""
    # no auto-refresh: its thread would take the GIL in the middle of timed steps; the bar is
    # redrawn by tick() between timing windows instead
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, auto_refresh=False)


def tick(progress, task, description: str | None = None, advance: int = 0) -> None:
    """Say what runs next and/or advance the bar, and redraw it now."""
    if description is not None:
        progress.update(task, description=description)
    if advance:
        progress.advance(task, advance)
    progress.refresh()


# ----------------------------------------------------------------------------- output


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def gb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GB" if b >= 2**30 else f"{b / 2**20:.1f} MB"


def table_console() -> Console:
    """The console the tables print to: the terminal's, or 160 columns wide in a log file or a
    pipe (don't squeeze columns to 80)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_tables(result: dict[str, Any], console=None) -> None:
    """A torch run's result as rich tables (timing/memory/error/casts, then the loss run if any)."""
    if console is None:
        console = table_console()
    b = result["batch"]
    shape = f"{b['batch']}x{b['seq_len']}" if b["seq_len"] else str(b["batch"])
    t = Table(title=f"{result['model']} ({result['size']}) {result['mode']}, batch {shape}, "
                    f"{result['dtype']} on {result['device_name']}, torch {result['torch']}",
              caption="/ac: ratio to autocast (compiled variants: to compiled autocast); "
                      "state: memory kept between steps; casts: per forward")
    for col in ("variant", "ms/step", "IQR", "time/ac", "peak mem", "mem/ac", "state",
                "max rel err", "err/ac", "casts"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for name, v in result["variants"].items():
        r = result["ratios"][name]
        tm = v["time_ms"] or {}
        err = "non-finite" if v["error_nonfinite"] else fmt(v["max_rel_error"], ".2e")
        t.add_row(name, fmt(tm.get("median"), ".3f"), fmt(tm.get("iqr"), ".3f"),
                  fmt(r["time_vs_autocast"], ".2f", "x"), gb(v["peak_memory_bytes"]),
                  fmt(r["peak_memory_vs_autocast"], ".2f", "x"), gb(v["state_memory_bytes"]),
                  err, fmt(r["error_vs_autocast"], ".2f", "x"),
                  "-" if v["casts"] is None else str(v["casts"]))
    console.print(t)
    loss = result.get("loss")
    if loss:
        lt = Table(title=f"loss after {loss['steps']} steps (mean of last {loss['tail']}), "
                         f"lr {loss['lr']}: {loss['data']}")
        for col in ("variant", "first loss", "final loss", "vs fp32", "NaN", "scaler"):
            lt.add_column(col, justify="left" if col in ("variant", "scaler") else "right")
        for name, r in loss["variants"].items():
            lt.add_row(name, fmt(r["first_loss"], ".4f"), fmt(r["final_loss"], ".4f"),
                       fmt(r["ratio_to_fp32"], ".4f"),
                       f"yes ({r['nonfinite_steps']} steps)" if r["nan"] else "no",
                       r["scaler"] or "-")
        console.print(lt)


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: such a float becomes null (the flags beside it say why)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(result: dict[str, Any], path: str) -> None:
    """Write ``result`` to ``path`` as strict JSON, creating the folders."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(result), f, indent=2, allow_nan=False)
        f.write("\n")
