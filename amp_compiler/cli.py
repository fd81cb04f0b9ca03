"""``amp-compiler``: the command line.

    $ amp-compiler demo                                  # the main job on built-in models
    $ amp-compiler convert gpt --dtype bfloat16 --out out/gpt
    $ amp-compiler report out/gpt/plan.json --only fp32
    $ amp-compiler inspect gpt --format html --out gpt.html
    $ amp-compiler export mypkg.models:make_model --example-shape 8x784 --out model.onnx
    $ amp-compiler bench --model gpt --size bench --mode train

TARGET is a reference model name (``amp_compiler.models.NAMES``), ``module.path:factory`` or
``file.py:factory`` (a callable returning an ``nn.Module`` or ``(model, example_inputs)``; an
``nn.Module`` instance works too), or an ``.onnx`` file.

Bad arguments or inputs (missing file, bad factory path, unknown model, invalid dtype, any
``AmpCompilerError``) print one line, ``amp-compiler: error: <message>``, and exit with code 2;
``-v`` logs each pipeline stage under the ``amp_compiler`` logger.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from amp_compiler.errors import AmpCompilerError, ConfigError
from amp_compiler.view.report import literal, visible

PROG = "amp-compiler"
log = logging.getLogger("amp_compiler")

# --example-shape element types
_INPUT_DTYPES = {"float32": "float32", "float": "float32", "float16": "float16",
                 "bfloat16": "bfloat16", "int64": "int64", "long": "int64", "int32": "int32",
                 "int": "int64", "bool": "bool"}


class _UsageError(Exception):
    """argparse's complaints, turned into our one-line error instead of usage + exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise _UsageError(message)


# -- argument types ------------------------------------------------------------------------------

def _dtype_arg(text: str) -> str:
    """convert()'s own dtype spellings, returned as the name the plan uses."""
    from amp_compiler.convert import resolve_dtype
    from amp_compiler.passes.plan import dtype_name

    try:
        return dtype_name(resolve_dtype(text))
    except ConfigError:
        raise argparse.ArgumentTypeError(f"invalid dtype {text!r}: use float16 or bfloat16") from None


def _collapse_arg(text: str) -> str | int:
    if text in ("auto", "none"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"invalid collapse {text!r}: use auto, none or a module-path "
                                     f"depth N >= 1")


def _depth_arg(text: str) -> int:
    if text.strip().isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"invalid reduction depth {text!r}: give the number of "
                                     f"products summed per output value, such as 4096")


def _tolerance_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value >= 0 and value != float("inf"):
        return value
    raise argparse.ArgumentTypeError(f"invalid island tolerance {text!r}: give the relative error "
                                     f"growth allowed, such as 0.05")


def _opset_arg(text: str) -> int:
    if text.strip().isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"invalid opset {text!r}: give an ONNX opset number such "
                                     f"as 17")


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    dtype: str = "float32"


def _shape_arg(text: str) -> InputSpec:
    """``8x784``, ``8,784`` or ``2x32:int64``."""
    body, _, dt = text.partition(":")
    dt = dt or "float32"
    if dt.lower() not in _INPUT_DTYPES:
        raise argparse.ArgumentTypeError(f"invalid input dtype {dt!r} in {text!r}: use one of "
                                         f"{', '.join(sorted(set(_INPUT_DTYPES.values())))}")
    parts = body.replace(",", "x").split("x")
    if not body or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: write it like 8x784 or "
                                         f"2x32:int64")
    return InputSpec(tuple(int(p) for p in parts), _INPUT_DTYPES[dt.lower()])


# -- the parser ----------------------------------------------------------------------------------

