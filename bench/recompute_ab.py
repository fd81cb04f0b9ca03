"""Rule P5 (an activation computed again in backward) on and off, beside autocast, on suite
models (full size, fp16, labels, fused AdamW), interleaved in one process: the median and
minimum wall time of a training step, one step's GPU time (torch.profiler, the sum of device
time over its kernels: what the step costs the GPU, whatever the host adds) and the peak
memory while every variant's weights and optimizer state are alive.

    $ python bench/recompute_ab.py vit bert          # on a CUDA machine
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

import amp_compiler
from amp_compiler.bench.real_models import SPECS, make_batch, output_field
from amp_compiler.bench.variants import loss_scaler, no_ctx, train_step

_convert = sys.modules["amp_compiler.convert"]
_CFG = argparse.Namespace(dtype=torch.float16, device=torch.device("cuda"))


def _variant(kind: str, master, batch):
    """A training step closure of one variant: ``autocast``, ``amp`` or ``amp-noP5``, each as
    the benchmark suite drives it (``variants.loss_scaler``, ``variants.train_step``)."""
    module = copy.deepcopy(master).cuda().train()
    ctx = (lambda: torch.autocast("cuda", dtype=torch.float16)) if kind == "autocast" else no_ctx
    if kind != "autocast":
        rule = _convert.recompute_activations
        if kind == "amp-noP5":
            _convert.recompute_activations = lambda gm: []
        try:
            module = amp_compiler.convert(module, example_kwargs=batch, dtype="float16")
        finally:
            _convert.recompute_activations = rule
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)
    scaler, in_graph, _ = loss_scaler(kind.removesuffix("-noP5"), module, _CFG)
    step = train_step(lambda b: output_field(module(**b), "loss"), ctx, opt, scaler, in_graph)
    return lambda: step((batch,))


def measure(name: str, rounds: int, steps: int) -> None:
    spec = SPECS[name]
    torch.manual_seed(0)
    master = spec.build(False).float()
    batch = {k: v.cuda() for k, v in make_batch(spec, master, spec.batch, spec.length, labels=True).items()}
    variants = {k: _variant(k, master, batch) for k in ("autocast", "amp", "amp-noP5")}
    peaks, gpu, times = {}, {}, {k: [] for k in variants}
    for kind, step in variants.items():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peaks[kind] = torch.cuda.max_memory_allocated() / 2 ** 30
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        gpu[kind] = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    for _ in range(rounds):
        for kind, step in variants.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            times[kind].append((time.perf_counter() - t0) / steps * 1e3)
    base = statistics.median(times["autocast"])
    for kind in variants:
        med = statistics.median(times[kind])
        print(f"{name} {kind:9s} median {med:7.2f} ms ({med / base:.2f}x) min {min(times[kind]):7.2f} "
              f"GPU time {gpu[kind]:7.2f} ms peak (all variants alive) {peaks[kind]:.2f} GiB", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", choices=sorted(SPECS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    for name in a.models:
        measure(name, a.rounds, a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
