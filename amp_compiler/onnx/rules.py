"""Plan rules of the ONNX front end that read the model's patterns and values: O6 (additive
attention masks clamped), O7 (the tanh-GELU cube), O8 (embedding tables), O10 (tables computed
from initializers and shapes), and the ONNX Runtime runs that measure values (O3, O10). Their
texts are in ``amp_compiler.onnx.convert``'s docstring; ``convert_onnx`` calls them in order.

    >>> masks = clamp_masks(model, torch.float16)    # before the dataflow graph is built
    >>> tables = constant_tables(model, torch.float16, ONNX_OPS)
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from amp_compiler.onnx.islands import generated_samples
from amp_compiler.passes.dtypes import dtype_name
from amp_compiler.passes.onnx_cast_placement import MOVEMENT, value_readers
from amp_compiler.passes.onnx_graph import FLOAT_TYPES, value_types
from amp_compiler.passes.onnx_rewrite import NodeSlots
from amp_compiler.passes.plan import Decision
from amp_compiler.passes.rules import Rule, pass_of

log = logging.getLogger("amp_compiler")

# O10: values within a quarter of the low dtype's range count as in range (the FX range
# analysis measured held-out maxima up to 1.9x the calibration maxima)
RANGE_HEADROOM = 4.0


# Ops an additive mask passes through on its way to Softmax (O6): it is added, selected or moved,
# never scaled, so its fill value stays a fill value.
_MASK_PATH = frozenset({"Add", "Where", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Transpose",
                        "Slice", "Concat", "Tile", "Identity", "Gather"})
_MASK_DEPTH = 12


def _reaches_only_softmax(value: str, readers: Mapping[str, list], outputs: set[str]) -> bool:
    """True when every path from ``value`` ends at a Softmax input through ``_MASK_PATH`` ops."""
    frontier, seen, found = [(value, 0)], set(), False
    while frontier:
        v, depth = frontier.pop()
        if v in outputs or depth > _MASK_DEPTH:
            return False
        for node in readers.get(v, ()):
            if node.domain not in ("", "ai.onnx"):
                return False
            if node.op_type == "Softmax" and list(node.input)[:1] == [v]:
                found = True
                continue
            if node.op_type not in _MASK_PATH or (node.op_type == "Where" and node.input[0] == v):
                return False
            for o in node.output:
                if o and o not in seen:
                    seen.add(o)
                    frontier.append((o, depth + 1))
    return found


def clamp_masks(model: onnx.ModelProto, low: torch.dtype) -> dict[str, float]:
    """Rule O6: additive-mask initializers clamped in place to ``low``'s lowest finite value.

    Returns {initializer: its fp32 minimum} for the ones clamped.
    """
    limit = float(torch.finfo(low).max)
    readers = value_readers(model.graph.node)
    outputs = {o.name for o in model.graph.output}
    clamped: dict[str, float] = {}
    for t in model.graph.initializer:
        if t.data_type != TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(t)
        finite = a[np.isfinite(a)]
        if not finite.size or finite.min() >= -limit or finite.max() > limit:
            continue
        if _reaches_only_softmax(t.name, readers, outputs):
            clamped[t.name] = float(finite.min())
            t.CopyFrom(numpy_helper.from_array(np.where(np.isfinite(a), np.maximum(a, -limit), a)
                                               .astype(np.float32), t.name))
    return clamped


def mask_decisions(plan: Mapping[str, Decision], model: onnx.ModelProto, vertex_of: list[str],
                    clamped: Mapping[str, float], low: torch.dtype) -> dict[str, Decision]:
    """The Decisions of the ``Add`` nodes that put an O6-clamped mask on Softmax inputs, saying
    so (their precision as painted)."""
    lowest = -float(torch.finfo(low).max)
    nodes = list(model.graph.node)
    position = {id(n): i for i, n in enumerate(nodes)}  # the same wrapper objects below
    readers = {v: [position[id(n)] for n in ns] for v, ns in value_readers(nodes).items()}
    out: dict[str, Decision] = {}
    for mask, minimum in clamped.items():
        frontier, seen = [mask], {mask}
        while frontier:
            for i in readers.get(frontier.pop(), ()):
                node = nodes[i]
                if node.op_type == "Softmax":
                    continue
                d = plan.get(vertex_of[i])
                feeds_softmax = any(nodes[r].op_type == "Softmax" for o in node.output for r in readers.get(o, ()))
                if node.op_type == "Add" and feeds_softmax and d is not None and d.precision is not None:
                    out[vertex_of[i]] = d.with_(rule=Rule.O6_MASK, reason=(
                        f"adds mask '{mask}' (min {minimum:.4g}) clamped to {lowest:g}: Softmax "
                        f"weighs those entries 0 either way; {dtype_name(d.precision)} here: {d.reason}"))
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        frontier.append(o)
    return out


_SHAPE_OPS = frozenset({"Shape", "Size"})
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Bernoulli", "Multinomial", "Dropout"})


def constant_tables(model: onnx.ModelProto, low: torch.dtype,
                    kinds: Mapping[str, str]) -> dict[int, float]:
    """Rule O10: node position -> max|value| for the float nodes computed from initializers and
    shapes only whose values (one run on a generated sample) stay within a quarter of ``low``'s
    range. Empty when no such node has a float output, or when the sample cannot run.
    ``kinds``: ONNX op type -> canonical kind (fills, kind "factory", are left to R0 / W8)."""
    const = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input} - const
    computed: set[str] = set()  # constant values some arithmetic made (not a weight moved)
    readers, outputs = value_readers(model.graph.node), {o.name for o in model.graph.output}
    types = value_types(model.graph)
    found: dict[int, str] = {}
    for idx, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type in _RANDOM_OPS \
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if node.op_type in _SHAPE_OPS or all(v in const for v in node.input if v):
            const.update(o for o in node.output if o)
            # a weight only moved (Transpose(W) of a linear) stays an initializer's business (W4)
            moved = node.op_type in MOVEMENT and node.input[0] not in computed
            fill = kinds.get(node.op_type) == "factory"  # R0:factory / W8 already fold those
            read = node.output[0] in readers and node.output[0] not in outputs  # a table is read
            if node.op_type != "Constant" and not fill and read and types.get(node.output[0]) in FLOAT_TYPES \
                    and not inputs & set(node.input) and not moved:
                found[idx] = node.output[0]
                computed.update(o for o in node.output if o)
    if not found:
        return {}
    try:
        ranges = value_ranges(model, list(found.values()), generated_samples(model, count=1))
    except Exception as exc:  # noqa: BLE001 -- no sample the model runs on: O10 is left out
        log.info("O10 skipped: the fp32 model does not run on a generated sample (%s)", exc)
        return {}
    limit = float(torch.finfo(low).max) / RANGE_HEADROOM
    return {idx: ranges[v] for idx, v in found.items() if v in ranges and ranges[v] <= limit}


def value_ranges(model: onnx.ModelProto, values: list[str], samples, *,
                 failed=None) -> dict[str, float]:
    """max|x| over the finite elements (inf where none is finite) of ``values`` of ``model``,
    over ``samples`` (dicts input name -> array), on ONNX Runtime's CPU provider with those values
    made outputs. ``failed(i, feeds, exc)`` makes the exception raised for a sample that does
    not run (default: ONNX Runtime's own)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    types = value_types(model.graph)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(v, types[v], None)
                              for v in values if v not in existing)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    out: dict[str, float] = {}
    for i, sample in enumerate(samples):
        feeds = {k: x for k, x in sample.items() if k in names}
        try:
            arrays = session.run(values, feeds)
        except Exception as exc:  # noqa: BLE001 -- wrong dtype / rank / shape for an input
            if failed is None:
                raise
            raise failed(i, feeds, exc) from exc
        for v, a in zip(values, arrays):
            a = np.asarray(a)
            if a.dtype.kind == "f" and a.size:
                finite = np.abs(a[np.isfinite(a)])
                out[v] = max(out.get(v, 0.0), float(finite.max()) if finite.size else float("inf"))
    return out


