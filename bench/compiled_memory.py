"""Where a compiled training step's peak memory is: torch.compile'd autocast against
torch.compile'd amp_compiler on suite models (full size, labels, fused AdamW), one process.
For each: the memory held between steps (weights, gradients' absence, optimizer state), what
the forward leaves for backward (allocated after the forward, less that), the peak during the
forward and the peak of the whole step.

    $ python bench/compiled_memory.py gpt2 llama      # on a CUDA machine
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import amp_compiler
from amp_compiler.bench_real import SPECS, make_batch, output_field

GIB = 2 ** 30


def measure(name: str) -> None:
    spec = SPECS[name]
    dtype = getattr(torch, spec.dtype)
    torch.manual_seed(0)
    master = spec.build(False).float()
    batch = {k: v.cuda() for k, v in make_batch(spec, master, spec.batch, spec.length, labels=True).items()}
    for kind in ("autocast", "amp"):
        model = copy.deepcopy(master).cuda().train()
        if kind == "amp":
            model = amp_compiler.convert(model, example_kwargs=batch, dtype=dtype)
        scaler = (torch.amp.GradScaler("cuda") if kind == "autocast" else model.scaler) \
            if dtype == torch.float16 else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        compiled = torch.compile(model)

        def forward():
            with torch.autocast("cuda", dtype=dtype, enabled=kind == "autocast"):
                return output_field(compiled(**batch), "loss")

        def finish(loss):
            (scaler.scale(loss) if kind == "autocast" and scaler else loss).backward()
            (scaler.step(opt), scaler.update()) if scaler else opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            finish(forward())
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = forward()
        torch.cuda.synchronize()
        saved, forward_peak = torch.cuda.memory_allocated() - held, torch.cuda.max_memory_allocated()
        finish(loss)
        torch.cuda.synchronize()
        print(f"{name} {kind:8s} compiled: held {held / GIB:.2f} GiB, left for backward {saved / GIB:.2f} GiB, "
              f"forward peak {forward_peak / GIB:.2f} GiB, step peak {torch.cuda.max_memory_allocated() / GIB:.2f} GiB",
              flush=True)
        del model, compiled, opt, loss
        torch._dynamo.reset()  # its caches hold the compiled variant's weights
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", choices=sorted(SPECS))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    for name in a.models:
        measure(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