def _model_names() -> str:
    try:
        from amp_compiler.models import NAMES
        return ", ".join(NAMES)
    except ImportError:  # the reference models are an optional part of the install
        return "(reference models not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``amp-compiler`` argument parser (every subcommand has ``--help``)."""
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                         help="log each pipeline stage and what it changed (-vv: debug)")

    target = _Parser(add_help=False)
    target.add_argument("target", metavar="TARGET",
                        help=f"reference model name ({_model_names()}), module.path:factory or "
                             f"file.py:factory, or an .onnx file")
    opts = target.add_argument_group("conversion options")
    opts.add_argument("--dtype", type=_dtype_arg, default="float16", metavar="{float16,bfloat16}",
                      help="low precision: float16 (default) or bfloat16")
    opts.add_argument("--size", choices=("tiny", "small", "bench"), default="tiny",
                      help="reference model size (default tiny)")
    opts.add_argument("--example-shape", type=_shape_arg, nargs="+", metavar="SHAPE",
                      help="example inputs, one shape each: 8x784 or 2x32:int64 (random "
                           "floats, zero integers); replaces a reference model's own inputs")
    opts.add_argument("--keep-fp32", nargs="+", action="extend", default=[], metavar="RULE",
                      help="keep these in fp32: op kinds (softmax), module-path globs "
                           "(blocks.*.ln1), node names, node-name regexes (re:/attn/.*MatMul, "
                           "matched anywhere in the name), or module classes (torch.nn.LayerNorm)")
    opts.add_argument("--force-low", nargs="+", action="extend", default=[], metavar="RULE",
                      help="force these to low precision (same forms; --keep-fp32 wins)")
    opts.add_argument("--training", action="store_true",
                      help="convert for training (fp32 master weights, loss scaling for "
                           "float16); default: inference, weights cast once")
    opts.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="where the model is built and converted (default cpu)")
    onnx_opts = target.add_argument_group("ONNX options (TARGET is an .onnx file)")
    onnx_opts.add_argument("--calibration", metavar="PATH",
                           help="calibration data: a folder of .npz files (one sample each, "
                                "arrays keyed by graph-input name), one .npz whose arrays have a "
                                "leading sample axis, or a Polygraphy data-loader JSON file (a "
                                "list of {input: array}); float16: nodes whose values leave its "
                                "range stay fp32 (rule O3)")
    onnx_opts.add_argument("--keep-io-types", action=argparse.BooleanOptionalAction, default=None,
                           help="keep graph inputs/outputs in their source dtype (default); "
                                "--no-keep-io-types makes floating ones the low dtype")
    onnx_opts.add_argument("--opset", type=_opset_arg, metavar="N",
                           help="write the model at default-domain opset N (the source is "
                                "converted with onnx.version_converter first)")
    onnx_opts.add_argument("--max-reduction-depth", type=_depth_arg, metavar="N",
                           help="MatMul / Gemm / Conv nodes that sum more than N products per "
                                "output value stay fp32 (rule O5; for back ends that accumulate "
                                "in float16, such as TensorRT); default: off")
    onnx_opts.add_argument("--embedding-tables", choices=("shared", "low", "fp32"), default=None,
                           help="Gather tables: shared (default: a table a low node also reads, "
                                "GPT-2's tied embedding, stored once low), low (every table low: "
                                "the smallest file), fp32 (rule O8)")
    onnx_opts.add_argument("--islands", choices=("keep", "measure"), default=None,
                           help="measure: each fp32 island goes low where ONNX Runtime measures "
                                "that it saves Casts within --island-tolerance of the error, on "
                                "--calibration or generated samples (rule O9); default keep")
    onnx_opts.add_argument("--fp64", choices=("keep", "fp32"), default=None,
                           help="fp32: float64 values computed in float32, float64 inputs and "
                                "outputs cast at the border (rule O12; ModelOpt's clean-up); "
                                "default keep")
    onnx_opts.add_argument("--island-tolerance", type=_tolerance_arg, default=None, metavar="R",
                           help="relative error growth an island trade may cost (default 0.05)")

    parser = _Parser(prog=PROG,
                     description="Compiler-pass automatic mixed precision for PyTorch: plan the "
                                 "precision of every node on the whole graph, bake explicit "
                                 "casts, report why, export to ONNX.",
                     epilog="`amp-compiler COMMAND --help` describes each command.")
    # its own -v (not the parent's action object, whose SUPPRESS default the subcommands need)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log each pipeline stage and what it changed (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("convert", parents=[verbose, target], help="convert a model; write plan, "
                       "report, graph and ONNX files",
                       description="Convert TARGET and write into --out: plan.json (the "
                                   "PrecisionPlan), report.txt (every node's precision and why), "
                                   "graph.py (the rewritten FX code, casts explicit) and "
                                   "model.onnx (unless --no-onnx).")
    p.add_argument("--out", metavar="DIR", help="output folder (default ./amp-<target>)")
    p.add_argument("--no-onnx", action="store_true", help="do not write model.onnx")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")

    p = sub.add_parser("report", parents=[verbose, target],
                       help="the precision table of a saved plan.json (or of a model)",
                       description="Show the table of a plan saved by `amp-compiler convert` "
                                   "(TARGET = plan.json), or convert TARGET and show its report.")
    p.add_argument("--only", choices=("fp32", "low", "casts", "unknown"),
                   help="only the nodes kept in fp32 / in low precision / the casts / unknown ops")
    p.add_argument("--why", metavar="NODE", help="one node's whole decision")
    p.add_argument("--width", type=int, default=None, help="table width (default: the terminal)")

    p = sub.add_parser("inspect", parents=[verbose, target],
                       help="draw the graph coloured by precision (svg, html, dot, mermaid)",
                       description="Draw TARGET's graph: low-precision nodes green, fp32 orange, "
                                   "fp32-accumulating nodes outlined, casts purple hexagons, "
                                   "edges carrying a cast purple; big graphs collapsed by module.")
    p.add_argument("--format", choices=("svg", "html", "dot", "mermaid"), default="html",
                   help="output format (default html: one offline page with hover tooltips)")
    p.add_argument("--out", metavar="FILE",
                   help="output file; '-' for stdout (default: stdout for dot/mermaid, "
                        "./<target>-graph.<format> for svg/html)")
    p.add_argument("--collapse", type=_collapse_arg, default="auto", metavar="auto|none|N",
                   help="group nodes by the first N parts of their module path (auto: only "
                        "past 150 boxes)")
    p.add_argument("--params", action="store_true", help="draw parameters and their casts too")
    p.add_argument("--layout", choices=("auto", "dot", "builtin"), default="auto",
                   help="svg/html layout: graphviz `dot` when installed (auto), or built-in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = sub.add_parser("export", parents=[verbose, target],
                       help="convert and export to ONNX (explicit Casts)",
                       description="Convert TARGET and export it to ONNX with explicit Cast "
                                   "nodes and low-precision initializers.")
    p.add_argument("--out", metavar="FILE", required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--verify", action="store_true",
                   help="run the file in ONNX Runtime and compare with the fp32 model")

    sub.add_parser("bench", add_help=False, help="fp32 vs torch.autocast vs amp_compiler, "
                   "side by side (see `amp-compiler bench --help`)")

    p = sub.add_parser("demo", parents=[verbose], help="the main job end to end on built-in "
                       "models and data",
                       description="Convert the built-in gpt and compare with fp32 and "
                                   "torch.autocast; train an mlp on digits in fp16 with loss "
                                   "scaling beside fp32; export to ONNX and run it in ONNX "
                                   "Runtime.")
    p.add_argument("--quick", action="store_true", help="smaller models, fewer epochs")
    return parser


