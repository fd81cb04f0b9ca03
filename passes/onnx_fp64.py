"""onnx_fp64 (ONNX rewrite, rule O12 of ``convert_onnx(fp64="fp32")``): float64 computed in float32.

A float64 op in an exported model (positions computed in double, a ``.double()`` left in a loss)
keeps ONNX Runtime's CUDA provider off it (few of its kernels take double: the node runs on the
CPU, with copies both ways), and the plan treats it as wider than fp32 (R0). ModelOpt AutoCast
converts such graphs to float32 before planning; ``convert_onnx(fp64="fp32")`` does the same:

    E1  float64 initializers are stored as float32 (rounded to nearest);
    E2  ``Cast(to=DOUBLE)`` casts to float32 instead; so do the ``dtype`` / ``to`` attributes of
        EyeLike, RandomNormal/Uniform(Like), Bernoulli and the value of ConstantOfShape;
    E3  float64 graph inputs and outputs keep their type (the caller's interface): an input is
        cast to float32 where it enters, an output cast back to float64 where it leaves.

Values change by float32's rounding where they were double; the default (``fp64="keep"``) leaves
the model as written.

    >>> changed = fp64_to_fp32(model).facts
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .infra import PassResult, Remark, result
from .onnx_graph import fresh_name
from .rules import Rule

F64, F32 = TensorProto.DOUBLE, TensorProto.FLOAT
_DTYPE_ATTRS = {"EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype",
                "Cast": "to"}


def _elem(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type


def fp64_to_fp32(model: onnx.ModelProto) -> PassResult:
    """Rules E1-E3 on the top-level graph, in place; one remark per value changed, ``facts``
    what changed, in words."""
    g = model.graph
    changed: list[str] = []  # in words, for the log
    remarks: list[Remark] = []

    def note(rule: Rule, name: str, what: str, why: str) -> None:
        changed.append(what)
        remarks.append(Remark("onnx_fp64", rule, name, why))

    for i, t in enumerate(g.initializer):  # E1
        if t.data_type == F64:
            g.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).astype(np.float32), t.name))
            note(Rule.E1_FP64_INITIALIZERS, t.name, f"initializer '{t.name}'", "stored as float32 (rounded to nearest)")
    for node in g.node:  # E2
        attr = _DTYPE_ATTRS.get(node.op_type)
        for a in node.attribute:
            if a.name == attr and a.type == onnx.AttributeProto.INT and a.i == F64:
                a.i = F32
                note(Rule.E2_FP64_CASTS, node.name, f"{node.op_type} '{node.name}'", f"{node.op_type} makes float32, not float64")
            if node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == F64:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32)))
                note(Rule.E2_FP64_CASTS, node.name, f"ConstantOfShape '{node.name}'", "fills with a float32 value")
    used = {n.name for n in g.node} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    inits = {t.name for t in g.initializer}
    entering = []
    for vi in g.input:  # E3: inputs
        if _elem(vi) == F64 and vi.name not in inits:
            inner = fresh_name(used, f"{vi.name}_f32")
            for node in g.node:
                for k, v in enumerate(node.input):
                    if v == vi.name:
                        node.input[k] = inner
            entering.append(helper.make_node("Cast", [vi.name], [inner], to=F32, name=fresh_name(used, f"amp_fp64_{inner}")))
            note(Rule.E3_FP64_BORDER, vi.name, f"input '{vi.name}'", "a float64 input, cast to float32 where it enters")
    leaving = []
    for vo in g.output:  # E3: outputs
        if _elem(vo) == F64:
            inner = fresh_name(used, f"{vo.name}_f32")
            for node in g.node:
                for k, v in enumerate(node.output):
                    if v == vo.name:
                        node.output[k] = inner
                for k, v in enumerate(node.input):
                    if v == vo.name:
                        node.input[k] = inner
            leaving.append(helper.make_node("Cast", [inner], [vo.name], to=F64, name=fresh_name(used, f"amp_fp64_{vo.name}")))
            note(Rule.E3_FP64_BORDER, vo.name, f"output '{vo.name}'", "a float64 output, cast back where it leaves")
    if entering or leaving:
        nodes = entering + list(g.node) + leaving
        del g.node[:]
        g.node.extend(nodes)
    if changed:
        keep = [v for v in g.value_info if _elem(v) != F64]
        del g.value_info[:]
        g.value_info.extend(keep)
    return result(model, remarks, facts=changed)