def table_note(d: Decision, value_max: float, low: torch.dtype) -> Decision:
    return d.with_(rule=Rule.O10_CONSTANT_TABLE, reason=(
        f"computed from initializers and shapes only (max|x| {value_max:.4g} on a generated sample): "
        f"a table the graph computes at run time, fp32 and cast once per dtype its readers need, "
        f"like a weight; its {dtype_name(low)} readers do not stay fp32 for it"))


_GELU_PATH = frozenset({"Mul", "Add"})


def gelu_cubes(model: onnx.ModelProto, vertex_of: list[str]) -> dict[str, str]:
    """Rule O7: vertex -> reason for every ``Pow(x, 3)`` that only feeds a ``Tanh``."""
    inits = {t.name: t for t in model.graph.initializer}
    readers = value_readers(model.graph.node)
    outputs = {o.name for o in model.graph.output}
    found: dict[str, str] = {}
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Pow" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
            continue
        exponent = numpy_helper.to_array(inits[node.input[1]])
        if exponent.size != 1 or float(exponent.reshape(-1)[0]) != 3.0:
            continue
        frontier, ok, tanh = [(node.output[0], 0)], True, False
        while frontier and ok:
            v, depth = frontier.pop()
            for r in readers.get(v, ()):
                if r.op_type == "Tanh":
                    tanh = True
                elif r.op_type in _GELU_PATH and depth < 4 and v not in outputs:
                    frontier.append((r.output[0], depth + 1))
                else:
                    ok = False
            ok = ok and v not in outputs and bool(readers.get(v))
        if ok and tanh:
            found[vertex_of[idx]] = ("x**3 of the tanh GELU form: where it overflows, the Tanh it "
                                     "feeds is +-1 either way (the exact limit), so it runs low")
    return found


