"""200-step training of Hugging Face GPT-2 (``GPT2LMHeadModel(GPT2Config())``, dropout on, the
model's own loss with labels, fused AdamW) in fp32, under autocast + GradScaler and converted by
amp_compiler (fp16), from the same initial weights on the same batches of a learnable synthetic
token stream (``amp_compiler.models.data.token_stream``): the final loss (mean of the last 20
steps) of each, its ratio to fp32's, and the steps the loss scaler skipped (an fp16 run that
skips k steps of 200 is k updates behind). ``fp32-redraw`` is fp32 again with other dropout
draws: how far two fp32 runs of the same recipe land apart, the noise under the ratios.

    $ python bench/hf_gpt2_loss.py --steps 200 --json bench/results/hf-gpt2-loss200.json
    $ python bench/hf_gpt2_loss.py --tiny --device cpu --steps 5      # smoke test
"""

from __future__ import annotations

import argparse
import sys

import torch

from amp_compiler.bench.common import write_json
from amp_compiler.bench.real_models import SPECS, output_field
from amp_compiler.bench.variants import copy_of, loss_scaler, no_ctx, train_step
from amp_compiler.models import data

TAIL = 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dev, dtype = torch.device(a.device), torch.float16
    spec = SPECS["gpt2"]
    torch.manual_seed(0)
    master = spec.build(a.tiny).float()
    block = min(a.seq_len, master.config.n_positions)
    stream = data.token_stream(max(a.batch * (block + 1) * 4, 200_000), master.config.vocab_size)
    batches = [{"input_ids": x.to(dev), "labels": x.to(dev)}
               for x, _ in data.batches(stream, a.batch, block, a.steps, seed=0)]
    cfg = argparse.Namespace(dtype=dtype, device=dev)
    finals = {}
    for kind in ("fp32", "fp32-redraw", "autocast", "amp"):
        torch.manual_seed(1 if kind == "fp32-redraw" else 0)  # the same dropout draws
        model = copy_of(master, argparse.Namespace(device=dev), train=True)
        module = model
        if kind == "amp":
            import amp_compiler
            module = amp_compiler.convert(model, example_kwargs=batches[0], dtype=dtype, training=True)
        opt = torch.optim.AdamW(module.parameters(), lr=a.lr, fused=dev.type == "cuda")
        ctx = (lambda: torch.autocast(dev.type, dtype=dtype)) if kind == "autocast" else no_ctx
        scaler, in_graph, _ = loss_scaler(kind, module if kind == "amp" else None, cfg)
        step = train_step(lambda b, m=module: output_field(m(**b), "loss"), ctx, opt, scaler, in_graph)
        losses, skipped = [], 0
        for b in batches:
            before = scaler.get_scale() if scaler is not None else None
            losses.append(step((b,)).detach())
            skipped += int(scaler is not None and scaler.get_scale() < before)  # backed off: skipped
        losses = torch.stack(losses).float().cpu()
        finals[kind] = {"first": float(losses[0]), "final": float(losses[-TAIL:].mean()),
                        "nonfinite_steps": int((~torch.isfinite(losses)).sum()), "skipped_steps": skipped}
        print(f"{kind}: first {finals[kind]['first']:.4f}, final (mean of last {TAIL}) "
              f"{finals[kind]['final']:.4f}, non-finite steps {finals[kind]['nonfinite_steps']}, "
              f"skipped steps {skipped}")
        del module, model, opt
    for kind in ("fp32-redraw", "autocast", "amp"):
        finals[kind]["vs_fp32"] = finals[kind]["final"] / finals["fp32"]["final"] - 1
        print(f"{kind} final loss vs fp32: {100 * finals[kind]['vs_fp32']:+.2f}%")
    if a.json:
        write_json({"argv": sys.argv, "torch": torch.__version__, "steps": a.steps,
                    "batch": [a.batch, block], "lr": a.lr, "results": finals}, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
