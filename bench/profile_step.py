"""Where one training step's time and bytes go: torch.autocast against amp_compiler (and, for
the Llama model, autocast + liger-kernel) on the real-model suite's models, one process.

For each model and variant: the median step time of interleaved rounds, the peak memory of a
step, GPU time by operator category (torch.profiler, one step) and the live memory at the peak
by where it was allocated (a CUDA memory snapshot of one step: the largest sites).

    $ python bench/profile_step.py --models gpt2,llama,bert            # on a CUDA machine
    $ python bench/profile_step.py --models gpt2 --tiny --device cpu   # smoke test (no memory)

liger-kernel (``pip install liger-kernel``) adds the variant ``liger`` for ``llama``:
``apply_liger_kernel_to_llama(model=copy)`` (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE)
under autocast; its RoPE patch is module-wide, so it is applied only while that copy runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import gc
import statistics
import sys
import time

import torch

import amp_compiler
from amp_compiler.bench.common import sync, write_json
from amp_compiler.bench.real_models import SPECS, make_batch, output_field
from amp_compiler.bench.variants import loss_scaler, train_step

CATEGORIES = (  # operator name fragment -> category, first match wins
    (("mm", "matmul", "linear", "addmm", "bmm", "baddbmm", "conv"), "matmul/conv"),
    (("attention", "flash", "sdpa", "efficient"), "attention"),
    (("_to_copy", "copy_", "to", "clone", "contiguous"), "casts/copies"),
    (("layer_norm", "rms_norm", "batch_norm", "group_norm"), "norm"),
    (("softmax", "nll_loss", "cross_entropy", "linear_cross_entropy"), "softmax/loss"),
    (("adam", "_foreach", "_amp_", "unscale"), "optimizer/scaler"),
    (("sum", "mean", "max", "min", "norm", "any", "all"), "reductions"),
)


def category(op: str) -> str:
    name = op.split("::")[-1].lower()
    for fragments, label in CATEGORIES:
        if any(name.startswith(f) or f in name.split("_") for f in fragments):
            return label
    return "elementwise/other"


def build(kind: str, spec, master, batch: dict, dtype: torch.dtype, device: torch.device):
    """A step closure for one variant, its own copy of the weights and optimizer."""
    model = copy.deepcopy(master).to(device).train()
    scope = contextlib.nullcontext
    if kind == "amp":
        module = amp_compiler.convert(model, example_kwargs=batch, dtype=dtype, training=True)
    else:
        module = model
        if kind == "liger":
            from liger_kernel.transformers import apply_liger_kernel_to_llama, liger_rotary_pos_emb
            from transformers.models.llama import modeling_llama

            apply_liger_kernel_to_llama(rope=False, model=model)
            def liger_scope():
                return _patched(modeling_llama, "apply_rotary_pos_emb", liger_rotary_pos_emb)
            scope = liger_scope
    params = list(module.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda",
                            foreach=device.type != "cuda")
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if kind != "amp" else contextlib.nullcontext
    cfg = argparse.Namespace(dtype=dtype, device=device)
    scaler, in_graph, _ = loss_scaler("amp" if kind == "amp" else "autocast",
                                      module if kind == "amp" else None, cfg)

    def loss_of(b):
        with scope():
            return output_field(module(**b), "loss")
    step = train_step(loss_of, ctx, opt, scaler, in_graph)
    run = lambda: step((batch,))  # noqa: E731
    run.state_bytes = lambda: _bytes(params) + _bytes(  # its weights and optimizer state
        t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))
    return run


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def gpu_time_by_category(step, device) -> tuple[dict[str, float], list[tuple[str, float]]]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        step()
        sync(device)
    by_cat, by_op = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) if device.type == "cuda" else e.self_cpu_time_total
        if not t or not e.key.startswith("aten::"):
            continue
        by_cat[category(e.key)] += t / 1e3
        by_op[e.key] += t / 1e3
    copies = collections.Counter()
    for e in prof.key_averages(group_by_input_shape=True):
        t = getattr(e, "self_device_time_total", None) if device.type == "cuda" else e.self_cpu_time_total
        if t and e.key in ("aten::copy_", "aten::mul", "aten::add", "aten::cat"):
            copies[f"{e.key.split('::')[-1]} {e.input_shapes[:2]} x{e.count}"] += t / 1e3
    return dict(by_cat.most_common()), by_op.most_common(8), copies.most_common(8)


def memory_at_peak(step, top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """(GiB one step allocates at its peak beyond what was held before it, the largest
    allocation sites live at that peak, GiB)."""
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for trace in snap["device_traces"]:
        for ev in trace:
            if ev["action"] == "alloc":
                live[ev["addr"]] = (ev["size"], _site(ev.get("frames", ())))
                total += ev["size"]
                if total > peak:
                    peak, at_peak = total, dict(live)
            elif ev["action"] in ("free_completed",) and ev["addr"] in live:
                total -= live.pop(ev["addr"])[0]
    sites = collections.Counter()
    for size, site in at_peak.values():
        sites[site] += size / 2**30
    return peak / 2**30, [(s, round(g, 3)) for s, g in sites.most_common(top)]


def _site(frames) -> str:
    """The innermost frame outside torch itself (model code, the loss, our runtime), or the
    autograd engine for allocations made in backward."""
    names = [(f.get("filename", ""), f.get("line", 0), f.get("name", "")) for f in frames]
    for filename, line, name in names:
        if not (filename.endswith(".py") or "eval_with_key" in filename):
            continue  # C++ frames
        if "/torch/" in filename and "/fx/" not in filename:
            continue
        if filename.endswith(("profile_step.py", "bench/variants.py")):  # the step closure
            return "backward/optimizer (autograd engine)"
        short = "/".join(filename.split("/")[-2:])
        return f"{short}:{line} {name}"
    return "backward/optimizer (autograd engine)" if names else "(no python frame)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,llama,bert")
    p.add_argument("--variants", default="autocast,amp,liger")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None, help="write the figures here too")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    report = {}
    for name in a.models.split(","):
        spec = SPECS[name]
        torch.manual_seed(0)
        master = spec.build(a.tiny).float()
        b, n = (2, 32 if spec.text else 32) if a.tiny else (spec.batch, spec.length)
        batch = {k: t.to(device) for k, t in make_batch(spec, master, b, n, labels=True).items()}
        dtype = getattr(torch, spec.dtype)
        kinds = [k for k in a.variants.split(",") if k != "liger" or name == "llama"]
        steps = {}
        for k in kinds:
            try:
                steps[k] = build(k, spec, master, batch, dtype, device)
                for _ in range(3):
                    steps[k]()
            except Exception as e:  # noqa: BLE001 - reported, the others go on
                print(f"{name} {k}: {type(e).__name__}: {str(e)[:300]}")
                steps.pop(k, None)
        times = collections.defaultdict(list)
        for _ in range(a.rounds):  # interleaved
            for k, step in steps.items():
                sync(device)
                t = time.perf_counter()
                for _ in range(a.steps):
                    step()
                sync(device)
                times[k].append((time.perf_counter() - t) / a.steps * 1e3)
        report[name] = {}
        for k, step in steps.items():
            row = {"ms": round(statistics.median(times[k]), 2)}
            if device.type == "cuda":
                # the variant's own peak: its weights and optimizer state plus what one step
                # allocates beyond what was held before it (the other variants' state is not its)
                gc.collect()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row["peak_gib"] = round((torch.cuda.max_memory_allocated() - before + step.state_bytes()) / 2**30, 3)
                row["step_peak_gib"], row["live_at_peak"] = memory_at_peak(step)
            row["gpu_ms_by_category"], row["top_ops"], row["top_shapes"] = gpu_time_by_category(step, device)
            report[name][k] = row
        ref = report[name].get("autocast")
        print(f"\n=== {name} ({spec.config.split(':')[0]}), {spec.dtype}, {b}x{n}")
        for k, row in report[name].items():
            ratio = f" = {row['ms'] / ref['ms']:.2f}x autocast" if ref and k != "autocast" else ""
            mem = f", peak {row['peak_gib']:.2f} GiB" + (
                f" = {row['peak_gib'] / ref['peak_gib']:.2f}x" if ref and k != "autocast" else "") \
                if "peak_gib" in row else ""
            print(f"--- {k}: {row['ms']:.2f} ms/step{ratio}{mem}")
            print("    GPU ms by category: " + ", ".join(f"{c} {t:.1f}" for c, t in row["gpu_ms_by_category"].items()))
            print("    top ops: " + ", ".join(f"{o.split('::')[-1]} {t:.1f}" for o, t in row["top_ops"]))
            print("    top copy/mul/add/cat by shape: " + "; ".join(f"{o} {t:.2f}" for o, t in row["top_shapes"]))
            for site, gib in row.get("live_at_peak", ()):
                print(f"    {gib:7.3f} GiB  {site}")
        del steps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if a.json:
        write_json({"argv": sys.argv, "torch": torch.__version__, "results": report}, a.json)
    return 0



if __name__ == "__main__":
    sys.exit(main())
