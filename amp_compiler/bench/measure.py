"""What is measured on a variant, by every torch suite alike: time per step (CUDA events, or
``time.perf_counter`` on the CPU) in windows without garbage collection, the steady-state peak
memory of the variant's own window, casts per forward; then its JSON row and its ratios.

Memory (CUDA only): the bytes the variant keeps between steps (weights, folded copies, optimizer
and scaler state) are the growth of ``memory_allocated`` while it was built and warmed up; the
steady-state peak of a step is that state plus the largest rise of ``max_memory_allocated`` above
the window's start, reset for every variant's window, so the other variants' idle state never
counts (once-per-process allocations such as cuBLAS workspaces are made before the first window).
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from amp_compiler.bench.common import Config, ratio, summary, sync
from amp_compiler.bench.variants import Variant
from amp_compiler.passes.metrics import rel_error

__all__ = ["count_to_copy", "settle", "prime", "allocated", "time_steps", "timed_window",
           "record_error", "measure_casts", "ratios", "variant_json"]


def count_to_copy(fn: Callable[[], Any]) -> int:
    """Number of ``aten::_to_copy`` events (real dtype casts) while ``fn()`` runs.

    Zero-dimensional sources are left out: those are Python scalars that an op such as
    ``x * 0.5`` wraps into a tensor, in every variant alike, not casts of the model's data.

    Example:
        >>> count_to_copy(lambda: torch.ones(3).half())
        1
    """
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::_to_copy"
               and not (e.input_shapes and e.input_shapes[0] == []))


def settle(cfg: Config) -> None:
    """Free what is garbage and wait for the device, so ``memory_allocated`` is exact.
    (CPU memory is not measured, and a full collection there costs ~0.4 s for nothing.)"""
    if cfg.cuda:
        gc.collect()
        sync(cfg.device)


def prime(cfg: Config) -> None:
    """Make the once-per-process CUDA allocations before the first memory window opens.

    cuBLAS keeps a workspace (32 MiB on Hopper) per handle and stream, and handles are per
    thread: the first matmul of the forward thread and the first of autograd's backward thread
    each allocate one. Left alone, they land in whichever variant is built first (~65 MB on an
    H200, measured), so one linear forward and backward in fp32 and the low dtype goes first.
    """
    if not cfg.cuda:
        return
    lin = nn.Linear(64, 64, device=cfg.device)
    x = torch.randn(64, 64, device=cfg.device, requires_grad=True)
    for low in (False, True):
        with torch.autocast(cfg.device.type, dtype=cfg.dtype, enabled=low):
            y = lin(x) @ x.t()
        y.float().sum().backward()
    del lin, x, y
    settle(cfg)


def allocated(cfg: Config) -> int:
    """``memory_allocated`` of the device (0 on the CPU, where memory is not measured)."""
    return torch.cuda.memory_allocated(cfg.device) if cfg.cuda else 0


def time_steps(v: Variant, n: int, cfg: Config) -> list[float]:
    """Run ``n`` steps back to back; milliseconds of each. The loop itself adds one event
    record per step on CUDA and nothing that waits for the device."""
    step, inputs = v.step, v.inputs
    # as timeit does: a cyclic collection landing inside one step is noise, not the variant
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _time_steps(step, inputs, n, cfg)
    finally:
        if gc_was_enabled:
            gc.enable()


def _time_steps(step, inputs, n: int, cfg: Config) -> list[float]:
    if cfg.cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            step(inputs)
            events[i + 1].record()
        torch.cuda.synchronize(cfg.device)
        return [events[i].elapsed_time(events[i + 1]) for i in range(n)]
    stamps = [time.perf_counter()]
    for _ in range(n):
        step(inputs)
        stamps.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def timed_window(v: Variant, cfg: Config) -> None:
    """One variant's slice of a round: its steps, and on CUDA its own peak-memory window."""
    if cfg.cuda:
        torch.cuda.synchronize(cfg.device)
        torch.cuda.reset_peak_memory_stats(cfg.device)
        base = torch.cuda.memory_allocated(cfg.device)
    v.times_ms.extend(time_steps(v, cfg.steps, cfg))
    if cfg.cuda:
        peak = torch.cuda.max_memory_allocated(cfg.device) - base + (v.state_bytes or 0)
        v.peak_bytes = max(v.peak_bytes or 0, peak)


def record_error(v: Variant, out: torch.Tensor, ref: torch.Tensor) -> None:
    """The variant's error against the fp32 reference output, or the flag that its output is not
    finite (then no error is computed)."""
    if torch.isfinite(out).all():
        v.error = rel_error(out, ref)
    else:
        v.error_nonfinite = True


def measure_casts(v: Variant) -> None:
    """Casts per forward: the graph's own count for amp, profiled ``_to_copy`` for all eager."""
    if v.compiled:
        # inductor fuses casts into its kernels: there is no per-op cast to count
        return
    grad = torch.enable_grad() if v.optimizer is not None else torch.no_grad()
    with grad:
        v.profiled_to_copy = count_to_copy(lambda: v.forward(v.inputs))
    v.casts = v.amp.cast_count() if v.amp is not None else v.profiled_to_copy


def ratios(variants: list[Variant]) -> dict[str, dict[str, Any]]:
    """Each variant against autocast and fp32 run the same way (``amp+compile`` against
    ``autocast+compile``: the part of the name after the kind), and against eager autocast and
    eager fp32."""
    by_name = {v.name: v for v in variants}

    def median(v: Variant | None) -> float | None:
        return v and (summary(v.times_ms) or {}).get("median")

    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        runtime = v.name[len(v.kind):] if v.name.startswith(v.kind) else ""
        base = by_name.get("autocast" + runtime)
        fp32 = by_name.get("fp32" + runtime)
        out[v.name] = {
            "baseline": base.name if base else None,
            "time_vs_autocast": ratio(median(v), median(base)),
            "peak_memory_vs_autocast": ratio(v.peak_bytes, base and base.peak_bytes),
            "error_vs_autocast": ratio(v.error, base and base.error),
            "time_vs_fp32": ratio(median(v), median(fp32)),
            "time_vs_autocast_eager": ratio(median(v), median(by_name.get("autocast"))),
            "time_vs_fp32_eager": ratio(median(v), median(by_name.get("fp32"))),
        }
    return out


def variant_json(v: Variant) -> dict[str, Any]:
    """A variant's row of the result."""
    return {
        "kind": v.kind,
        "compiled": v.compiled,
        "time_ms": summary(v.times_ms),
        "peak_memory_bytes": v.peak_bytes,
        "state_memory_bytes": v.state_bytes,
        "max_rel_error": v.error,
        "error_nonfinite": v.error_nonfinite,
        "casts": v.casts,
        "profiled_to_copy": v.profiled_to_copy,
        "scaler": v.scaler_note,
        "setup_s": v.setup_s,
    }
