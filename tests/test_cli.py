"""The ``amp-compiler`` command line: every subcommand in-process on small models (files written,
exit codes), bad input as one line on stderr with exit code 2, the console entry in a
subprocess, and the demo's figures."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest
import torch
from rich.console import Console

import amp_compiler as ac
from amp_compiler.cli import main
from amp_compiler.models import build
from amp_compiler.passes.plan import PrecisionPlan

HAS_ONNX_EXPORT = importlib.util.find_spec("amp_compiler.onnx.export") is not None
HAS_ONNX_FRONTEND = importlib.util.find_spec("amp_compiler.onnx.convert") is not None
HAS_BENCH = importlib.util.find_spec("amp_compiler.bench.command") is not None


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amp-compiler: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def mlp_out(tmp_path_factory):
    """`convert mlp` once for the tests that read its files."""
    out = tmp_path_factory.mktemp("cli") / "mlp"
    code = main(["convert", "mlp", "--dtype", "bfloat16", "--out", str(out)])
    return code, out


# -- help and the console entry ------------------------------------------------------------------

def test_module_entry_help_in_a_subprocess():
    done = subprocess.run([sys.executable, "-m", "amp_compiler", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: amp-compiler")
    for command in ("convert", "report", "inspect", "export", "bench", "demo"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.M), command


@pytest.mark.parametrize("command", ["convert", "report", "inspect", "export", "demo"])
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: amp-compiler {command}")


def test_no_command_is_a_usage_error(capsys):
    assert_one_line_error(*run(capsys)[::2], "choose a command")


# -- convert -------------------------------------------------------------------------------------

def test_convert_writes_plan_report_graph(mlp_out, capsys, ort_no_crash):
    code, out = mlp_out
    assert code == 0
    plan = PrecisionPlan.from_json((out / "plan.json").read_text())
    # the same plan convert() makes in-process, and the casts the graph holds
    model, inputs = build("mlp", "tiny")
    amp = ac.convert(model, inputs, dtype="bfloat16", training=False)
    assert plan.low_dtype == torch.bfloat16
    assert {n: d for n, d in plan.items()} == {n: d for n, d in amp.plan.items()}
    assert [c["node"] for c in plan.meta["casts"]] == [c.node for c in amp.casts]
    graph = (out / "graph.py").read_text()
    assert graph.count(".to(") == len(amp.casts) == amp.cast_count()
    compile(graph.split("\n", 1)[1], "graph.py", "exec")  # the code part is real Python
    report = (out / "report.txt").read_text()
    assert "precision plan (bfloat16)" in report and "\x1b[" not in report
    for name in ("linear", "relu", "linear_1"):
        assert re.search(rf"^\s+{name}\s+\w+\s+(bfloat16|float32)\s+R\d", report, re.M), name
    assert amp.report(print_=False).caption in " ".join(report.split())
    if HAS_ONNX_EXPORT:
        import onnx

        onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
        ort_no_crash(out / "model.onnx", inputs)  # bfloat16: refused by the CPU EP, never a crash
    else:
        assert not (out / "model.onnx").exists()


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "mlp"
    assert main(["convert", "mlp", "--out", str(out), "--no-onnx", "--dtype", "bfloat16"]) == 0
    before = (out / "plan.json").read_text()
    code, _, err = run(capsys, "convert", "mlp", "--out", str(out))
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "plan.json").read_text() == before
    code, stdout, err = run(capsys, "convert", "mlp", "--out", str(out), "--overwrite", "--no-onnx",
                            "--keep-fp32", "relu", "--force-low", "net.2")
    assert code == 0, err
    plan = PrecisionPlan.from_json((out / "plan.json").read_text())
    assert plan.low_dtype == torch.float16  # the default dtype
    assert plan["relu"].precision == torch.float32 and plan["relu"].rule.startswith("R6")
    # the summary compares with fp32 and autocast on the example inputs
    assert re.search(r"max relative error vs fp32 .*: \d\.\d\de-\d\d \(torch\.autocast", stdout)


def test_convert_factory_module_and_file(tmp_path, monkeypatch, capsys, ort_no_crash):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def with_inputs():
            return nn.Sequential(nn.Linear(6, 5), nn.Softmax(-1)), (torch.randn(3, 6),)

        def bare():
            return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))

        def broken():
            return 42
    """))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "convert", "mymodels:with_inputs", "--out", "a", "--no-onnx")
    assert code == 0, err
    plan = PrecisionPlan.from_json((tmp_path / "a" / "plan.json").read_text())
    assert plan["linear"].precision == torch.float16
    # a bare model: fx tracing, or torch.export with --example-shape
    code, _, err = run(capsys, "convert", "mymodels.py:bare", "--out", "b", "--no-onnx")
    assert code == 0, err
    code, _, err = run(capsys, "convert", "mymodels:bare", "--example-shape", "4x6", "--out", "c",
                       "--dtype", "bf16")
    assert code == 0, err
    plan = PrecisionPlan.from_json((tmp_path / "c" / "plan.json").read_text())
    assert plan.low_dtype == torch.bfloat16 and len(plan.low_nodes()) >= 2
    assert (tmp_path / "c" / "model.onnx").exists() == HAS_ONNX_EXPORT
    if HAS_ONNX_EXPORT:
        ort_no_crash(tmp_path / "c" / "model.onnx", (torch.randn(4, 6),))
    code, _, err = run(capsys, "convert", "mymodels:broken", "--out", "d")
    assert_one_line_error(code, err, "returned int")
    code, _, err = run(capsys, "convert", "mymodels:nothing", "--out", "d")
    assert_one_line_error(code, err, "has no attribute 'nothing'")


