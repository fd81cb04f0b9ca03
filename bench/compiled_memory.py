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
from amp_compiler.bench.real_models import SPECS, make_batch, output_field
from amp_compiler.bench.variants import loss_scaler, no_ctx, train_step

GIB = 2 ** 30


def measure(name: str) -> None:
    spec = SPECS[name]
    cfg = argparse.Namespace(dtype=getattr(torch, spec.dtype), device=torch.device("cuda"))
    torch.manual_seed(0)
    master = spec.build(False).float()
    batch = {k: v.cuda() for k, v in make_batch(spec, master, spec.batch, spec.length, labels=True).items()}
    for kind in ("autocast", "amp"):
        model = copy.deepcopy(master).cuda().train()
        ctx = (lambda: torch.autocast("cuda", dtype=cfg.dtype)) if kind == "autocast" else no_ctx
        if kind == "amp":
            model = amp_compiler.convert(model, example_kwargs=batch, dtype=cfg.dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        scaler, in_graph, _ = loss_scaler(kind, model, cfg)
        compiled = torch.compile(model)
        after_forward = []  # (allocated, peak so far) where the forward returns the loss

        def forward(b):
            loss = output_field(compiled(**b), "loss")
            torch.cuda.synchronize()
            after_forward.append((torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
            return loss

        step = train_step(forward, ctx, opt, scaler, in_graph)  # the suite's step
        for _ in range(3):
            step((batch,))
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step((batch,))
        torch.cuda.synchronize()
        allocated, forward_peak = after_forward[-1]
        print(f"{name} {kind:8s} compiled: held {held / GIB:.2f} GiB, left for backward "
              f"{(allocated - held) / GIB:.2f} GiB, forward peak {forward_peak / GIB:.2f} GiB, "
              f"step peak {torch.cuda.max_memory_allocated() / GIB:.2f} GiB", flush=True)
        del model, compiled, opt, step
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
