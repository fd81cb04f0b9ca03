"""Train a converted Hugging Face GPT-2 (124M) on one or several GPUs: DDP, FSDP2 or none.

Launch (one process per GPU; the global batch is split over the ranks, so every world size
trains on the same data and their losses compare):

    python bench/distributed_gpt2.py --wrap none --out one.json                 # 1 GPU
    torchrun --nproc_per_node 2 bench/distributed_gpt2.py --wrap ddp --out ddp.json
    torchrun --nproc_per_node 2 bench/distributed_gpt2.py --wrap fsdp2 --out fsdp2.json

Each run: default ``GPT2Config()`` (dropout as configured), the model's own loss with labels
(``amp(input_ids=x, labels=x).loss``), fp16 with the in-graph loss scaling
(``loss.backward(); amp.scaler.step(opt); amp.scaler.update()``), fused AdamW, a learnable
synthetic token stream (``amp_compiler.models.data.token_stream``). At ``--overflow-step`` rank
0 alone back-propagates an infinite loss: every rank must skip that step (parameters unchanged,
scale halved). Rank 0 writes a JSON file: per-step losses (mean over ranks), the final loss,
step time, tokens per second in all and per GPU, and what each rank did at the overflow step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import amp_compiler as ac
from amp_compiler.models.data import batches, token_stream


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept it under _composable
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _checksum(module: torch.nn.Module) -> float:
    """Sum of this rank's parameter values (its shards under FSDP2): changes iff a step ran."""
    with torch.no_grad():
        return float(sum(getattr(p, "to_local", lambda p=p: p)().double().sum() for p in module.parameters()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrap", choices=("none", "ddp", "fsdp2"), default="none")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--overflow-step", type=int, default=50, help="-1: none")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.wrap != "none" and world < 2:
        parser.error(f"--wrap {args.wrap} needs torchrun --nproc_per_node >= 2")
    if args.global_batch % world:
        parser.error(f"--global-batch {args.global_batch} does not split over {world} ranks")
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    if world > 1:
        dist.init_process_group("nccl", device_id=device)
    per_rank = args.global_batch // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to(device).train()
    stream = token_stream(1_000_000, model.config.vocab_size, seed=0)
    data = [idx[rows] for idx, _ in batches(stream, batch=args.global_batch, block=args.seq_len,
                                            steps=args.steps, seed=1)]
    example = data[0].to(device)
    amp = ac.convert(model, example_kwargs={"input_ids": example, "labels": example}, dtype="float16")
    scaler = amp.scaler
    if args.wrap == "ddp":
        run = torch.nn.parallel.DistributedDataParallel(amp, device_ids=[local])
    elif args.wrap == "fsdp2":
        run = _fully_shard()(amp)
    else:
        run = amp
    opt = torch.optim.AdamW(run.parameters(), lr=args.lr, fused=True)

    losses, overflow = [], {}
    start = None
    for step, idx in enumerate(data):
        if step == args.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        x = idx.to(device, non_blocking=True)
        if step == args.overflow_step:  # before the forward: FSDP2 holds its shards now
            before, scale_before = _checksum(run), scaler.get_scale()
        loss = run(input_ids=x, labels=x).loss
        to_backward = loss * float("inf") if (step == args.overflow_step and rank == 0) else loss
        to_backward.backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if step == args.overflow_step:
            overflow = {"skipped": _checksum(run) == before, "scale_before": scale_before,
                        "scale_after": scaler.get_scale()}
        losses.append(loss.detach())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    timed = args.steps - args.warmup

    losses_t = torch.stack(losses).float()
    every_rank = [overflow]
    if world > 1:
        dist.all_reduce(losses_t)
        losses_t /= world
        every_rank = [None] * world
        dist.all_gather_object(every_rank, overflow)
    step_ms = 1000.0 * elapsed / timed
    tokens = args.global_batch * args.seq_len
    result = {
        "command": ("python" if "LOCAL_RANK" not in os.environ else f"torchrun --nproc_per_node {world}")
                   + " bench/distributed_gpt2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "wrap": args.wrap, "world": world, "global_batch": args.global_batch, "per_rank_batch": per_rank,
        "seq_len": args.seq_len, "steps": args.steps, "timed_steps": timed,
        "step_ms": step_ms, "tokens_per_s": tokens / (step_ms / 1000.0),
        "tokens_per_s_per_gpu": tokens / (step_ms / 1000.0) / world,
        "final_loss": float(losses_t[-20:].mean()), "first_loss": float(losses_t[0]),
        "losses": [round(float(v), 5) for v in losses_t],
        "overflow_step": args.overflow_step, "overflow_by_rank": every_rank,
        "final_scale": scaler.get_scale(),
    }
    if rank == 0:
        text = json.dumps(result, indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
