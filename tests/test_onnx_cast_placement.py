"""Tests for ``passes/onnx_cast_placement`` (rule W10 of onnx_rewrite: rules C1-C6).

Structure: fewer Casts, no two Casts of one value to one type, every compute node reads its
inputs in the same dtypes as without the pass (per-node input dtypes from onnx shape inference).
Numbers: ONNX Runtime (CPU EP) outputs are bit-identical (0 ulp) with and without the pass --
every rule is exact. One hand-built graph per rule, and the narrowing round trip that must stay.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import amp_compiler.passes.onnx_rewrite as rw
from amp_compiler.bench.onnx_files import export_fp32
from amp_compiler.models import build
from amp_compiler.onnx.convert import convert_onnx
from amp_compiler.passes.infra import PassResult
from amp_compiler.passes.onnx_cast_placement import MOVEMENT, place_casts

F32, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


def _casts(m: onnx.ModelProto) -> int:
    return sum(n.op_type == "Cast" for n in m.graph.node)


def _run(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _input_dtypes(m: onnx.ModelProto) -> dict[str, tuple]:
    """Node name -> element types of its inputs, for every compute node (not Cast, not movement)."""
    g = onnx.shape_inference.infer_shapes(m).graph
    t = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    t.update({i.name: i.data_type for i in g.initializer})
    return {n.name: tuple(t.get(v) for v in n.input) for n in g.node
            if n.op_type != "Cast" and n.op_type not in MOVEMENT}


def _no_sibling_casts(m: onnx.ModelProto) -> bool:
    keys = [(n.input[0], n.attribute[0].i) for n in m.graph.node if n.op_type == "Cast"]
    return len(keys) == len(set(keys))


def _model(nodes, inputs, outputs, inits=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _apply(m: onnx.ModelProto, feeds: dict, ort_no_crash):
    """place_casts on a copy; both checked, both run; outputs must be bit-identical."""
    before = _run(m, feeds)
    after = onnx.ModelProto()
    after.CopyFrom(m)
    placed = place_casts(after)
    after, remarks = placed.graph_module, placed.remarks
    onnx.checker.check_model(after, full_check=True)
    ort_no_crash(after, None)
    for a, b in zip(before, _run(after, feeds)):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)  # 0 ulp
    return after, {r.rule for r in remarks}


X = helper.make_tensor_value_info("x", F32, [2, 3])
X16 = helper.make_tensor_value_info("x", F16, [2, 3])
FEED = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
FEED16 = {"x": FEED["x"].astype(np.float16)}


def test_c1_cast_to_the_type_it_has_goes(ort_no_crash):
    m = _model([helper.make_node("Cast", ["x"], ["c"], to=F32), helper.make_node("Relu", ["c"], ["y"])],
               [X], [helper.make_tensor_value_info("y", F32, [2, 3])])
    after, rules = _apply(m, FEED, ort_no_crash)
    assert _casts(after) == 0 and rules == {"C1"}


def test_c2_widening_round_trip_goes_narrowing_one_stays(ort_no_crash):
    widen = _model([helper.make_node("Cast", ["x"], ["a"], to=F32), helper.make_node("Cast", ["a"], ["b"], to=F16),
                    helper.make_node("Relu", ["b"], ["y"])],
                   [X16], [helper.make_tensor_value_info("y", F16, [2, 3])])
    after, rules = _apply(widen, FEED16, ort_no_crash)
    assert _casts(after) == 0 and "C2" in rules
    # f32 -> f16 -> f32 rounds: the plan asked for that value; both Casts stay
    narrow = _model([helper.make_node("Cast", ["x"], ["a"], to=F16), helper.make_node("Cast", ["a"], ["b"], to=F32),
                     helper.make_node("Relu", ["b"], ["y"])],
                    [X], [helper.make_tensor_value_info("y", F32, [2, 3])])
    after, rules = _apply(narrow, FEED, ort_no_crash)
    assert _casts(after) == 2 and not rules


def test_c3_sibling_casts_merge(ort_no_crash):
    m = _model([helper.make_node("Cast", ["x"], ["a"], to=F16), helper.make_node("Cast", ["x"], ["b"], to=F16),
                helper.make_node("Add", ["a", "b"], ["y"])],
               [X], [helper.make_tensor_value_info("y", F16, [2, 3])])
    after, rules = _apply(m, FEED, ort_no_crash)
    assert _casts(after) == 1 and rules == {"C3"} and _no_sibling_casts(after)


def test_c4_cast_of_an_initializer_is_stored_in_the_target_type(ort_no_crash):
    w = numpy_helper.from_array(np.array([[1e-3, 7e4, 1 / 3]], np.float32), "w")  # 7e4 > f16 max: inf, as Cast
    m = _model([helper.make_node("Cast", ["w"], ["w16"], to=F16), helper.make_node("Cast", ["x"], ["x16"], to=F16),
                helper.make_node("Add", ["x16", "w16"], ["y"])],
               [X], [helper.make_tensor_value_info("y", F16, [2, 3])], inits=[w])
    after, rules = _apply(m, FEED, ort_no_crash)
    assert _casts(after) == 1 and "C4" in rules
    assert [t.data_type for t in after.graph.initializer] == [F16]  # the fp32 original went


def test_c4_keeps_a_widening_cast_of_a_large_table_and_c5_does_not_move_up_to_it(ort_no_crash):
    """An fp16 table read by a Gather whose rows are cast up (O8's low embedding table): folding
    the Cast would store an fp32 copy, twice the table's bytes; a small one is still folded."""
    from amp_compiler.passes.onnx_cast_placement import SMALL

    rows = SMALL // 8 + 1  # 8 columns: just over SMALL elements
    table = numpy_helper.from_array(np.random.default_rng(1).standard_normal((rows, 8)).astype(np.float16), "table")
    ids = helper.make_tensor_value_info("ids", I64, [2, 3])
    out = helper.make_tensor_value_info("y", F32, [2, 3, 8])
    m = _model([helper.make_node("Gather", ["table", "ids"], ["rows16"]),
                helper.make_node("Cast", ["rows16"], ["y"], to=F32)], [ids], [out], inits=[table])
    feed = {"ids": np.array([[0, 1, 2], [rows - 1, 5, 7]], np.int64)}
    after, rules = _apply(m, feed, ort_no_crash)
    assert _casts(after) == 1 and not rules
    assert [t.data_type for t in after.graph.initializer] == [F16]  # no fp32 copy stored
    small = numpy_helper.from_array(np.ones((4, 8), np.float16), "table")
    m = _model([helper.make_node("Gather", ["table", "ids"], ["rows16"]),
                helper.make_node("Cast", ["rows16"], ["rows"], to=F32),
                helper.make_node("Relu", ["rows"], ["y"])], [ids], [out], inits=[small])
    after, rules = _apply(m, {"ids": np.zeros((2, 3), np.int64)}, ort_no_crash)
    assert _casts(after) == 0 and {"C4", "C5"} <= rules


def test_c5_cast_moves_above_a_reshape_to_meet_a_sibling_and_c6_merges_the_moves(ort_no_crash):
    shape = numpy_helper.from_array(np.array([3, 2], np.int64), "shape")
    m = _model([helper.make_node("Cast", ["x"], ["a"], to=F16),
                helper.make_node("Reshape", ["x", "shape"], ["r"]),
                helper.make_node("Cast", ["r"], ["b"], to=F16),
                helper.make_node("Reshape", ["a", "shape"], ["r2"]),
                helper.make_node("Add", ["b", "r2"], ["y"]),
                helper.make_node("Relu", ["a"], ["z"])],
               [X], [helper.make_tensor_value_info("y", F16, [3, 2]),
                     helper.make_tensor_value_info("z", F16, [2, 3])], inits=[shape])
    after, rules = _apply(m, FEED, ort_no_crash)
    assert _casts(after) == 1 and {"C5", "C3", "C6"} <= rules and _no_sibling_casts(after)
    assert sum(n.op_type == "Reshape" for n in after.graph.node) == 1


def test_c5_moves_nothing_that_removes_no_cast(ort_no_crash):
    shape = numpy_helper.from_array(np.array([3, 2], np.int64), "shape")
    m = _model([helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=F16)],
               [X], [helper.make_tensor_value_info("y", F16, [3, 2])], inits=[shape])
    after, rules = _apply(m, FEED, ort_no_crash)
    assert not rules and [n.op_type for n in after.graph.node] == ["Reshape", "Cast"]