# -- loading a TARGET ----------------------------------------------------------------------------

@dataclass
class Loaded:
    """What TARGET names: a model and its example inputs, or an ONNX file."""

    name: str
    model: Any = None
    example_inputs: tuple | None = None
    onnx_path: Path | None = None


def _make_inputs(specs: Sequence[InputSpec], device: str) -> tuple:
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for s in specs:
        dtype = getattr(torch, s.dtype)
        if dtype.is_floating_point:
            t = torch.randn(s.shape, generator=gen).to(dtype)
        else:  # zero is a valid index, mask and class label for any model
            t = torch.zeros(s.shape, dtype=dtype)
        out.append(t.to(device))
    return tuple(out)


def _exec_file(path: Path, spec: str):
    """Run ``path`` as a module, as ``python path`` would: its folder first on ``sys.path`` (it
    imports its sibling modules) and the module in ``sys.modules`` while it runs (``@dataclass``
    and pickling look their module up there by name). The folder stays on the path: a factory
    or a forward may import siblings later."""
    path = path.resolve()
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = path.stem
    taken = sys.modules.get(name)
    if not name.isidentifier() or (taken is not None and getattr(taken, "__file__", None) != str(path)):
        # another module of that name (a user's "torch.py", "models.py"...): do not replace it
        name = f"_amp_factory_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if not isinstance(e, Exception):
            raise
        raise ConfigError(f"bad factory {spec!r}: running {spec.rpartition(':')[0]} raised "
                          f"{type(e).__name__}: {e}") from e
    return module