EMBEDDING_TABLES = ("shared", "low", "fp32")


def table_decisions(plan: Mapping[str, Decision], model: onnx.ModelProto, vertex_of: list[str],
                     slots: Mapping[int, NodeSlots], low: torch.dtype, mode: str) -> dict[str, Decision]:
    """Rule O8: the lookups that read their table in the low dtype."""
    if mode == "fp32":
        return {}
    inits = {t.name for t in model.graph.initializer}
    low_readers: dict[str, str] = {}  # table -> a low node reading it in a precision slot
    for idx, node in enumerate(model.graph.node):
        d = plan.get(vertex_of[idx])
        if d is not None and d.precision == low:
            for i, v in enumerate(node.input):
                if v in inits and i < len(slots[idx].inputs) and slots[idx].inputs[i] == "follow":
                    low_readers.setdefault(v, vertex_of[idx])
    out: dict[str, Decision] = {}
    name = dtype_name(low)
    for idx, node in enumerate(model.graph.node):
        d = plan.get(vertex_of[idx])
        table = node.input[0] if node.op_type == "Gather" and node.input else None
        if d is None or table not in inits or d.precision == low or d.kind != "embedding" \
                or (d.rule == Rule.R6_KEEP_FP32 or pass_of(d.rule) == "onnx.convert"):
            continue
        if table in low_readers:
            why = (f"table '{table}' is also read by {name} node '{low_readers[table]}': stored "
                   f"once in {name} (that reader rounds it anyway); the looked-up rows are those "
                   f"rounded values, cast up where fp32 ops read them")
        elif mode == "low":
            why = (f"embedding_tables='low': table '{table}' stored in {name} (half the bytes); "
                   f"each looked-up value rounded once, cast up where fp32 ops read it")
        else:
            continue
        out[vertex_of[idx]] = d.with_(precision=low, rule=Rule.O8_LOW_TABLE, reason=why)
    return out
