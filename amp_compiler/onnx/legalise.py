"""Legalisation: every ONNX node reads float types its schema allows at the file's opset.

Before opset 22 many ONNX ops (Conv, ConvTranspose, MaxPool, AveragePool,
InstanceNormalization, LSTM, Sin/Cos, ...) have no ``tensor(bfloat16)`` in their schema's type
constraints, so a bf16 plan that computes them low exports an invalid file. Every node whose
schema rejects the low-precision float type it receives on an input computes in float32
instead (numerically safe; float16 only if the schema lacks float): its inputs of that type
variable are cast up and its outputs of that variable cast back to the type they had, so the
rest of the graph is unchanged. A value made by a Cast from float32 (ours included) is read at
its source, never cast twice; an initializer is converted in the file (in place when nothing
else reads it, else as a copy), not cast at every run. Each such node gets the metadata entry
``amp_compiler.reason`` saying why. A valid graph (fp16 at these opsets) is left untouched.
``export_onnx`` runs it on every file it writes (step 5 of its docstring).

    >>> [r.op_type for r in legalise_types(model)]   # a bf16 plan at opset 18; in place
    ['Conv']
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from amp_compiler.passes.onnx_graph import (FLOAT_TYPES, ONNX_TO_TORCH, REASON_KEY, SHORT, TYPE_STR,
                                            FreshNames, convert_tensor, inferred_types, opset_of,
                                            outer_references, refresh_value_info, slot_type_vars)
from amp_compiler.passes.plan import dtype_name

_LOW_TYPES = (TensorProto.BFLOAT16, TensorProto.FLOAT16)
# Safest first: float32 holds every float16/bfloat16 value exactly.
_FALLBACK_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)


def type_name(elem_type: int) -> str:
    """"bfloat16" for TensorProto.BFLOAT16: the dtype name the plan's reasons use."""
    return dtype_name(ONNX_TO_TORCH[elem_type])


@dataclass(frozen=True)
class Legalised:
    """One node moved off a low dtype its ONNX schema does not allow at the file's opset."""

    node: str
    op_type: str
    was: int      # ONNX element type the plan gave it (TensorProto.BFLOAT16 ...)
    now: int      # ONNX element type it computes in now (TensorProto.FLOAT)
    reason: str


def _illegal_variables(node: onnx.NodeProto, schema, types: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Type variables of ``node`` whose low float type the schema rejects: var -> (had, fallback)."""
    allowed = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
    bad: dict[str, tuple[int, int]] = {}
    for v, t in zip(node.input, slot_type_vars(list(schema.inputs), len(node.input))):
        et = types.get(v) if v else None
        if t is None or et not in _LOW_TYPES or t in bad:
            continue
        ok = allowed.get(t, {t})  # a fixed type_str allows exactly itself
        if TYPE_STR[et] in ok:
            continue
        fallback = next((f for f in _FALLBACK_TYPES if TYPE_STR[f] in ok), None)
        if fallback is not None and t in allowed:  # a fixed-type slot cannot be retyped by casting others
            bad[t] = (et, fallback)
    return bad


def legalise_types(model: onnx.ModelProto) -> list[Legalised]:
    """Make every top-level node read float types its schema allows (module docstring).

    Changes ``model`` in place; returns one record per node moved to a wider float type.
    """
    opset = opset_of(model)
    if opset is None:
        return []
    g = model.graph
    types = inferred_types(model)
    found: list[tuple[onnx.NodeProto, dict[str, tuple[int, int]], object]] = []
    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except Exception:  # noqa: BLE001 -- not a standard op at this opset: nothing to check
            continue
        bad = _illegal_variables(node, schema, types)
        if bad:
            found.append((node, bad, schema))
    if not found:
        return []

    names = FreshNames(model)
    inits = {t.name: t for t in g.initializer}
    overridable = {i.name for i in g.input}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for v in list(n.input) + outer_references(n):
            readers[v] = readers.get(v, 0) + 1
    for o in g.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    before: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> casts placed right before it
    after: dict[int, list[onnx.NodeProto]] = {}
    cast_cache: dict[tuple[str, int], str] = {}
    init_uses: dict[tuple[str, int], list[tuple[onnx.NodeProto, int]]] = {}
    bypassed: set[int] = set()
    records: list[Legalised] = []

    def deliver(value: str, want: int, node: onnx.NodeProto, slot: int) -> None:
        if value in inits and value not in overridable:
            init_uses.setdefault((value, want), []).append((node, slot))
            return
        src = producer.get(value)
        if src is not None and src.op_type == "Cast" and types.get(src.input[0]) == want:
            node.input[slot] = src.input[0]  # Cast(fp32 -> bf16) then back: read the fp32 source
            readers[value] -= 1
            bypassed.add(id(src))
            return
        key = (value, want)
        if key not in cast_cache:
            out = names.fresh(f"{value}_{SHORT[want]}")
            before.setdefault(id(node), []).append(
                helper.make_node("Cast", [value], [out], to=want, name=names.fresh(f"amp_legal_{out}")))
            cast_cache[key] = out
        node.input[slot] = cast_cache[key]

    for node, bad, schema in found:
        in_vars = slot_type_vars(list(schema.inputs), len(node.input))
        out_vars = slot_type_vars(list(schema.outputs), len(node.output))
        for i, (v, t) in enumerate(zip(node.input, in_vars)):
            if v and t in bad and types.get(v) in FLOAT_TYPES and types.get(v) != bad[t][1]:
                deliver(v, bad[t][1], node, i)
        for k, (o, t) in enumerate(zip(node.output, out_vars)):
            if o and t in bad:
                inner = names.fresh(f"{o}_{SHORT[bad[t][1]]}")
                node.output[k] = inner
                back = helper.make_node("Cast", [inner], [o], to=types.get(o, bad[t][0]),
                                        name=names.fresh(f"amp_legal_{o}"))
                after.setdefault(id(node), []).append(back)
                # a legalised reader of ``o`` further down reads ``inner`` (deliver's bypass)
                producer[o] = back
                types[inner] = bad[t][1]
        had, now = next(iter(bad.values()))
        reason = (f"ONNX {node.op_type} (opset {opset}) has no {TYPE_STR[had]} in type constraint "
                  f"{', '.join(sorted(bad))}: computed in {type_name(now)}, outputs cast back to "
                  f"{type_name(had)}")
        node.metadata_props.add(key=REASON_KEY, value=reason)
        records.append(Legalised(node.name, node.op_type, had, now, reason))

    # initializers: converted in the file rather than cast at every run; renamed, since the
    # exported name says "_bf16"; in place when only legalised nodes read it, else a copy
    for (name, want), uses in init_uses.items():
        new_name = names.fresh(f"{re.sub(r'_b?f16$', '', name)}_{SHORT[want]}")
        tensor = convert_tensor(inits[name], want, name=new_name)[0]
        if readers.get(name, 0) == len(uses) and sum(1 for (n, _) in init_uses if n == name) == 1:
            inits[name].CopyFrom(tensor)
        else:
            g.initializer.append(tensor)
        for n, slot in uses:
            n.input[slot] = new_name

    def unread(n: onnx.NodeProto) -> bool:  # every reader now reads the Cast's source
        return id(n) in bypassed and readers.get(n.output[0], 0) == 0

    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if not unread(n):
            nodes.extend(before.get(id(n), ()))
            nodes.append(n)
        nodes.extend(c for c in after.get(id(n), ()) if not unread(c))
    del g.node[:]
    g.node.extend(nodes)
    refresh_value_info(model)
    return records