def _import_factory(spec: str):
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"bad factory {spec!r}: write module.path:factory or file.py:factory")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"bad factory {spec!r}: file {module_name!r} does not exist")
        module = _exec_file(path, spec)
    else:
        # the user's own package is usually in the current folder, not installed
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"bad factory {spec!r}: cannot import {module_name!r} ({e})") from e
        except Exception as e:
            raise ConfigError(f"bad factory {spec!r}: importing {module_name} raised "
                              f"{type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(os.getcwd())
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"bad factory {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_target(target: str, *, size: str = "tiny", example_shape=None,
                device: str = "cpu") -> Loaded:
    """Resolve TARGET (reference model name, ``module:factory``, ``file.py:factory`` or
    ``.onnx``) into a model and example inputs; every failure is a ConfigError.

    Example:
        >>> loaded = load_target("mlp")
        >>> type(loaded.model).__name__, loaded.example_inputs[0].shape
        ('MLP', torch.Size([8, 784]))
    """
    import torch
    from torch import nn

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
    if target.lower().endswith(".onnx"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"ONNX file {target!r} does not exist")
        return Loaded(path.stem, onnx_path=path)
    inputs = _make_inputs(example_shape, device) if example_shape else None
    if ":" in target and not Path(target).exists():
        obj = _import_factory(target)
        if not isinstance(obj, nn.Module):
            if not callable(obj):
                raise ConfigError(f"bad factory {target!r}: {type(obj).__name__} is neither an "
                                  f"nn.Module nor callable")
            try:
                obj = obj()
            except Exception as e:
                raise ConfigError(f"factory {target!r} raised {type(e).__name__}: {e}") from e
        model, own = obj, None
        if isinstance(obj, tuple) and len(obj) == 2:
            model, own = obj
            own = own if isinstance(own, tuple) else (own,)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"factory {target!r} returned {type(obj).__name__}; return an "
                              f"nn.Module or (model, example_inputs)")
        model = model.to(device)
        if own is not None:
            own = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in own)
        return Loaded(target.rpartition(":")[2], model, inputs or own)
    if Path(target).exists():
        raise ConfigError(f"{target!r} is a file or folder but not an .onnx model; give a "
                          f"reference model name, module.path:factory or file.py:factory")
    try:
        from amp_compiler.models import UnknownModelError, build
    except ImportError as e:
        raise ConfigError(f"{target!r}: the reference models are not installed ({e})") from e
    try:
        model, own = build(target, size, device=device)
    except UnknownModelError as e:
        hint = " (no such file either)" if ("/" in target or "." in target) else ""
        raise ConfigError(f"{e}{hint}; or give module.path:factory or an .onnx file") from None
    return Loaded(target, model, inputs or own)


def _overrides(items: Sequence[str]) -> tuple:
    """Strings from the command line; a dotted name that imports to an nn.Module class (e.g.
    torch.nn.LayerNorm) becomes that class, anything else stays a kind / glob / node name."""
    from torch import nn

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
    import amp_compiler as ac

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
        result = ac.convert(loaded.model, loaded.example_inputs, dtype=args.dtype,
                            training=bool(args.training), keep_fp32=_overrides(args.keep_fp32),
                            force_low=_overrides(args.force_low))
    if log.isEnabledFor(logging.INFO):
        _log_changes(result)
    return result