def test_verbose_logs_each_stage(tmp_path, capsys):
    code, _, err = run(capsys, "-v", "convert", "mlp", "--out", str(tmp_path / "v"), "--no-onnx")
    assert code == 0
    for stage in ("captured export graph", "plan: PrecisionPlan", "inserted", "folded",
                  "decisions by rule: ", "R1:allow x2", "casts in the graph: "):
        assert stage in err, stage
    import logging

    assert not logging.getLogger("amp_compiler").handlers  # removed after the command


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["convert", "missing.onnx"], "does not exist"),
    (["report", "missing-plan.json"], "does not exist"),
    (["convert", "no_such_pkg.models:make"], "cannot import 'no_such_pkg.models'"),
    (["convert", "torch.nn:NoSuchFactory"], "has no attribute 'NoSuchFactory'"),
    (["convert", "vgg"], "unknown model 'vgg'"),
    (["inspect", "mlp", "--dtype", "float8"], "invalid dtype 'float8'"),
    (["convert", "mlp", "--size", "huge"], "invalid choice: 'huge'"),
    (["export", "mlp"], "--out"),
    (["inspect", "mlp", "--collapse", "0"], "invalid collapse"),
    (["convert", "mlp", "--example-shape", "8xA"], "invalid shape"),
    (["report", "mlp", "--why", "no_node_like_this"], "no node named 'no_node_like_this'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, needle)


def test_bad_input_in_a_subprocess_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "amp_compiler", "convert", "vgg"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "amp-compiler: error: unknown model 'vgg'; valid names: mlp, mlp_wide, resnet, gpt, "
        "bert, lstm, mf; or give module.path:factory or an .onnx file"]


