"""onnx_graph: reading and naming the parts of an ``onnx.ModelProto`` that the ONNX passes share.

Element types and their torch dtypes, the schema type variable of each slot, the element type
of every value (declared or inferred), the model's opset, tensors converted to another float
type, the values a node's subgraphs read from outside, and fresh names. ``onnx_rewrite`` (the
Cast/initializer rewrite), ``onnx_transposes`` (W9) and the ONNX front end and exporter in
``amp_compiler.onnx`` read graphs through these.

    >>> types = value_types(model.graph)
    >>> fp16 = convert_tensor(weight, TensorProto.FLOAT16)[0]
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .dtypes import short_name

# ONNX element types <-> torch dtypes (float types are the ones we ever cast between).
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.DOUBLE: torch.float64,
    TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32, TensorProto.INT16: torch.int16,
    TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8, TensorProto.BOOL: torch.bool,
}
TORCH_TO_ONNX: dict[torch.dtype, int] = {v: k for k, v in ONNX_TO_TORCH.items()}
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                         TensorProto.DOUBLE})
# Short names for value-name suffixes (``x_f16``), and the schema type strings of float types.
SHORT = {t: short_name(ONNX_TO_TORCH[t]) for t in FLOAT_TYPES}
TYPE_STR = {TensorProto.FLOAT: "tensor(float)", TensorProto.FLOAT16: "tensor(float16)",
            TensorProto.BFLOAT16: "tensor(bfloat16)", TensorProto.DOUBLE: "tensor(double)"}
SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})
REASON_KEY = "amp_compiler.reason"  # node metadata entry saying why we changed or made a node


def fresh_name(used: set[str], base: str) -> str:
    """``base``, or ``base_2``, ``base_3``... the first not in ``used`` (which it joins)."""
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def slot_type_vars(params, count: int) -> list[str | None]:
    """The schema type string of each of ``count`` slots (a type variable such as ``T``, or a
    fixed ``tensor(int64)``) from an op schema's formal ``params``: slots past them repeat a
    variadic last one; a heterogeneous variadic slot is its own variable (``T#3``); None where
    the schema has no such slot."""
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    out: list[str | None] = []
    for i in range(count):
        if i < len(params):
            f = params[i]
        elif params and params[-1].option == variadic:
            f = params[-1]
        else:
            out.append(None)
            continue
        out.append(f"{f.type_str}#{i}" if f.option == variadic and not f.is_homogeneous
                   else f.type_str)
    return out


def opset_of(model: onnx.ModelProto, domain: str = "") -> int | None:
    """The opset ``model`` imports for ``domain`` (``""``: the default domain, also written
    ``ai.onnx``); None when it imports none."""
    for o in model.opset_import:
        if o.domain == domain or (domain == "" and o.domain == "ai.onnx"):
            return o.version
    return None


def elem_type(vi: onnx.ValueInfoProto) -> int | None:
    """Element type of a tensor-typed ValueInfo, None for sequences/maps/unknown."""
    t = vi.type
    if t.HasField("tensor_type") and t.tensor_type.elem_type:
        return t.tensor_type.elem_type
    return None


def value_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every tensor value of ``graph`` (inputs, initializers, value_info, outputs)."""
    types: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        et = elem_type(vi)
        if et is not None:
            types[vi.name] = et
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = a.t.data_type
    return types


def inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    """``value_types`` after shape inference; the declared types where inference fails."""
    try:
        return value_types(onnx.shape_inference.infer_shapes(model).graph)
    except Exception:  # noqa: BLE001 -- declared types are all we have then
        return value_types(model.graph)


def refresh_value_info(model: onnx.ModelProto) -> None:
    """Recorded value types describe the graph before a retyping: drop them and infer again."""
    g = model.graph
    del g.value_info[:]
    try:
        g.value_info.extend(onnx.shape_inference.infer_shapes(model).graph.value_info)
    except Exception:  # noqa: BLE001 -- value_info is optional; the checker reports real errors
        pass


def convert_tensor(tensor: TensorProto, to: int, *, name: str | None = None) -> tuple[TensorProto, bool]:
    """``tensor`` as element type ``to`` (float16 / bfloat16 / float), clamped to its finite range.

    Returns (new tensor, clamped?). bfloat16 goes through torch (numpy has no bfloat16):
    round to nearest even, stored as raw 16-bit words.
    """
    array = numpy_helper.to_array(tensor).astype(np.float32)
    low = ONNX_TO_TORCH[to]
    limit = float(torch.finfo(low).max)
    finite = np.isfinite(array)
    clamped = bool(np.any(np.abs(array[finite]) > limit)) if finite.any() else False
    if clamped:
        array = np.where(finite, np.clip(array, -limit, limit), array)
    if to == TensorProto.BFLOAT16:
        raw = torch.from_numpy(np.ascontiguousarray(array)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    else:
        raw = array.astype(helper.tensor_dtype_to_np_dtype(to)).tobytes()
    out = TensorProto(name=name or tensor.name, data_type=to, dims=list(tensor.dims), raw_data=raw)
    return out, clamped


def cast_to(node: onnx.NodeProto) -> int | None:
    """The ``to`` attribute of a Cast node."""
    for a in node.attribute:
        if a.name == "to":
            return a.i
    return None


def subgraphs(node: onnx.NodeProto):
    """The bodies of an ``If`` / ``Loop`` / ``Scan`` (any graph-valued attribute)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def outer_references(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read from enclosing scopes (W6), in first-use order."""
    found: list[str] = []

    def walk(g: onnx.GraphProto, outer_defined: set[str]) -> None:
        local = set(outer_defined) | {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            for name in n.input:
                if name and name not in local and name not in found:
                    found.append(name)
            for sub in subgraphs(n):
                walk(sub, local)
            local |= set(n.output)

    for sub in subgraphs(node):
        walk(sub, set())
    return found


def rename_in_subgraphs(node: onnx.NodeProto, old: str, new: str) -> None:
    """Inside ``node``'s subgraphs, read the outer value ``old`` as ``new``."""
    for g in subgraphs(node):
        for n in g.node:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new
            rename_in_subgraphs(n, old, new)
        for o in g.output:
            if o.name == old:  # a body output passing an outer value through: outputs are positional
                o.name = new


class FreshNames:
    """Fresh names that collide with no value or node name of the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used: set[str] = set()

        def walk(g):
            self.used |= {i.name for i in g.input} | {o.name for o in g.output} | {i.name for i in g.initializer}
            for n in g.node:
                self.used |= set(n.input) | set(n.output) | {n.name}
                for s in subgraphs(n):
                    walk(s)
        walk(model.graph)

    def fresh(self, base: str) -> str:
        return fresh_name(self.used, base)
