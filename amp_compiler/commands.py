"""The ``amp-compiler`` subcommands: what ``convert``, ``report``, ``inspect``, ``export`` and
``demo`` do with their parsed arguments (``amp_compiler.cli`` parses and dispatches).

Each command takes the ``argparse.Namespace`` and a rich ``Console`` and returns the exit code;
bad input is an ``AmpCompilerError`` (the CLI prints it as one line and exits with 2). TARGET
is loaded by ``amp_compiler.targets``; outputs are written all or nothing by
``amp_compiler.outputs``. An ``.onnx`` TARGET goes through ``convert_onnx`` and gives an
``OnnxConversion``, which the report and the pictures read as they read an ``AmpModule``.

    >>> args = amp_compiler.cli.build_parser().parse_args(["convert", "mlp", "--out", "out/mlp"])
    >>> convert_command(args, Console())
    0
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from torch import nn

import amp_compiler.demo as demo
from amp_compiler.calibration_files import load_calibration
from amp_compiler.convert import convert
from amp_compiler.errors import ConfigError
from amp_compiler.outputs import StagedFolder, file_destination, os_errors, remove_empty, write_file
from amp_compiler.passes.dtypes import dtype_name
from amp_compiler.passes.plan import PrecisionPlan
from amp_compiler.targets import Loaded, load_target
from amp_compiler.view.casts import derive_casts
from amp_compiler.view.render import render
from amp_compiler.view.report import literal, plan_table

log = logging.getLogger("amp_compiler")


# -- converting TARGET ---------------------------------------------------------------------------

def _load(args) -> Loaded:
    return load_target(args.target, size=args.size, example_shape=args.example_shape,
                       device=args.device)


def _overrides(items: Sequence[str]) -> tuple:
    """Strings from the command line; a dotted name that imports to an nn.Module class (e.g.
    torch.nn.LayerNorm) becomes that class, anything else stays a kind / glob / node name."""
    out: list = []
    for item in items:
        # a regex is one entry whatever it holds ("re:a{1,2}"): never split at its commas
        for text in ((item,) if item.startswith("re:") else (t for t in item.split(",") if t)):
            module_name, _, cls = text.rpartition(".")
            if module_name and cls[:1].isupper() and "*" not in text:
                with contextlib.suppress(ImportError, ValueError):
                    obj = getattr(importlib.import_module(module_name), cls, None)
                    if isinstance(obj, type) and issubclass(obj, nn.Module):
                        out.append(obj)
                        continue
            out.append(text)
    return tuple(out)


def _convert(args, loaded: Loaded):
    """The AmpModule of a PyTorch TARGET, or the OnnxConversion of an .onnx one."""
    if loaded.onnx_path is not None:
        result = _convert_onnx(args, loaded)
    else:
        used = [flag for flag, value in (("--calibration", args.calibration),
                                         ("--opset", args.opset),
                                         ("--max-reduction-depth", args.max_reduction_depth),
                                         ("--keep-io-types / --no-keep-io-types", args.keep_io_types),
                                         ("--embedding-tables", args.embedding_tables),
                                         ("--islands", args.islands),
                                         ("--island-tolerance", args.island_tolerance),
                                         ("--fp64", args.fp64))
                if value is not None]
        if used:
            raise ConfigError(f"{used[0]} applies to .onnx targets only; {args.target!r} is a "
                              f"PyTorch model")
        result = convert(loaded.model, loaded.example_inputs, dtype=args.dtype,
                         training=bool(args.training), keep_fp32=_overrides(args.keep_fp32),
                         force_low=_overrides(args.force_low))
    if log.isEnabledFor(logging.INFO):
        _log_changes(result)
    return result


def _log_changes(amp) -> None:
    """-v: what the analyses decided (nodes per rule) and what the rewrite added (casts)."""
    rules = Counter(d.rule for d in amp.plan.values())
    log.info("decisions by rule: %s", ", ".join(f"{r} x{n}" for r, n in sorted(rules.items())))
    casts = Counter((dtype_name(c.dtype), bool(c.is_param)) for c in amp.casts)
    log.info("casts in the graph: %s", ", ".join(
        f"{n} to {dt}{' (parameters)' if p else ''}" for (dt, p), n in sorted(casts.items())) or "none")


@dataclass
class OnnxConversion:
    """An ONNX file converted by ``convert_onnx``, with what the report and the pictures read:
    the plan, the dataflow graph of the source file, and the casts the plan implies."""

    model: Any            # the converted onnx.ModelProto
    plan: Any
    _dataflow: Any
    casts: list
    low_dtype: Any
    folded: bool = True   # initializers are stored in low precision
    training: bool = False


def _convert_onnx(args, loaded: Loaded) -> OnnxConversion:
    try:  # the ONNX component is optional
        from amp_compiler.onnx.convert import convert_onnx, convert_opset
        from amp_compiler.onnx.frontend import build_onnx_dataflow, load_model, prepare
    except ImportError as e:
        raise ConfigError(f"{loaded.onnx_path}: converting ONNX files needs "
                          f"amp_compiler.onnx.frontend, which is not available ({e})") from e
    calibration = None if args.calibration is None else load_calibration(args.calibration)
    keep_io = True if args.keep_io_types is None else args.keep_io_types
    model, plan = convert_onnx(str(loaded.onnx_path), dtype=args.dtype,
                               keep_fp32=_overrides(args.keep_fp32),
                               force_low=_overrides(args.force_low), calibration=calibration,
                               keep_io_types=keep_io, opset=args.opset, return_plan=True,
                               max_reduction_depth=args.max_reduction_depth,
                               embedding_tables=args.embedding_tables or "shared",
                               islands=args.islands or "keep",
                               island_tolerance=0.05 if args.island_tolerance is None else args.island_tolerance,
                               fp64=args.fp64 or "keep")
    # the front end's own description of the source file: the same vertex names as the plan
    source = load_model(str(loaded.onnx_path))
    if args.opset is not None:
        source = convert_opset(source, args.opset, loaded.onnx_path)
    df = build_onnx_dataflow(prepare(source), low=plan.low_dtype, keep_io_types=keep_io).graph
    return OnnxConversion(model, plan, df, derive_casts(plan, df), plan.low_dtype)


def _onnx_cast_list(model) -> list[dict]:
    """The Cast nodes of a converted ONNX model, in the shape plan.meta["casts"] uses."""
    import onnx  # the ONNX component is optional; an ONNX model in hand means it is there

    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for v in n.input:
            consumers.setdefault(v, []).append(n.name)
    outputs = {o.name for o in model.graph.output}
    casts = []
    for n in model.graph.node:
        if n.op_type != "Cast":
            continue
        to = next(a.i for a in n.attribute if a.name == "to")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(to).name
        users = consumers.get(n.output[0], []) + (["output"] if n.output[0] in outputs else [])
        casts.append({"node": n.name, "source": n.input[0],
                      "dtype": {"float16": "float16", "float32": "float32"}.get(dtype, dtype),
                      "consumers": users, "is_param": False})
    return casts


# -- what the commands write ---------------------------------------------------------------------

def _with_casts(plan, casts: list[dict]) -> PrecisionPlan:
    """``plan`` with ``casts`` in its ``meta`` (so ``report --only casts`` works from the JSON
    alone); the decisions are the same objects."""
    return plan.with_meta(casts=casts)


def plan_with_casts(amp):
    """``amp.plan`` with the cast list in its ``meta`` (so ``report --only casts`` works from
    the JSON alone); the decisions are the same objects."""
    return _with_casts(amp.plan, [{"node": c.node, "source": c.source, "dtype": dtype_name(c.dtype),
                                   "consumers": list(c.consumers), "is_param": bool(c.is_param)}
                                  for c in amp.casts])


def _render_text(renderable, width: int = 160) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False,
            legacy_windows=False).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def _onnx_export_fn():
    from amp_compiler.onnx.export import export_onnx  # noqa: F401 - optional component
    return export_onnx


def _numbers_line(loaded: Loaded, amp) -> str | None:
    """amp and autocast vs fp32 on the example inputs (inference conversions only)."""
    if loaded.example_inputs is None or amp.training:
        return None
    was = loaded.model.training
    loaded.model.eval()
    try:
        n = demo.compare_outputs(loaded.model, amp, loaded.example_inputs, amp.low_dtype)
    finally:
        loaded.model.train(was)
    if n["autocast_unavailable"]:
        return (f"max relative error vs fp32 on the example inputs: {n['error_amp']:.2e}; casts "
                f"per forward: {n['casts_amp']} (no torch.autocast comparison: "
                f"{n['autocast_unavailable']})")
    return (f"max relative error vs fp32 on the example inputs: {n['error_amp']:.2e} "
            f"(torch.autocast: {n['error_autocast']:.2e}); casts per forward: {n['casts_amp']} "
            f"(torch.autocast: {n['casts_autocast']})")


def _write_onnx(amp, loaded: Loaded, path: Path) -> list[str]:
    try:
        export_onnx = _onnx_export_fn()
    except ImportError as e:
        return [f"model.onnx not written: ONNX export is not available ({e}); --no-onnx skips it"]
    if loaded.example_inputs is None:
        return ["model.onnx not written: ONNX export needs example inputs; pass --example-shape"]
    if amp.training:
        amp = amp.eval()  # ONNX is for inference: export the eval graph of the same plan
    export_onnx(amp, loaded.example_inputs, str(path))  # into the fresh staging folder
    return []


# -- the commands --------------------------------------------------------------------------------

def convert_command(args, console) -> int:
    """``amp-compiler convert``: plan.json, report.txt, graph.py and model.onnx into --out."""
    loaded = _load(args)
    out = Path(args.out or f"amp-{Path(loaded.name).stem}")
    if loaded.onnx_path is not None:
        return _convert_onnx_files(args, loaded, out, console)
    names = ["plan.json", "report.txt", "graph.py"] + ([] if args.no_onnx else ["model.onnx"])
    # all or nothing: a failing step (the ONNX export, say) leaves no half-written folder
    with StagedFolder(out, names, args.overwrite) as staged:
        amp = _convert(args, loaded)
        (staged.path / "plan.json").write_text(plan_with_casts(amp).to_json(indent=1) + "\n")
        report = (_render_text(amp.report(print_=False))
                  + _render_text(amp.report(only="casts", print_=False)))
        (staged.path / "report.txt").write_text(report)
        (staged.path / "graph.py").write_text(
            f"# {args.target}: graph rewritten by amp_compiler "
            f"({args.dtype}, {'training' if amp.training else 'inference'})\n"
            + amp.graph_module.code.lstrip("\n"))
        notes = [] if args.no_onnx else _write_onnx(amp, loaded, staged.path / "model.onnx")
    console.print(f"[bold]{literal(args.target)}[/] -> {literal(str(out))}/  ({args.dtype}, "
                  f"{'training' if amp.training else 'inference'})")
    console.print("  " + amp.report(print_=False).caption)
    line = _numbers_line(loaded, amp)
    if line:
        console.print("  " + literal(line))
    for path in staged.written:
        console.print(f"  wrote {literal(str(path))}")
    for note in notes:
        console.print(f"  [yellow]{literal(note)}[/]")
    return 0


def _convert_onnx_files(args, loaded: Loaded, out: Path, console) -> int:
    """``amp-compiler convert model.onnx``: plan.json, report.txt and model.onnx into --out."""
    from amp_compiler.onnx.io import save_model  # the ONNX component is optional

    with StagedFolder(out, ["plan.json", "report.txt", "model.onnx"], args.overwrite) as staged:
        conv = _convert(args, loaded)
        plan = _with_casts(conv.plan, _onnx_cast_list(conv.model))
        (staged.path / "plan.json").write_text(plan.to_json(indent=1) + "\n")
        (staged.path / "report.txt").write_text(_render_text(plan_table(plan))
                                                + _render_text(plan_table(plan, only="casts")))
        save_model(conv.model, staged.path / "model.onnx")
    console.print(f"[bold]{literal(args.target)}[/] -> {literal(str(out))}/  ({args.dtype})")
    console.print("  " + plan_table(plan).caption)
    for path in staged.written:
        console.print(f"  wrote {literal(str(path))}")
    return 0


def report_command(args, console) -> int:
    """``amp-compiler report``: the table of a saved plan.json, or of TARGET converted."""
    if args.width:
        console.width = args.width
    if args.target.lower().endswith(".json"):
        path = Path(args.target)
        if not path.is_file():
            raise ConfigError(f"plan file {args.target!r} does not exist")
        try:
            text = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read plan file {args.target!r} ({e.strerror})") from None
        # a malformed plan is a PlanError (an AmpCompilerError) naming the place in the file
        plan = PrecisionPlan.from_json(text, source=args.target)
        console.print(plan_table(plan, only=args.only, why=args.why))
        return 0
    amp = _convert(args, _load(args))
    if isinstance(amp, OnnxConversion):
        plan = _with_casts(amp.plan, _onnx_cast_list(amp.model))
        console.print(plan_table(plan, only=args.only, why=args.why))
    else:
        console.print(amp.report(only=args.only, why=args.why, print_=False))
    return 0


def inspect_command(args, console) -> int:
    """``amp-compiler inspect``: TARGET's graph drawn (svg, html, dot, mermaid)."""
    loaded = _load(args)
    amp = _convert(args, loaded)
    size = f" ({args.size})" if loaded.onnx_path is None and ":" not in args.target else ""
    title = f"{loaded.name}{size}: {args.dtype} plan"
    text = render(amp, args.format, collapse=args.collapse, title=title, engine=args.layout,
                  show_params=args.params)
    out = args.out
    if out is None:
        out = "-" if args.format in ("dot", "mermaid") else f"{Path(loaded.name).stem}-graph.{args.format}"
    if out == "-":
        sys.stdout.write(text)
        return 0
    path = Path(out)
    created = file_destination(path, args.overwrite)
    try:
        write_file(path, text)
    except BaseException:
        remove_empty(created)
        raise
    console.print(f"wrote {literal(str(path))} ({args.format}, {len(text) // 1024} KB)")
    return 0


