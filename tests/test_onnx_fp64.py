"""Tests for ``passes/onnx_fp64`` (rule O12 of ``convert_onnx(fp64="fp32")``).

A graph that computes in float64 (a double initializer, a Cast to double, a double input and
output): by default it is left as written (R0 keeps float64 ops wide); with ``fp64="fp32"`` it
computes in float32 and the low plan applies to it, its interface unchanged (a float64 input and
output), its values within float32-then-float16 rounding of the double ones.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from amp_compiler.errors import ConfigError
from amp_compiler.onnx.convert import convert_onnx
from amp_compiler.passes.onnx_fp64 import fp64_to_fp32

F64, F32, F16 = TensorProto.DOUBLE, TensorProto.FLOAT, TensorProto.FLOAT16


def _double_model() -> onnx.ModelProto:
    """y (float64) = MatMul(Cast(x, double) ... ): x float32 -> double MatMul -> + double input
    ``offset`` -> output float64, and a float32 output through a Cast back."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 64).reshape(8, 8), "w")  # float64
    fill = helper.make_tensor("fill", F64, [1], [0.5])
    nodes = [helper.make_node("Cast", ["x"], ["xd"], to=F64),
             helper.make_node("MatMul", ["xd", "w"], ["h"]),
             helper.make_node("Add", ["h", "offset"], ["y"]),
             helper.make_node("ConstantOfShape", ["shape"], ["half"], value=fill),
             helper.make_node("Mul", ["y", "half"], ["yh"]),
             helper.make_node("Cast", ["yh"], ["z"], to=F32)]
    shape = numpy_helper.from_array(np.array([2, 8], np.int64), "shape")
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", F32, [2, 8]),
                           helper.make_tensor_value_info("offset", F64, [2, 8])],
                          [helper.make_tensor_value_info("y", F64, [2, 8]),
                           helper.make_tensor_value_info("z", F32, [2, 8])], initializer=[w, shape])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _run(m: onnx.ModelProto, feeds: dict, ort_no_crash) -> list[np.ndarray]:
    ort_no_crash(m, None)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32),
         "offset": np.random.default_rng(1).standard_normal((2, 8))}


def test_the_default_keeps_float64_as_written():
    ours, plan = convert_onnx(_double_model(), return_plan=True)
    mm = next(n for n in ours.graph.node if n.op_type == "MatMul")
    assert plan[mm.name].precision == torch.float64
    assert next(t for t in ours.graph.initializer if t.name == "w").data_type == F64


def test_fp32_computes_in_float32_and_the_low_plan_applies(ort_no_crash):
    source = _double_model()
    ours, plan = convert_onnx(source, fp64="fp32", return_plan=True)
    onnx.checker.check_model(ours, full_check=True)
    g = ours.graph
    assert [vi.type.tensor_type.elem_type for vi in g.input] == [F32, F64]  # interface unchanged
    assert [vi.type.tensor_type.elem_type for vi in g.output] == [F64, F32]
    assert not [t for t in g.initializer if t.data_type == F64]
    mm = next(n for n in g.node if n.op_type == "MatMul")
    assert plan[mm.name].precision == torch.float16 and plan.meta["fp64"] == "fp32"
    ref_y, ref_z = _run(source, FEEDS, ort_no_crash)
    y, z = _run(ours, FEEDS, ort_no_crash)
    assert y.dtype == np.float64 and z.dtype == np.float32
    for out, ref in ((y, ref_y), (z, ref_z)):
        assert np.abs(out - ref).max() / np.abs(ref).max() < 2.0 ** -9


def test_the_rewrite_names_what_it_changed():
    changed = fp64_to_fp32(_double_model()).facts
    assert "initializer 'w'" in changed and "input 'offset'" in changed and "output 'y'" in changed
    assert any(c.startswith("Cast") for c in changed) and any(c.startswith("ConstantOfShape") for c in changed)
    nothing = fp64_to_fp32(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["a"], ["b"])], "g", [helper.make_tensor_value_info("a", F32, [1])],
        [helper.make_tensor_value_info("b", F32, [1])]))).facts
    assert nothing == []


def test_fp64_takes_two_values():
    with pytest.raises(ConfigError, match="fp64 must be 'keep' or 'fp32'"):
        convert_onnx(_double_model(), fp64="float32")
