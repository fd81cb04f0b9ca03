"""``amp-compiler convert <model.onnx>`` options: --calibration (a folder of .npz files, one .npz
with a leading sample axis, a Polygraphy JSON data file), --keep-io-types / --no-keep-io-types,
--opset N, --max-reduction-depth N, and --keep-fp32 re:<pattern>; bad values are one line on stderr with exit code 2."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from amp_compiler.passes.plan import PrecisionPlan

from test_cli import assert_one_line_error, run


def _overflow_onnx(path) -> None:
    """x[n, 8] -> MatMul(1e4) -> y -> MatMul(1e-3) -> z: with x = 1, max|y| = 8e4 > float16's
    range, which only calibration data reveals (rule O3)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y"], name="mm1"),
             helper.make_node("MatMul", ["y", "w2"], ["z"], name="mm2")]
    graph = helper.make_graph(
        nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(np.full((8, 8), 1e4, np.float32), "w1"),
         numpy_helper.from_array(np.full((8, 2), 1e-3, np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _polygraphy_array(a: np.ndarray) -> dict:
    """How ``polygraphy.json`` encodes an ndarray (``polygraphy run --save-inputs``)."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return {"array": base64.b64encode(buf.getvalue()).decode(), "polygraphy_class": "ndarray"}


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "fp32.onnx"
    _overflow_onnx(path)
    return path


def _plan(folder) -> PrecisionPlan:
    return PrecisionPlan.from_json((folder / "plan.json").read_text())


def test_calibration_changes_the_decision_in_every_format(tmp_path, src, capsys, ort_no_crash):
    code, _, err = run(capsys, "convert", str(src), "--out", str(tmp_path / "plain"))
    assert code == 0, err
    assert _plan(tmp_path / "plain")["mm1"].rule == "R1:allow"

    ones = np.ones((2, 8), np.float32)
    folder = tmp_path / "samples"
    folder.mkdir()
    np.savez(folder / "a.npz", x=ones)
    np.savez(folder / "b.npz", x=np.full((1, 8), 0.5, np.float32))
    (folder / "notes.txt").write_text("not a sample")  # ignored: only .npz files are samples
    stacked = tmp_path / "stacked.npz"
    np.savez(stacked, x=np.ones((3, 2, 8), np.float32))  # 3 samples of shape [2, 8]
    poly = tmp_path / "inputs.json"
    poly.write_text(json.dumps([{"x": _polygraphy_array(ones)}]))

    for name, cal in (("folder", folder), ("stacked", stacked), ("poly", poly)):
        out = tmp_path / name
        code, _, err = run(capsys, "convert", str(src), "--calibration", str(cal), "--out", str(out))
        assert code == 0, (name, err)
        plan = _plan(out)
        assert plan["mm1"].rule == "O3:range" and "8e+04" in plan["mm1"].reason, name
        assert plan["mm2"].precision == torch.float32, name
        converted = onnx.load(str(out / "model.onnx"))
        mm1 = next(n for n in converted.graph.node if n.name == "mm1")
        assert mm1.input[0] == "x"  # fp32 from the input on: no Cast before it
        ort_no_crash(converted, (ones,))


def test_keep_io_types_and_opset(tmp_path, src, capsys):
    code, _, err = run(capsys, "convert", str(src), "--no-keep-io-types", "--opset", "21",
                       "--out", str(tmp_path / "o"))
    assert code == 0, err
    converted = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert [(o.domain, o.version) for o in converted.opset_import] == [("", 21)]
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert not [n for n in converted.graph.node if n.op_type == "Cast"]  # all fp16, end to end
    plan = _plan(tmp_path / "o")
    assert plan.meta["opset"] == 21 and plan.meta["keep_io_types"] is False

    code, _, err = run(capsys, "convert", str(src), "--keep-io-types", "--out", str(tmp_path / "k"))
    assert code == 0, err
    converted = onnx.load(str(tmp_path / "k" / "model.onnx"))
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    casts = [(n.input[0], n.attribute[0].i) for n in converted.graph.node if n.op_type == "Cast"]
    assert casts == [("x", TensorProto.FLOAT16), ("z_f16", TensorProto.FLOAT)]  # in, and out again


def test_regex_override_on_the_command_line(tmp_path, src, capsys):
    # one entry although it holds a comma (never split like "softmax,exp")
    code, text, err = run(capsys, "report", str(src), "--keep-fp32", "re:^mm[2,3]$", "--width", "150")
    assert code == 0, err
    assert re.search(r"^\s+mm2\s+linear\s+float32\s+R6:keep_fp32\s+keep_fp32='re:\^mm\[2,3\]\$'", text, re.M)
    assert re.search(r"^\s+mm1\s+linear\s+float16\s+R1:allow", text, re.M)
    code, _, err = run(capsys, "convert", str(src), "--keep-fp32", "re:^mm[2,3]$", "--out",
                       str(tmp_path / "r"))
    assert code == 0, err
    plan = _plan(tmp_path / "r")
    assert plan["mm2"].rule == "R6:keep_fp32" and plan["mm1"].precision == torch.float16
    code, _, err = run(capsys, "convert", str(src), "--force-low", "re:mm(", "--out", str(tmp_path / "e"))
    assert_one_line_error(code, err, "'re:mm('", "not a valid regular expression")


def test_bad_onnx_option_values_are_one_line_errors(tmp_path, src, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"x": [1, 2]}]')  # plain lists are not Polygraphy arrays
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.savez(wrong / "s.npz", inp=np.ones((1, 8), np.float32))
    ragged = tmp_path / "ragged.npz"
    np.savez(ragged, x=np.ones((3, 8), np.float32), y=np.ones((2, 8), np.float32))
    txt = tmp_path / "data.txt"
    txt.write_text("1 2 3")
    out = str(tmp_path / "never")
    for argv, needles in (
        (["--calibration", str(tmp_path / "missing")], ("does not exist",)),
        (["--calibration", str(empty)], ("no .npz files",)),
        (["--calibration", str(bad_json)], ("sample 0, input 'x'", "not a Polygraphy-encoded array")),
        (["--calibration", str(wrong)], ("'inp', which the model does not take",)),
        (["--calibration", str(ragged)], ("leading sample axis",)),
        (["--calibration", str(txt)], ("use a folder of .npz files",)),
        (["--opset", "abc"], ("invalid opset 'abc'",)),
        (["--opset", "999"], ("opset must be an integer from 1 to",)),
        (["--opset", "6"], ("cannot convert", "to opset 6")),
        (["--max-reduction-depth", "0"], ("invalid reduction depth '0'",)),
        (["--max-reduction-depth", "many"], ("invalid reduction depth 'many'",)),
        (["--island-tolerance", "-1"], ("invalid island tolerance '-1'",)),
        (["--island-tolerance", "nan"], ("invalid island tolerance 'nan'",)),
        (["--embedding-tables", "half"], ("invalid choice: 'half'",)),
        (["--fp64", "double"], ("invalid choice: 'double'",)),
    ):
        code, _, err = run(capsys, "convert", str(src), *argv, "--out", out)
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "never").exists()
    code, _, err = run(capsys, "convert", "mlp", "--opset", "17", "--out", out)
    assert_one_line_error(code, err, "--opset applies to .onnx targets only")
    code, _, err = run(capsys, "convert", "mlp", "--max-reduction-depth", "64", "--out", out)
    assert_one_line_error(code, err, "--max-reduction-depth applies to .onnx targets only")


def test_max_reduction_depth_on_the_command_line(tmp_path, src, capsys):
    """Rule O5 from the CLI: both MatMuls of the source sum 8 products per output value."""
    code, _, err = run(capsys, "convert", str(src), "--max-reduction-depth", "4", "--out", str(tmp_path / "d"))
    assert code == 0, err
    plan = _plan(tmp_path / "d")
    assert plan["mm1"].rule == plan["mm2"].rule == "O5:reduction-depth"
    code, _, err = run(capsys, "convert", str(src), "--max-reduction-depth", "8", "--out", str(tmp_path / "e"))
    assert code == 0, err
    assert _plan(tmp_path / "e")["mm1"].precision == torch.float16


def test_embedding_tables_and_islands_on_the_command_line(tmp_path, capsys):
    """--islands measure --island-tolerance R reach convert_onnx (rule O9): the fp32 Add that
    reads the graph input is an island; at a generous tolerance it is traded; the flags are
    ONNX-only."""
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32) * 0.5, "w")
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32), "table")
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["x"], name="lookup"),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm1"),
         helper.make_node("Add", ["y", "x"], ["r"], name="residual"),
         helper.make_node("MatMul", ["r", "w"], ["z"], name="mm2")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 8])], initializer=[w, table])
    src = tmp_path / "island.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), src)
    code, _, err = run(capsys, "convert", str(src), "--embedding-tables", "low", "--islands", "measure",
                       "--island-tolerance", "100", "--out", str(tmp_path / "t"))
    assert code == 0, err
    plan = _plan(tmp_path / "t")
    assert plan["residual"].rule == "O9:traded" and plan["residual"].precision == torch.float16
    assert plan.meta["keep_io_types"] is True
    code, _, err = run(capsys, "convert", str(src), "--islands", "measure", "--island-tolerance", "0",
                       "--out", str(tmp_path / "k"))
    assert code == 0, err
    assert _plan(tmp_path / "k")["residual"].precision == torch.float32
    code, _, err = run(capsys, "convert", "mlp", "--islands", "measure", "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "--islands applies to .onnx targets only")
    code, _, err = run(capsys, "convert", str(src), "--fp64", "fp32", "--out", str(tmp_path / "f"))
    assert code == 0, err
    assert _plan(tmp_path / "f").meta["fp64"] == "fp32"
