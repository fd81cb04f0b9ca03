"""Profile autocast vs amp_compiler on one workload: kernel counts, GPU time, host time.

Used to explain the targets not met (mlp_wide train, GPT inference at batch 1 x 64):

    $ python bench/profile_gap.py --model mlp_wide --mode train --batch 4096
    $ python bench/profile_gap.py --model gpt --mode infer --batch 1 --seq-len 64
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

import amp_compiler as ac
from amp_compiler.models import build


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp_wide")
    p.add_argument("--mode", default="train", choices=("train", "infer"))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    train = a.mode == "train"
    cfg = {"seq_len": a.seq_len} if a.seq_len else {}
    master, inputs = build(a.model, "bench", batch=a.batch, device="cuda", with_targets=train, **cfg)
    dt = torch.float16

    def make(kind):
        m = copy.deepcopy(master).train(train)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) if train else None
        if kind == "autocast":
            scaler = torch.amp.GradScaler("cuda")

            def step():
                with torch.autocast("cuda", dtype=dt):
                    out = m(*inputs)
                if train:
                    scaler.scale(out).backward()
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
            return step
        amp = ac.convert(m, inputs, dtype=dt, training=train)

        def step():
            out = amp(*inputs)
            if train:
                out.backward()
                amp.scaler.step(opt)
                amp.scaler.update()
                opt.zero_grad(set_to_none=True)
        return step

    for kind in ("autocast", "amp"):
        step = make(kind)
        ctx = torch.no_grad() if not train else torch.enable_grad()
        with ctx:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(a.steps):
                step()
            host = (time.perf_counter() - t) / a.steps * 1e3  # enqueue time incl. any syncs
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / a.steps * 1e3
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(a.steps):
                    step()
                torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type.name == "CUDA"]
        gpu_ms = sum(e.device_time for e in events) / 1e3 / a.steps
        print(f"\n== {kind}: wall {wall:.3f} ms/step, host enqueue {host:.3f} ms/step, "
              f"GPU busy {gpu_ms:.3f} ms/step, kernels/step {len(events) / a.steps:.1f}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
