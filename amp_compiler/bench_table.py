"""Render committed benchmark JSON (``bench/results/*.json``) as the README's markdown tables:
one for the torch runs (``--mode train|infer``), one for the ONNX Runtime runs (``--mode onnx``).

    $ python -m amp_compiler.bench_table bench/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _row(d: dict, name: str, variant: str) -> str:
    v = d["variants"][variant]
    r = d["ratios"][variant]
    mem = v.get("peak_memory_bytes")
    err = v.get("max_rel_error")
    b = d["batch"]
    shape = f"{b['batch']}x{b['seq_len']}" if b.get("seq_len") else str(b["batch"])
    return (f"| {name} | {d['mode']} | {shape} | {variant} | {v['time_ms']['median']:.2f} "
            f"(IQR {v['time_ms']['iqr']:.2f}) | **{r['time_vs_autocast']:.2f}x** | "
            f"{mem / 2**30:.2f} GiB | **{r['peak_memory_vs_autocast']:.2f}x** | "
            f"{'-' if err is None else f'{err:.2e}'} | {v.get('casts') if v.get('casts') is not None else '-'} |")


def table(paths: list[str]) -> str:
    """One markdown row per amp variant (eager and compiled), plus the loss runs."""
    lines = ["| workload | mode | batch | variant | ms/step | time vs autocast | peak memory | "
             "memory vs autocast | max rel err vs fp32 | casts/forward |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    losses = []
    for p in sorted(paths):
        d = json.loads(Path(p).read_text())
        if d.get("mode") == "onnx":
            continue
        name = f"`{Path(p).stem}`"
        for variant in ("autocast", "amp", "autocast+compile", "amp+compile"):
            if variant in d["variants"] and d["variants"][variant].get("time_ms"):
                lines.append(_row(d, name, variant))
        if d.get("loss"):
            losses.append((name, d["loss"]))
    out = "\n".join(lines)
    for name, loss in losses:
        out += (f"\n\n{name}: loss after {loss['steps']} steps (mean of the last {loss['tail']}, "
                f"lr {loss['lr']}): " + ", ".join(
                    f"{k} {v['final_loss']:.4f} ({v['ratio_to_fp32']:.4f}x fp32{', NaN' if v['nan'] else ''})"
                    for k, v in loss["variants"].items()))
    return out


def onnx_table(paths: list[str]) -> str:
    """One markdown row per file of every ``--mode onnx`` run."""
    lines = ["| run | inputs | file | ms/run | time vs base | max rel err vs torch fp32 | "
             "error vs base | Cast nodes |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(paths):
        d = json.loads(Path(p).read_text())
        if d.get("mode") != "onnx":
            continue
        shape = "x".join(str(n) for n in d["input_shapes"][0])
        for f, r in d["files"].items():
            base = f == d["baseline"]
            lines.append(f"| `{Path(p).stem}` | {shape} | {f}{' (base)' if base else ''} | "
                         f"{r['time_ms']['median']:.2f} (IQR {r['time_ms']['iqr']:.2f}) | "
                         f"**{r['time_vs_baseline']:.2f}x** | {r['max_rel_error']:.2e} | "
                         f"**{r['error_vs_baseline']:.2f}x** | {r['casts']} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or [str(p) for p in Path("bench/results").glob("*.json")]
    print(table(paths))
    onnx = onnx_table(paths)
    if onnx:
        print("\n" + onnx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
