"""Render committed benchmark JSON (``bench/results/*.json``) as the README's markdown tables:
one for the torch runs (``--mode train|infer``), one for the ONNX Runtime runs (``--mode onnx``)
and one for the real-model suite (``--suite real``, files ``real-*.json``).

    $ python -m amp_compiler.bench.table bench/results/*.json
    $ python -m amp_compiler.bench.table bench/results/real-*.json   # the real-model table only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from amp_compiler.bench.real_models import SPECS


def _num(x: float | None, spec: str, before: str = "", after: str = "") -> str:
    return "-" if x is None else f"{before}{x:{spec}}{after}"


def _cells(v: dict, r: dict) -> list[str]:
    """ms/step, time vs autocast, peak memory, memory vs autocast, max rel err vs fp32 and
    casts/forward of one variant; "-" for what was not measured (memory on a CPU)."""
    t = v.get("time_ms")
    mem = v.get("peak_memory_bytes")
    return ["-" if not t else f"{t['median']:.2f} (IQR {t['iqr']:.2f})",
            _num(r.get("time_vs_autocast"), ".2f", "**", "x**"),
            _num(None if mem is None else mem / 2**30, ".2f", after=" GiB"),
            _num(r.get("peak_memory_vs_autocast"), ".2f", "**", "x**"),
            _num(v.get("max_rel_error"), ".2e"),
            "-" if v.get("casts") is None else str(v["casts"])]


def _row(d: dict, name: str, variant: str) -> str:
    b = d["batch"]
    shape = f"{b['batch']}x{b['seq_len']}" if b.get("seq_len") else str(b["batch"])
    cells = [name, d["mode"], shape, variant, *_cells(d["variants"][variant], d["ratios"][variant])]
    return "| " + " | ".join(cells) + " |"


def table(paths: list[str]) -> str:
    """One markdown row per amp variant (eager and compiled), plus the loss runs."""
    lines = ["| workload | mode | batch | variant | ms/step | time vs autocast | peak memory | "
             "memory vs autocast | max rel err vs fp32 | casts/forward |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    losses = []
    for p in sorted(paths):
        d = json.loads(Path(p).read_text())
        if d.get("mode") == "onnx" or d.get("suite") == "real":
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
    """One markdown row per file and batch of every ``--mode onnx`` run; the last four columns
    compare with the other converters (the faster / more accurate of onnxconverter-common and
    ModelOpt, ModelOpt's Casts, onnxconverter-common's size) where the run had them."""
    lines = ["| run | inputs | file | ms/run | time vs base | time vs faster other | max rel err vs "
             "torch fp32 | error vs base | error vs better other | Cast nodes | vs ModelOpt's | "
             "MB | size vs onnxconverter-common |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(paths):
        d = json.loads(Path(p).read_text())
        if d.get("mode") != "onnx":
            continue
        for run in d.get("runs", [d]):
            shape = "x".join(str(n) for n in run["input_shapes"][0])
            for f, r in run["files"].items():
                base = f == run["baseline"]
                lines.append(
                    f"| `{Path(p).stem}` | {shape} | {f}{' (base)' if base else ''} | "
                    f"{r['time_ms']['median']:.2f} (IQR {r['time_ms']['iqr']:.2f}) | "
                    f"**{r['time_vs_baseline']:.2f}x** | {_x(r.get('time_vs_fastest_other'))} | "
                    f"{r['max_rel_error']:.2e} | **{r['error_vs_baseline']:.2f}x** | "
                    f"{_x(r.get('error_vs_best_other'))} | {r['casts']} | {_x(r.get('casts_vs_modelopt'))} | "
                    f"{r['size_bytes'] / 1e6:.1f} | {_x(r.get('size_vs_onnxconverter_common'))} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def onnx_errors_table(paths: list[str]) -> str:
    """The ``--mode onnx`` runs' errors on their error batch (distinct samples): max and RMS
    relative error per file, each against the more accurate of the other converters."""
    lines = ["| run | error batch | file | max rel err | vs better other | RMS rel err | "
             "vs better other |", "|---|---|---|---|---|---|---|"]
    for p in sorted(paths):
        d = json.loads(Path(p).read_text())
        if d.get("mode") != "onnx" or not d.get("errors"):
            continue
        e = d["errors"]
        for f, r in e["files"].items():
            lines.append(f"| `{Path(p).stem}` | {e['batch']} | {f} | {r['max_rel_error']:.2e} | "
                         f"{_x(r['max_rel_vs_best_other'])} | {r['rms_rel_error']:.2e} | "
                         f"{_x(r['rms_rel_vs_best_other'])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


REAL_HEADER = ["model", "mode", "batch", "dtype", "variant", "ms/step", "time vs autocast",
               "peak memory", "memory vs autocast", "max rel err vs fp32", "error vs autocast",
               "casts/forward"]


def _real_key(d: dict) -> tuple:
    """Models in the suite's order, train before infer."""
    order = list(SPECS).index(d["model"]) if d["model"] in SPECS else len(SPECS)
    return order, d["model"], d["mode"] != "train", d["dtype"], d["config"]


