"""Tests for ``passes/onnx_layer_norm`` (rule O11 of convert_onnx: written-out LayerNorms fused).

A TorchScript export at opset 14 writes ``nn.LayerNorm`` out in nine ops; ``convert_onnx(opset=17)``
fuses it into one LayerNormalization: the same fp32 values (to float rounding), and in fp16 the
norm runs low with no Cast pair around its Pow. Hand-built graphs check the pattern's limits.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from amp_compiler.onnx.convert import convert_onnx
from amp_compiler.onnx.frontend import prepare
from amp_compiler.passes.onnx_layer_norm import fuse_layer_norms

F32 = TensorProto.FLOAT


def _export(opset: int = 14) -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Linear(16, 4)).eval()
    with torch.no_grad():  # a LayerNorm with weights of its own, not ones and zeros
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 16),), f, dynamo=False, opset_version=opset,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return model, onnx.load_from_string(f.getvalue())


def _run(m: onnx.ModelProto, x: np.ndarray, ort_no_crash) -> np.ndarray:
    ort_no_crash(m, (torch.from_numpy(x),))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_a_torchscript_layer_norm_is_fused_at_opset_17(ort_no_crash):
    model, source = _export()
    assert sum(n.op_type == "ReduceMean" for n in source.graph.node) == 2  # written out
    default = convert_onnx(source)  # opset 14: left as written, the Pow an fp32 island
    ours, plan = convert_onnx(source, opset=17, return_plan=True)
    ops = [n.op_type for n in ours.graph.node]
    assert ops.count("LayerNormalization") == 1 and "ReduceMean" not in ops and "Pow" not in ops
    assert sum(o == "Cast" for o in ops) == 2 < sum(n.op_type == "Cast" for n in default.graph.node)
    norm = next(n for n in ours.graph.node if n.op_type == "LayerNormalization")
    d = plan[norm.name]
    assert d.precision == torch.float16 and "O11: fused" in d.reason
    assert abs(next(a.f for a in norm.attribute if a.name == "epsilon") - 1e-5) < 1e-12
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = _run(ours, x, ort_no_crash)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 2.0 ** -9


def test_the_fused_fp32_graph_computes_the_same_values(ort_no_crash):
    _, source = _export()
    from amp_compiler.onnx.convert import convert_opset

    written = prepare(convert_opset(source, 17))
    fused_result = fuse_layer_norms(onnx.load_from_string(written.SerializeToString()))
    fused, names = fused_result.graph_module, fused_result.facts
    assert len(names) == 1
    onnx.checker.check_model(fused, full_check=True)
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32) * 3
    a, b = _run(written, x, ort_no_crash), _run(fused, x, ort_no_crash)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_below_opset_17_nothing_is_fused():
    _, source = _export(14)
    fused_result = fuse_layer_norms(prepare(source))
    model, names = fused_result.graph_module, fused_result.facts
    assert names == [] and sum(n.op_type == "ReduceMean" for n in model.graph.node) == 2


def _written(*, square="pow", axes=(-1,), extra_reader=False, gamma=True):
    """The nine ops over x (2 x 4) by hand, at opset 17."""
    c = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32),
         "g": np.linspace(0.5, 1.5, 4, dtype=np.float32), "b": np.linspace(-1, 1, 4, dtype=np.float32)}
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=list(axes)),
             helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["p"]) if square == "pow"
             else helper.make_node("Mul", ["d", "d"], ["p"]),
             helper.make_node("ReduceMean", ["p"], ["v"], axes=list(axes)),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["n"])]
    last = "n"
    if gamma:
        nodes += [helper.make_node("Mul", ["n", "g"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])]
        last = "z"
    nodes.append(helper.make_node("Relu", [last], ["out"]))
    outputs = [helper.make_tensor_value_info("out", F32, [2, 4])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["v"], ["v_out"]))
        outputs.append(helper.make_tensor_value_info("v_out", F32, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [2, 4])], outputs,
                          initializer=[numpy_helper.from_array(a, k) for k, a in c.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("square", ["pow", "mul"])
def test_both_spellings_of_the_square_fuse(square, ort_no_crash):
    written = _written(square=square)
    fused_result = fuse_layer_norms(onnx.load_from_string(written.SerializeToString()))
    fused, names = fused_result.graph_module, fused_result.facts
    assert len(names) == 1 and [n.op_type for n in fused.graph.node] == ["LayerNormalization", "Relu"]
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(fused, x, ort_no_crash), _run(written, x, ort_no_crash), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", [{"axes": (0,)}, {"extra_reader": True}, {"gamma": False}])
def test_what_is_not_a_layer_norm_is_left_alone(change):
    fused_result = fuse_layer_norms(_written(**change))
    model, names = fused_result.graph_module, fused_result.facts
    assert names == [] and sum(n.op_type == "ReduceMean" for n in model.graph.node) == 2