def _without_pass(monkeypatch, source):
    with monkeypatch.context() as mp:
        mp.setattr(rw, "place_casts", lambda m: PassResult(m, False))
        return convert_onnx(source)


@pytest.mark.parametrize("name", ["gpt", "bert", "mlp", "lstm"])
def test_reference_models_same_plan_fewer_or_equal_casts_bit_identical(name, monkeypatch, ort_no_crash):
    model, inputs = build(name, "tiny")
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = export_fp32(model, inputs)
        before = _without_pass(monkeypatch, source)
        after = convert_onnx(source)
    onnx.checker.check_model(after, full_check=True)
    ort_no_crash(after, inputs)
    assert _casts(after) <= _casts(before)
    if name == "gpt":  # the source's int/bool no-op Casts (C1): 17 -> 10 measured
        assert _casts(after) < _casts(before)
    assert _no_sibling_casts(after)
    made_by = {n.output[0]: n for n in after.graph.node}
    assert not any(n.op_type == "Cast" and made_by.get(n.input[0]) is not None
                   and made_by[n.input[0]].op_type == "Cast"
                   and made_by[n.input[0]].attribute[0].i == n.attribute[0].i
                   for n in after.graph.node)  # no Cast(Cast(x, T), T)
    dt_before, dt_after = _input_dtypes(before), _input_dtypes(after)
    assert {k: v for k, v in dt_before.items() if k in dt_after} == {k: dt_after[k] for k in dt_before if k in dt_after}
    assert set(dt_after) <= set(dt_before)  # no compute node appeared
    feeds = {i.name: a.numpy() for i, a in zip(onnx.load_from_string(before.SerializeToString()).graph.input, inputs)}
    for a, b in zip(_run(before, feeds), _run(after, feeds)):
        assert np.array_equal(a, b, equal_nan=True)  # 0 ulp
