"""The cost of true gradients (rule L4): step time of fp16 training without L4, with one unscale
node per parameter, and with one per layer (the default), interleaved in one process.

    python bench/true_gradients_cost.py [ROUNDS]     # GPT bench model 8 x 1024 on CUDA;
                                                     # the tiny one 4 x 32 on CPU

The two other variants are made by switching parts of the pass off for their conversion only
(``loss_scaling.unscale_leaves`` a no-op, or ``_layer`` grouping nothing); the JSON it prints
gives each variant's median step and quartiles.
"""
import json
import statistics
import sys
import time

import torch
import amp_compiler as ac
import amp_compiler.passes.loss_scaling as ls
from amp_compiler.models import build

cv = sys.modules["amp_compiler.convert"]
dev = "cuda" if torch.cuda.is_available() else "cpu"
size, batch, seq = ("bench", 8, 1024) if dev == "cuda" else ("tiny", 4, 32)
model, ex = build("gpt", size, batch=batch, seq_len=seq, with_targets=True, device=dev)
model.train()

def convert(variant):
    unscale, layer, make = ls.unscale_leaves, ls._layer, cv.make_scaler
    if variant == "noL4":
        ls.unscale_leaves = lambda gm, s: 0
        def mk(*a, **k):
            sc = make(*a, **k)
            sc.unscaled_in_backward = False
            return sc
        cv.make_scaler = mk
    elif variant == "L4-per-param":
        ls._layer = lambda target: target
    try:
        return ac.convert(model, ex, dtype="float16")
    finally:
        ls.unscale_leaves, ls._layer, cv.make_scaler = unscale, layer, make

variants = {v: convert(v) for v in ("noL4", "L4-per-param", "L4-per-layer")}
opts = {v: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda") for v in variants}
times = {v: [] for v in variants}

def step(v):
    amp = variants[v]
    amp(*ex).backward()
    amp.scaler.step(opts[v]); amp.scaler.update(); opts[v].zero_grad(set_to_none=True)

sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    for v in variants:
        for _ in range(3):
            step(v)
        sync()
        for _ in range(10):
            t = time.perf_counter(); step(v); sync(); times[v].append(1000 * (time.perf_counter() - t))
out = {v: {"median_ms": statistics.median(t), "q1": statistics.quantiles(t, n=4)[0],
           "q3": statistics.quantiles(t, n=4)[2], "samples": len(t)} for v, t in times.items()}
out["setup"] = {"model": f"gpt {size}", "batch": batch, "seq": seq, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                "torch": torch.__version__, "unscale_nodes": {v: sum(1 for n in a.graph_module.graph.nodes if "unscale" in n.name and n.op == "call_function" and not n.name.endswith("_unscaled")) for v, a in variants.items()}}
print(json.dumps(out, indent=1))