def _failed(f: dict) -> str:
    lines = f["message"].strip().splitlines()
    text = f"{f['exception']}: {lines[0] if lines else ''}"
    text = (text if len(text) <= 120 else text[:117] + "...").replace("|", "/").replace("`", "'")
    return f"failed in {f['stage']}: `{text}`"


def real_table(paths: list[str]) -> str:
    """The ``--suite real`` files as one markdown table: a row per model, mode, batch shape and
    variant, a failed variant with its stage and exception, a skipped model with its reason,
    then one line saying where and how it was measured. Where a ``--compile`` file and an eager
    file of the same model, mode and dtype are both given, the compile file adds its compiled
    rows only (its eager rows are a second measurement of the eager file's)."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    files = sorted((d for d in files if d.get("suite") == "real" and not _latency_file(d)),
                   key=lambda d: (*_real_key(d), d["settings"]["compile"]))
    if not files:
        return ""
    eager = {_real_key(d) for d in files if not d["settings"]["compile"] and d["status"] == "ok"}
    lines = ["| " + " | ".join(REAL_HEADER) + " |", "|" + "---|" * len(REAL_HEADER)]
    for d in files:
        head = [d["model"] + (" (tiny)" if d["config"] == "tiny" else ""), d["mode"]]
        if d["status"] != "ok":
            why = f"{d['status']}: {d['reason']}".replace("|", "/")
            lines.append("| " + " | ".join([*head, "-", d["dtype"], why, *["-"] * 7]) + " |")
            continue
        only_compiled = d["settings"]["compile"] and _real_key(d) in eager
        mode = d["settings"].get("compile_mode")
        for run in d["runs"]:
            for name, v in run["variants"].items():  # in the suite's order
                if only_compiled and not name.endswith("+compile"):
                    continue
                r = run["ratios"][name]
                cells = _cells(v, r)
                cells.insert(5, _num(r.get("error_vs_autocast"), ".2f", after="x"))
                if v.get("failure"):
                    cells = [_failed(v["failure"]), *["-"] * 6]
                if mode and name.endswith("+compile"):
                    name += f" ({mode})"
                lines.append("| " + " | ".join([*head, run["label"], d["dtype"], name, *cells])
                             + " |")
    return "\n".join(lines) + "\n\n" + _measured(files)


def _latency_file(d: dict) -> bool:
    """A small-batch inference run (``--cuda-graphs`` or ``--infer-batches``): its own table."""
    settings = d.get("settings", {})
    return d.get("mode") == "infer" and (
        bool(settings.get("cuda_graphs"))
        or settings.get("infer_batches") not in (None, [1, "train"]))


# (column, variant, ratio field shown after its time)
LATENCY_COLUMNS = [
    ("fp32", "fp32", None),
    ("autocast", "autocast", None),
    ("amp", "amp", "time_vs_autocast"),
    ("autocast CUDA graphs", "autocast+cudagraphs", None),
    ("amp CUDA graphs", "amp+cudagraphs", "time_vs_autocast_eager"),
    ("amp CUDA graphs vs fp32", "amp+cudagraphs", "time_vs_fp32_eager"),
    ("autocast compiled", "autocast+compile", None),
    ("amp compiled", "amp+compile", "time_vs_autocast"),
    ("autocast reduce-overhead", "autocast+compile:reduce-overhead", None),
    ("amp reduce-overhead", "amp+compile:reduce-overhead", "time_vs_autocast"),
]


def latency_table(paths: list[str]) -> str:
    """Small-batch inference (``--suite real --modes infer --cuda-graphs --infer-batches ...``)
    as one markdown table: a row per model and batch shape, the median ms of each way of
    running it, amp's beside its ratio to the autocast run the same way (CUDA graphs: to eager
    autocast, and to eager fp32), then where it was measured.

        $ python -m amp_compiler.bench.table bench/results/real-*-cudagraphs-*.json
    """
    files = sorted((d for d in (json.loads(Path(p).read_text()) for p in paths)
                    if d.get("suite") == "real" and _latency_file(d) and d["status"] == "ok"),
                   key=_real_key)
    if not files:
        return ""
    present = [c for c in LATENCY_COLUMNS
               if any(c[1] in run["variants"] for d in files for run in d["runs"])]
    head = ["model", "batch", "dtype", *(c[0] for c in present)]
    # one row per model, batch and dtype: a later file fills the columns an earlier one lacks
    rows: dict[tuple, list[str | None]] = {}
    for d in files:
        for run in d["runs"]:
            row = rows.setdefault((d["model"], run["label"], d["dtype"]), [None] * len(present))
            for i, (_, variant, ratio) in enumerate(present):
                if row[i] is None and variant in run["variants"]:
                    row[i] = _latency_cell(run["variants"][variant],
                                           run["ratios"].get(variant) or {}, ratio)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([*key, *(c or "-" for c in cells)]) + " |"
              for key, cells in rows.items()]
    return "\n".join(lines) + "\n\n" + _measured(files)


def _latency_cell(v: dict, r: dict, ratio: str | None) -> str:
    t, x = v.get("time_ms"), r.get(ratio) if ratio else None
    ms = f"{t['median']:.2f} ms" if t else "-"
    if v.get("failure"):
        return "failed"
    if ratio == "time_vs_fp32_eager":  # the column beside the time
        return _num(x, ".2f", "**", "x**")
    return ms if x is None else f"{ms} (**{x:.2f}x**)"


def _measured(files: list[dict]) -> str:
    """One line: when, on what, with which libraries and how many steps the files measured."""
    setups = sorted({
        f"{d['device_name']}, torch {d['torch']}, "
        + "".join(f"{k} {v}, " for k, v in d["libraries"].items() if v)
        + f"{d['settings']['steps']} steps x {d['settings']['rounds']} rounds after "
          f"{d['settings']['warmup']} warm-up" for d in files})
    dates = sorted({d["date"][:10] for d in files})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return (f"Measured {when} on {'; '.join(setups)}; the command of each file is in its JSON "
            "(`command`).")


def main(argv: list[str] | None = None) -> int:
    """Print the tables of the files in ``argv`` (default: every file in bench/results)."""
    parser = argparse.ArgumentParser(
        prog="python -m amp_compiler.bench.table",
        description="Markdown tables (the README's) from `amp-compiler bench` JSON files.")
    parser.add_argument("paths", nargs="*", help="JSON files (default: bench/results/*.json)")
    paths = parser.parse_args(argv).paths or [str(p) for p in Path("bench/results").glob("*.json")]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    # the torch table when a file is one of `amp-compiler bench`'s own workloads (not an ONNX
    # run, not the real-model suite): no empty header above the other tables
    files = [json.loads(Path(p).read_text()) for p in paths]
    workloads = any(d.get("mode") != "onnx" and d.get("suite") != "real" for d in files)
    tables = [table(paths)] if workloads else []
    tables += [t for t in (onnx_table(paths), onnx_errors_table(paths), real_table(paths),
                           latency_table(paths)) if t]
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
