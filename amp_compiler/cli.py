"""``amp-compiler``: the command line -- its argument parser, and ``main`` handing each
command to the module that does it.

    $ amp-compiler demo                                  # the main job on built-in models
    $ amp-compiler convert gpt --dtype bfloat16 --out out/gpt
    $ amp-compiler report out/gpt/plan.json --only fp32
    $ amp-compiler inspect gpt --format html --out gpt.html
    $ amp-compiler export mypkg.models:make_model --example-shape 8x784 --out model.onnx
    $ amp-compiler bench --model gpt --size bench --mode train

TARGET is a reference model name (``amp_compiler.models.NAMES``), ``module.path:factory`` or
``file.py:factory`` (a callable returning an ``nn.Module`` or ``(model, example_inputs)``; an
``nn.Module`` instance works too), or an ``.onnx`` file (``amp_compiler.targets`` loads it).
The commands themselves are ``amp_compiler.commands``; ``bench`` has its own parser
(``amp_compiler.bench.command``) and gets the rest of the command line.

Bad arguments or inputs (missing file, bad factory path, unknown model, invalid dtype, any
``AmpCompilerError``) print one line, ``amp-compiler: error: <message>``, and exit with code 2;
``-v`` logs each pipeline stage under the ``amp_compiler`` logger.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler

from amp_compiler.commands import (convert_command, demo_command, export_command,
                                   inspect_command, report_command)
from amp_compiler.errors import AmpCompilerError, ConfigError
from amp_compiler.passes.dtypes import dtype_name, resolve_dtype
from amp_compiler.targets import InputSpec
from amp_compiler.view.report import visible

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
    try:  # the reference models are an optional part of the install
        from amp_compiler.models import NAMES
        return ", ".join(NAMES)
    except ImportError:
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
    p.add_argument("--only", choices=("fp32", "low", "casts", "unknown", "rules", "rewrites"),
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


# -- dispatch ------------------------------------------------------------------------------------

def _cmd_bench(argv: list[str]) -> int:
    try:  # the benchmarks are an optional part of the install
        from amp_compiler.bench.command import main as bench_main
    except ImportError as e:
        print(f"{PROG}: error: the bench command is not available in this install ({e})",
              file=sys.stderr)
        return 2
    try:
        return int(bench_main(argv) or 0)
    except SystemExit as e:  # its argparse: --help, or a usage error it already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


_COMMANDS = {"convert": convert_command, "report": report_command, "inspect": inspect_command,
             "export": export_command, "demo": demo_command}


@contextlib.contextmanager
def _logging(level: int) -> Iterator[None]:
    """Log records of the ``amp_compiler`` logger to stderr while the command runs."""
    if level <= 0:
        yield
        return
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