def export_command(args, console) -> int:
    """``amp-compiler export``: TARGET converted and exported to one .onnx file."""
    loaded = _load(args)
    if loaded.onnx_path is not None:
        raise ConfigError(f"{args.target} is already ONNX; use `amp-compiler convert` on it")
    path = Path(args.out)
    if loaded.example_inputs is None:
        raise ConfigError("ONNX export needs example inputs: pass --example-shape (e.g. 8x784)")
    try:  # the ONNX component is optional
        from amp_compiler.onnx.export import export_onnx
    except ImportError as e:
        raise ConfigError(f"ONNX export is not available in this install ({e})") from e
    created = file_destination(path, args.overwrite)
    try:
        amp = _convert(args, loaded)
        if amp.training:
            amp = amp.eval()  # ONNX is for inference: the eval graph of the same plan
        with os_errors(path):
            export_onnx(amp, loaded.example_inputs, str(path), overwrite=args.overwrite)
    except BaseException:
        remove_empty(created)
        raise
    console.print(f"wrote {literal(str(path))} ({args.dtype}, {amp.cast_count()} casts in the "
                  f"torch graph)")
    if args.verify:
        from amp_compiler.onnx.session import verify_onnx  # the optional ONNX component, as above

        loaded.model.eval()
        result = verify_onnx(str(path), loaded.model, loaded.example_inputs)
        console.print(f"  ONNX Runtime vs fp32: {literal(result if result is not None else 'ok')}")
    return 0


def demo_command(args, console) -> int:
    """``amp-compiler demo``: the main job end to end; exit 1 when a step failed."""
    figures = demo.run_demo(quick=args.quick, console=console)
    failed = [k for k, v in figures.items() if isinstance(v, dict) and "failed" in v]
    return 1 if failed else 0