def test_invalid_plan_file(tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text('{"nodes": 3}')
    assert_one_line_error(*run(capsys, "report", str(bad))[::2], "not a plan")


# -- report --------------------------------------------------------------------------------------

def test_report_from_saved_plan(mlp_out, capsys):
    _, out = mlp_out
    plan = PrecisionPlan.from_json((out / "plan.json").read_text())
    code, text, _ = run(capsys, "report", str(out / "plan.json"), "--only", "casts", "--width", "150")
    assert code == 0
    for c in plan.meta["casts"]:
        assert re.search(rf"{c['node']}\s+{c['source']}\s+{c['dtype']}", text)
    code, text, _ = run(capsys, "report", str(out / "plan.json"), "--why", "linear", "--width", "150")
    assert code == 0 and plan["linear"].reason in " ".join(text.split())
    code, text, _ = run(capsys, "report", str(out / "plan.json"), "--only", "low", "--width", "150")
    rows = re.findall(r"^\s+(\w+)\s+\w+\s+bfloat16\s", text, re.M)
    assert code == 0 and set(rows) == set(plan.low_nodes())


def test_report_of_a_model(capsys):
    code, text, _ = run(capsys, "report", "mlp", "--only", "fp32", "--keep-fp32", "relu",
                        "--width", "150")
    assert code == 0
    assert re.search(r"^\s+relu\s+relu\s+float32\s+R6:keep_fp32", text, re.M)
    assert not re.search(r"^\s+linear\s", text, re.M)


# -- inspect -------------------------------------------------------------------------------------

def test_inspect_formats(tmp_path, capsys):
    for fmt in ("svg", "html", "dot", "mermaid"):
        path = tmp_path / f"g.{fmt}"
        code, _, err = run(capsys, "inspect", "mlp", "--format", fmt, "--out", str(path))
        assert code == 0, err
        text = path.read_text()
        if fmt == "svg":
            assert "linear" in text and ET.fromstring(text.encode()) is not None
        elif fmt == "html":
            assert text.startswith("<!DOCTYPE html>") and "<svg" in text
        elif fmt == "dot":
            assert text.startswith("digraph amp_plan {")
        else:
            assert text.startswith("flowchart TD")
    # dot and mermaid go to stdout by default; an existing file is not replaced
    code, out, _ = run(capsys, "inspect", "mlp", "--format", "mermaid", "--collapse", "1")
    assert code == 0 and out.startswith("flowchart TD") and "[[" in out  # one group: net
    code, _, err = run(capsys, "inspect", "mlp", "--format", "svg", "--out", str(tmp_path / "g.svg"))
    assert_one_line_error(code, err, "already exists")


# -- export --------------------------------------------------------------------------------------

def test_export(tmp_path, capsys, ort_no_crash):
    path = tmp_path / "mlp.onnx"
    code, _, err = run(capsys, "export", "mlp", "--out", str(path), "--dtype", "float16")
    if not HAS_ONNX_EXPORT:
        assert_one_line_error(code, err, "ONNX export is not available")
        return
    assert code == 0, err
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert any(n.op_type == "Cast" for n in model.graph.node)
    ort_no_crash(path, build("mlp", "tiny")[1])
    code, _, err = run(capsys, "export", "mlp", "--out", str(path))
    assert_one_line_error(code, err, "already exists")


def _tiny_onnx(path) -> None:
    """x -> MatMul -> Add -> Relu -> MatMul -> Softmax -> Exp, fp32, opset 17."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(0)
    inits = [numpy_helper.from_array(torch.randn(*shape, generator=g).numpy(), name)
             for name, shape in (("w1", (4, 8)), ("b", (8,)), ("w2", (8, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="mm2"),
             helper.make_node("Softmax", ["z"], ["y"], name="sm", axis=-1),
             helper.make_node("Exp", ["y"], ["e"], name="exp")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_onnx_target(tmp_path, capsys, ort_no_crash):
    import onnx

    src = tmp_path / "fp32.onnx"
    _tiny_onnx(src)
    code, _, err = run(capsys, "convert", str(src), "--out", str(tmp_path / "o"))
    if not HAS_ONNX_FRONTEND:
        assert_one_line_error(code, err, "onnx.frontend")
        return
    assert code == 0, err
    converted = onnx.load(str(tmp_path / "o" / "model.onnx"))
    onnx.checker.check_model(converted)
    ort_no_crash(converted, (torch.randn(2, 4),))
    plan = PrecisionPlan.from_json((tmp_path / "o" / "plan.json").read_text())
    assert plan["mm1"].precision == torch.float16 and plan["exp"].precision == torch.float32
    real = sorted((c["dtype"], tuple(c["consumers"])) for c in plan.meta["casts"])
    assert len(real) == sum(n.op_type == "Cast" for n in converted.graph.node)
    # the input goes down once for the fp16 chain; softmax feeds exp (deny), so it takes fp32
    assert real == [("float16", ("mm1",)), ("float32", ("sm",))]
    # the picture of an ONNX file draws the casts the plan implies: the same as the file's
    code, text, err = run(capsys, "inspect", str(src), "--format", "mermaid")
    assert code == 0, err
    drawn = re.findall(r'\{\{"→ (fp16|fp32)<br/>', text)
    assert sorted(drawn) == sorted({"float16": "fp16", "float32": "fp32"}[d] for d, _ in real)
    code, text, _ = run(capsys, "report", str(src), "--why", "sm", "--width", "150")
    assert code == 0 and plan["sm"].reason in " ".join(text.split())
    code, _, err = run(capsys, "export", str(src), "--out", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, "already ONNX")


# -- bench ---------------------------------------------------------------------------------------

def test_bench_gets_the_rest_of_argv(capsys, monkeypatch):
    if not HAS_BENCH:
        code, _, err = run(capsys, "bench", "--model", "mlp")
        assert_one_line_error(code, err, "bench command is not available")
        return
    import amp_compiler.bench.command as bench

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    assert main(["-v", "bench", "--model", "mlp", "--size", "tiny"]) == 0
    assert seen == [["--model", "mlp", "--size", "tiny"]]
    monkeypatch.undo()
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and "usage" in out.lower()


# -- demo ----------------------------------------------------------------------------------------

def test_demo_quick_figures(capsys, monkeypatch):
    import amp_compiler.demo as demo

    figures = {}
    real = demo.run_demo

    def recording(quick=False, console=None):
        figures.update(real(quick=quick, console=console))
        return figures

    monkeypatch.setattr(demo, "run_demo", recording)
    code, out, _ = run(capsys, "demo", "--quick")
    assert code == 0
    assert figures["quick"] is True
    gpt, mlp = figures["gpt"], figures["mlp"]
    # gpt: finite errors, no worse than autocast's (design target: <= 1.1x), fewer casts
    assert math.isfinite(gpt["error_amp"]) and 0 < gpt["error_amp"] < 0.05
    assert gpt["error_amp"] <= 1.1 * gpt["error_autocast"] + 1e-7
    assert gpt["casts_amp"] < gpt["casts_autocast"]
    # fp16 training with loss scaling lands within 2 points of fp32, same seed and batches
    assert mlp["accuracy_fp32"] > 90.0
    assert abs(mlp["accuracy_fp16"] - mlp["accuracy_fp32"]) <= 2.0, mlp
    assert mlp["final_scale"] > 1.0 and mlp["skipped_steps"] < mlp["steps"] // 10
    onnx_fig = figures["onnx"]
    if HAS_ONNX_EXPORT:
        assert "failed" not in onnx_fig and "skipped" not in onnx_fig, onnx_fig
        assert math.isfinite(onnx_fig["error_vs_fp32"]) and onnx_fig["error_vs_fp32"] < 0.05
    else:
        assert "onnx_export" in onnx_fig["skipped"]
        assert "skipped:" in out
    assert "test accuracy %" in out and "casts per forward" in out
    json.dumps(figures)  # plain numbers and strings


def test_run_demo_step_failures_do_not_stop_it(monkeypatch):
    import amp_compiler.demo as demo

    def boom(ctx, console):
        raise RuntimeError("no\nluck")

    def missing(ctx, console):
        raise ImportError("No module named 'sklearn'")

    monkeypatch.setattr(demo, "_STEPS", (("gpt", "one", boom), ("mlp", "two", missing)))
    buf = io.StringIO()
    figures = demo.run_demo(quick=True, console=Console(file=buf, width=100))
    assert figures["gpt"] == {"failed": "RuntimeError: no luck"}
    assert figures["mlp"] == {"skipped": "No module named 'sklearn'"}
    assert "skipped: No module named 'sklearn'" in buf.getvalue()