def _log_changes(amp) -> None:
    """-v: what the analyses decided (nodes per rule) and what the rewrite added (casts)."""
    from collections import Counter

    from amp_compiler.passes.plan import dtype_name

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
    try:
        from amp_compiler.onnx.frontend import (build_onnx_dataflow, convert_onnx, load_model,
                                                prepare)
    except ImportError as e:
        raise ConfigError(f"{loaded.onnx_path}: converting ONNX files needs "
                          f"amp_compiler.onnx.frontend, which is not available ({e})") from e
    from amp_compiler.view.inspect import derive_casts

    from amp_compiler.onnx.frontend import convert_opset

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


def _decode_polygraphy_array(value, where: str):
    """One array of a Polygraphy JSON file: ``{"array": base64 of np.save bytes,
    "polygraphy_class": "ndarray"}`` (``polygraphy.json``; older files latin-1 text, or an
    .npz archive holding one array)."""
    import base64
    import binascii

    import numpy as np

    if not isinstance(value, dict) or not isinstance(value.get("array"), str):
        raise ConfigError(f"{where} is not a Polygraphy-encoded array (expected "
                          f"{{\"array\": <base64 .npy>, \"polygraphy_class\": \"ndarray\"}})")
    text = value["array"]
    try:
        data = base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        data = text.encode("latin-1", errors="replace")  # Polygraphy's older encoding
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 -- not .npy / .npz bytes
        raise ConfigError(f"{where}: the array data is not a readable .npy payload "
                          f"({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive: its first array
        arr = arr[arr.files[0]]
    return arr


def load_calibration(path_text: str) -> list[dict]:
    """``--calibration PATH`` as a list of samples (dicts graph-input name -> array): a folder of
    ``.npz`` files (one sample each, in file-name order), one ``.npz`` whose arrays share a
    leading sample axis, or a Polygraphy data-loader JSON file (a list of feed dicts whose
    arrays are Polygraphy-encoded, as ``polygraphy run --save-inputs`` writes them)."""
    import json

    import numpy as np

    path = Path(path_text)
    what = f"--calibration {path_text!r}"

    def read_npz(p: Path) -> dict:
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 -- not a zip, pickled objects, truncated
            raise ConfigError(f"{what}: {p} is not a readable .npz file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None

    if not path.exists():
        raise ConfigError(f"{what} does not exist; give a folder of .npz files, an .npz file or "
                          f"a Polygraphy .json data file")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npz" and p.is_file())
        if not files:
            raise ConfigError(f"{what} is a folder with no .npz files (one sample per file, "
                              f"arrays keyed by graph-input name)")
        samples = [read_npz(p) for p in files]
    elif path.suffix.lower() == ".npz":
        arrays = read_npz(path)
        lengths = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
        if not arrays or None in lengths.values() or len(set(lengths.values())) != 1:
            raise ConfigError(f"{what}: the arrays of a single .npz need one leading sample axis "
                              f"of the same length; got shapes "
                              f"{ {k: list(a.shape) for k, a in arrays.items()} }")
        n = next(iter(lengths.values()))
        samples = [{k: a[i] for k, a in arrays.items()} for i in range(n)]
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{what} is not readable JSON ({' '.join(str(e).split())[:200]})") from None
        if isinstance(data, dict) and "polygraphy_class" not in data:
            data = [data]  # one feed dict alone
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise ConfigError(f"{what}: a Polygraphy data file is a JSON list of "
                              f"{{input_name: array}} objects")
        samples = [{k: _decode_polygraphy_array(v, f"{what}: sample {i}, input {k!r}")
                    for k, v in d.items()} for i, d in enumerate(data)]
    else:
        raise ConfigError(f"{what}: use a folder of .npz files, an .npz file or a Polygraphy "
                          f".json data file")
    if not samples:
        raise ConfigError(f"{what} holds no samples")
    return samples


def _onnx_cast_list(model) -> list[dict]:
    """The Cast nodes of a converted ONNX model, in the shape plan.meta["casts"] uses."""
    import onnx

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


# -- output helpers ------------------------------------------------------------------------------

def _render_text(renderable, width: int = 160) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False,
            legacy_windows=False).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    # lexists: a link counts even when it dangles (writing through it would create its target)
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists"
                          + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else "")
                          + "; pass --overwrite to replace")
    folders = [p for p in existing if p.is_dir() and not p.is_symlink()]
    if folders:
        raise ConfigError(f"{folders[0]} is a folder; remove it or choose another --out")


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """A file system refusal (read-only, /proc, a file where a folder should be) is bad input:
    one line naming the path, exit 2."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror or e}); choose another --out") from e


def _make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first (to undo on failure)."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    with _os_errors(missing[0] if missing else folder):
        for f in reversed(missing):
            f.mkdir()
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    for f in folders:
        with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
            f.rmdir()


def _file_destination(path: Path, overwrite: bool) -> list[Path]:
    """Check ``--out FILE`` before the slow part: not a folder, not existing (without
    --overwrite), its folder creatable and writable. Returns the folders it created."""
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; name a file in it")
    _refuse_existing([path], overwrite)
    created = _make_folders(path.parent)
    try:
        with _os_errors(path):
            tempfile.TemporaryDirectory(dir=path.parent, prefix=".amp_probe_").cleanup()
    except ConfigError:
        _remove_empty(created)
        raise
    return created


def _write_file(path: Path, text: str) -> None:
    """Atomically (temporary file, fsync, os.replace): a link at ``path`` is replaced, not
    followed, and a failure leaves the old file or none."""
    from amp_compiler.onnx.export import replacing

    with _os_errors(path), replacing(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


class _StagedFolder:
    """An all-or-nothing output folder: files are written into a staging folder (``.path``) and
    moved into ``out`` only when the block succeeds; on failure ``out`` is as it was.

    A new ``out`` is the staging folder renamed (one step); into an existing folder each file is
    ``os.replace``d (a link there is replaced, never followed). ``written`` lists the files moved.
    """

    def __init__(self, out: Path, names: Sequence[str], overwrite: bool) -> None:
        if os.path.lexists(out) and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder; give a folder path")
        _refuse_existing([out / n for n in names], overwrite)
        self.out, self.written = out, []
        self._created = [] if out.is_dir() else _make_folders(out.parent)
        # inside an existing folder (it may be a link to another file system), else beside it
        where, prefix = (out, ".amp_staging_") if out.is_dir() else (out.parent, f".{out.name}.amp_staging_")
        try:
            with _os_errors(out):
                self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
                mask = os.umask(0)
                os.umask(mask)
                os.chmod(self.path, 0o777 & ~mask)  # it may become ``out``: a normal folder's mode
        except ConfigError:
            _remove_empty(self._created)
            raise

    def __enter__(self) -> "_StagedFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        committed = False
        try:
            if exc_type is None:
                with _os_errors(self.out):
                    self._commit()
                committed = True
        finally:
            shutil.rmtree(self.path, ignore_errors=True)  # gone already when renamed to ``out``
            if not committed:
                _remove_empty(self._created)

    def _commit(self) -> None:
        from amp_compiler.onnx.export import fsync_path

        staged = sorted(p.name for p in self.path.iterdir())
        for name in staged:
            fsync_path(self.path / name)
        if not os.path.lexists(self.out):
            os.rename(self.path, self.out)
        else:
            for name in staged:
                os.replace(self.path / name, self.out / name)
        fsync_path(self.out)
        self.written = [self.out / name for name in staged]


def plan_with_casts(amp):
    """``amp.plan`` with the cast list in its ``meta`` (so ``report --only casts`` works from
    the JSON alone); the decisions are the same objects."""
    from amp_compiler.passes.plan import PrecisionPlan, dtype_name

    casts = [{"node": c.node, "source": c.source, "dtype": dtype_name(c.dtype),
              "consumers": list(c.consumers), "is_param": bool(c.is_param)} for c in amp.casts]
    plan = amp.plan
    return PrecisionPlan(dict(plan.items()), low_dtype=plan.low_dtype,
                         device_type=plan.device_type, meta={**plan.meta, "casts": casts})


def _onnx_export_fn():
    from amp_compiler.onnx.export import export_onnx  # noqa: F401 - optional component
    return export_onnx


def _numbers_line(loaded: Loaded, amp) -> str | None:
    """amp and autocast vs fp32 on the example inputs (inference conversions only)."""
    if loaded.example_inputs is None or amp.training:
        return None
    from amp_compiler.demo import compare_outputs

    was = loaded.model.training
    loaded.model.eval()
    try:
        n = compare_outputs(loaded.model, amp, loaded.example_inputs, amp.low_dtype)
    finally:
        loaded.model.train(was)
    if n["autocast_unavailable"]:
        return (f"max relative error vs fp32 on the example inputs: {n['error_amp']:.2e}; casts "
                f"per forward: {n['casts_amp']} (no torch.autocast comparison: "
                f"{n['autocast_unavailable']})")
    return (f"max relative error vs fp32 on the example inputs: {n['error_amp']:.2e} "
            f"(torch.autocast: {n['error_autocast']:.2e}); casts per forward: {n['casts_amp']} "
            f"(torch.autocast: {n['casts_autocast']})")


# -- subcommands ---------------------------------------------------------------------------------

def _cmd_convert(args, console) -> int:
    loaded = load_target(args.target, size=args.size, example_shape=args.example_shape,
                         device=args.device)
    out = Path(args.out or f"amp-{Path(loaded.name).stem}")
    if loaded.onnx_path is not None:
        return _convert_onnx_files(args, loaded, out, console)
    names = ["plan.json", "report.txt", "graph.py"] + ([] if args.no_onnx else ["model.onnx"])
    # all or nothing: a failing step (the ONNX export, say) leaves no half-written folder
    with _StagedFolder(out, names, args.overwrite) as staged:
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


def _convert_onnx_files(args, loaded: Loaded, out: Path, console) -> int:
    from amp_compiler.view.inspect import plan_table
    from amp_compiler.onnx.export import save_model
    from amp_compiler.passes.plan import PrecisionPlan

    with _StagedFolder(out, ["plan.json", "report.txt", "model.onnx"], args.overwrite) as staged:
        conv = _convert(args, loaded)
        plan = conv.plan
        plan = PrecisionPlan(dict(plan.items()), low_dtype=plan.low_dtype,
                             device_type=plan.device_type,
                             meta={**plan.meta, "casts": _onnx_cast_list(conv.model)})
        (staged.path / "plan.json").write_text(plan.to_json(indent=1) + "\n")
        (staged.path / "report.txt").write_text(_render_text(plan_table(plan))
                                                + _render_text(plan_table(plan, only="casts")))
        save_model(conv.model, staged.path / "model.onnx")
    console.print(f"[bold]{literal(args.target)}[/] -> {literal(str(out))}/  ({args.dtype})")
    console.print("  " + plan_table(plan).caption)
    for path in staged.written:
        console.print(f"  wrote {literal(str(path))}")
    return 0


def _cmd_report(args, console) -> int:
    from amp_compiler.view.inspect import plan_table
    from amp_compiler.passes.plan import PrecisionPlan

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
    loaded = load_target(args.target, size=args.size, example_shape=args.example_shape,
                         device=args.device)
    amp = _convert(args, loaded)
    if isinstance(amp, OnnxConversion):
        plan = PrecisionPlan(dict(amp.plan.items()), low_dtype=amp.plan.low_dtype,
                             device_type=amp.plan.device_type,
                             meta={**amp.plan.meta, "casts": _onnx_cast_list(amp.model)})
        console.print(plan_table(plan, only=args.only, why=args.why))
    else:
        console.print(amp.report(only=args.only, why=args.why, print_=False))
    return 0


def _cmd_inspect(args, console) -> int:
    from amp_compiler.view.inspect import render

    loaded = load_target(args.target, size=args.size, example_shape=args.example_shape,
                         device=args.device)
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
    created = _file_destination(path, args.overwrite)
    try:
        _write_file(path, text)
    except BaseException:
        _remove_empty(created)
        raise
    console.print(f"wrote {literal(str(path))} ({args.format}, {len(text) // 1024} KB)")
    return 0


def _cmd_export(args, console) -> int:
    loaded = load_target(args.target, size=args.size, example_shape=args.example_shape,
                         device=args.device)
    if loaded.onnx_path is not None:
        raise ConfigError(f"{args.target} is already ONNX; use `amp-compiler convert` on it")
    path = Path(args.out)
    if loaded.example_inputs is None:
        raise ConfigError("ONNX export needs example inputs: pass --example-shape (e.g. 8x784)")
    try:
        from amp_compiler.onnx.export import export_onnx
    except ImportError as e:
        raise ConfigError(f"ONNX export is not available in this install ({e})") from e
    created = _file_destination(path, args.overwrite)
    try:
        amp = _convert(args, loaded)
        if amp.training:
            amp = amp.eval()  # ONNX is for inference: the eval graph of the same plan
        with _os_errors(path):
            export_onnx(amp, loaded.example_inputs, str(path), overwrite=args.overwrite)
    except BaseException:
        _remove_empty(created)
        raise
    console.print(f"wrote {literal(str(path))} ({args.dtype}, {amp.cast_count()} casts in the "
                  f"torch graph)")
    if args.verify:
        from amp_compiler.onnx.export import verify_onnx

        loaded.model.eval()
        result = verify_onnx(str(path), loaded.model, loaded.example_inputs)
        console.print(f"  ONNX Runtime vs fp32: {literal(result if result is not None else 'ok')}")
    return 0


def _cmd_demo(args, console) -> int:
    from amp_compiler.demo import run_demo

    figures = run_demo(quick=args.quick, console=console)
    failed = [k for k, v in figures.items() if isinstance(v, dict) and "failed" in v]
    return 1 if failed else 0


def _cmd_bench(argv: list[str]) -> int:
    try:
        from amp_compiler.bench.suite import main as bench_main
    except ImportError as e:
        print(f"{PROG}: error: the bench command is not available in this install ({e})",
              file=sys.stderr)
        return 2
    try:
        return int(bench_main(argv) or 0)
    except SystemExit as e:  # its argparse: --help, or a usage error it already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


_COMMANDS = {"convert": _cmd_convert, "report": _cmd_report, "inspect": _cmd_inspect,
             "export": _cmd_export, "demo": _cmd_demo}


@contextlib.contextmanager
def _logging(level: int) -> Iterator[None]:
    """Log records of the ``amp_compiler`` logger to stderr while the command runs."""
    if level <= 0:
        yield
        return
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if level > 1 else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


def _one_line(message: object) -> str:
    # messages quote the user's names and files: their control characters are shown, not run
    return " ".join(visible(message).split())


def main(argv: list[str] | None = None) -> int:
    """Run ``amp-compiler`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code:
    0 success, 2 bad arguments or inputs (one-line message on stderr), 1 anything else.

    Example:
        >>> main(["convert", "mlp", "--dtype", "bfloat16", "--out", "out/mlp", "--no-onnx"])
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # bench has its own parser: hand it everything after the word
    lead = 0
    while lead < len(argv) and argv[lead] in ("-v", "-vv", "--verbose"):
        lead += 1
    if lead < len(argv) and argv[lead] == "bench":
        with _logging(sum(2 if a == "-vv" else 1 for a in argv[:lead])):
            return _cmd_bench(argv[lead + 1:])

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise _UsageError(f"choose a command: {', '.join([*_COMMANDS, 'bench'])} "
                              f"(see {PROG} --help)")
    except _UsageError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    from rich.console import Console

    console = Console()
    with _logging(args.verbose):
        try:
            return _COMMANDS[args.command](args, console)
        except (AmpCompilerError, _UsageError) as e:
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - a bug: say so in one line, traceback with -v
            if args.verbose:
                raise
            print(f"{PROG}: internal error: {_one_line(f'{type(e).__name__}: {e}')} "
                  f"(run with -v for the traceback)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
