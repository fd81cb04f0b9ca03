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
from amp_compiler.bench_real import SPECS, make_batch, output_field

_convert = sys.modules["amp_compiler.convert"]


def _variant(kind: str, master, batch):
    """A training step closure of one variant: ``autocast``, ``amp`` or ``amp-noP5``."""
    model = copy.deepcopy(master).cuda().train()
    if kind == "autocast":
        module, scaler = model, torch.amp.GradScaler("cuda")

        def forward():
            with torch.autocast("cuda", dtype=torch.float16):
                return output_field(module(**batch), "loss")
    else:
        rule = _convert.recompute_activations
        if kind == "amp-noP5":
            _convert.recompute_activations = lambda gm: []
        try:
            module = amp_compiler.convert(model, example_kwargs=batch, dtype="float16")
        finally:
            _convert.recompute_activations = rule
        scaler = module.scaler

        def forward():
            return output_field(module(**batch), "loss")
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)

    def step():
        loss = forward()
        (scaler.scale(loss) if kind == "autocast" else loss).backward()  # amp scales in its graph
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


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
