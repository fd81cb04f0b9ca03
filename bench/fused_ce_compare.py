"""The fused linear + cross-entropy beside the unfused loss and liger-kernel's, at the LM heads
of the real-model suite: forward + backward time, peak memory above the inputs, and the error
of the loss and of the gradients against fp32.

    $ python bench/fused_ce_compare.py            # CUDA; liger-kernel optional
    $ python bench/fused_ce_compare.py --device cpu --rows 512   # smoke test

Shapes: GPT-2 (8 x 1024 rows, hidden 768, vocab 50257, fp16) and the Llama model (8 x 1024,
hidden 1024, vocab 32000, bf16); labels random, 5% of them ``ignore_index``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from amp_compiler.bench.common import sync, write_json
from amp_compiler.passes import runtime

HEADS = {"gpt2": (768, 50257, torch.float16), "llama": (1024, 32000, torch.bfloat16)}


def variants():
    out = {
        "unfused (autocast's graph)": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t),
        "amp chunked": lambda h, w, t: runtime.linear_cross_entropy(h, w, None, t),
        "amp chunked + logits": lambda h, w, t: runtime.linear_cross_entropy(h, w, None, t, logits=True)[0],
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger-kernel"] = lambda h, w, t: liger(w, h, t)
    except ImportError as e:
        print(f"liger-kernel not installed ({e}): pip install liger-kernel to compare")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=8 * 1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    report = {}
    for head, (hidden, vocab, dtype) in HEADS.items():
        g = torch.Generator().manual_seed(0)
        h32 = (torch.randn(a.rows, hidden, generator=g)).to(dev)
        w32 = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(dev)
        t = torch.randint(0, vocab, (a.rows,), generator=g)
        t[torch.rand(a.rows, generator=g) < 0.05] = -100
        t = t.to(dev)
        hr, wr = h32.clone().requires_grad_(), w32.clone().requires_grad_()
        ref = F.cross_entropy(F.linear(hr, wr), t)
        ref_gh, ref_gw = torch.autograd.grad(ref, [hr, wr])
        del hr, wr
        report[head] = {}
        print(f"\n=== {head}: {a.rows} rows x {hidden} -> {vocab}, {dtype}")
        for name, fn in variants().items():
            h = h32.to(dtype).requires_grad_()
            w = w32.to(dtype).requires_grad_()
            try:
                loss = fn(h, w, t)
                gh, gw = torch.autograd.grad(loss, [h, w])
                err = {"loss": abs(loss.item() - ref.item()) / abs(ref.item()),
                       "grad_h": ((gh.float() - ref_gh).abs().max() / ref_gh.abs().max()).item(),
                       "grad_w": ((gw.float() - ref_gw).abs().max() / ref_gw.abs().max()).item()}
                del loss, gh, gw
                times = []
                for i in range(a.iters + 3):
                    sync(dev)
                    t0 = time.perf_counter()
                    gh, gw = torch.autograd.grad(fn(h, w, t), [h, w])
                    sync(dev)
                    if i >= 3:
                        times.append((time.perf_counter() - t0) * 1e3)
                    del gh, gw
                mem = None
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    gh, gw = torch.autograd.grad(fn(h, w, t), [h, w])
                    torch.cuda.synchronize()
                    mem = (torch.cuda.max_memory_allocated() - base) / 2**20
                    del gh, gw
            except Exception as e:  # noqa: BLE001 - reported, the others go on
                print(f"--- {name}: {type(e).__name__}: {str(e)[:200]}")
                continue
            row = {"ms": round(statistics.median(times), 3), "peak_mib": mem and round(mem, 1),
                   **{k: float(f"{v:.3g}") for k, v in err.items()}}
            report[head][name] = row
            print(f"--- {name}: {row['ms']:.2f} ms fwd+bwd" + (f", peak +{mem:.0f} MiB" if mem else "")
                  + f", error vs fp32: loss {row['loss']:.1e}, grad_h {row['grad_h']:.1e}, grad_w {row['grad_w']:.1e}")
            del h, w
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if a.json:
        write_json({"argv": sys.argv, "torch": torch.__version__, "results": report}, a.json)
    return 0



if __name__ == "__main__":
    sys.exit(main())
