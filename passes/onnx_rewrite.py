"""onnx_rewrite (ONNX rewrite): apply a PrecisionPlan to an ``onnx.ModelProto``.

The ONNX front end (``amp_compiler.onnx.frontend``) describes every node's input and output
slots (``NodeSlots``) from the operator schema; this pass makes every node receive its inputs in
the dtype the plan and the schema ask for, and gives every output the dtype that results.

Rules:

    W1  a ``follow`` input (it shares the schema type variable of the node's first floating
        input) is delivered in the node's compute precision; a ``keep`` input (a fixed schema type
        or a second type variable: Resize scales/roi, BatchNormalization statistics, Reshape
        shapes, a Where condition) in the dtype the source model gave it; an ``any`` input (a type
        variable of that input alone: Shape, Cast, Pow's exponent) as it is;
    W2  a node with no float compute precision (comparisons, shape ops, user casts) reads its
        ``follow`` inputs as they are when they agree and it produces no float, else in their
        source dtypes: the source model was well typed, so that is always valid;
    W3  at most one Cast node per (value, dtype), shared by every consumer that needs it, placed
        right before its first consumer; never a Cast of a Cast (every cast reads the value
        itself), so no round-trip pair ``Cast(fp16) -> Cast(fp32)`` can appear;
    W4  an initializer is converted in place when every consumer needs it in one low dtype; when
        consumers differ it is duplicated (``<name>_f16`` beside the fp32 original). Values out
        of the low dtype's range are clamped to its largest finite value, with a warning naming
        the initializer. Initializers that are also graph inputs (overridable) are never changed
        in place;
    W5  graph outputs keep their names and get their source dtype back (``keep_io_types``), or
        the low dtype for floating outputs when ``keep_io_types=False``; floating graph inputs
        then take the low dtype too;
    W6  ``If``/``Loop``/``Scan`` bodies are left as they are: values they read from the outer
        graph are delivered in their source dtype (renamed inside the body when cast);
    W7  stale ``value_info`` is dropped and shape inference re-run, so readers see the new dtypes;
    W8  a ``ConstantOfShape`` fill read only through one of our Casts produces the cast's dtype
        itself (its fill value converted), and the Cast goes: the LSTM's zero initial state is
        made in float16 rather than made in float32 and cast.
    W9  no ``Transpose -> [Cast] -> MatMul`` that ONNX Runtime's ``MatmulTransposeFusion`` (1.32)
        rewrites and then abandons: the Transpose moves axis 1 first and keeps the last axis in
        the last two (ORT matches it as ``transBatch``) and the MatMul's other operand has
        another rank (``x.transpose(0, 1)`` into a Linear: ``nn.MultiheadAttention`` with
        ``batch_first=True``). ORT swaps the Cast above the Transpose, gives up on the unequal
        ranks without marking the graph modified, and its ``NchwcTransformer`` then reads the
        unresolved new Transpose's schema: a SIGSEGV in ``InferenceSession()`` at the default
        ``ORT_ENABLE_ALL`` (x86 CPU EP), which takes the user's process down. The Cast may be
        ours or the one ORT inserts before a float16/bfloat16 MatMul (no CPU kernel). Where the
        transposed operand is the left one, keeps its last axis and the right one is a matrix,
        ``MatMul(Transpose(x), W) == Transpose(MatMul(x, W))`` element for element, so the
        Transpose moves below the MatMul (and below the bias Add after it, a vector along the
        last axis): the same values in the same dtypes, the same Casts (the Cast reads ``x``),
        the same node count (one Transpose more where the Cast has other readers, which keep
        reading the transposed value); the moved Transpose says why in its ``amp_compiler.reason``
        metadata. Other matches are left as they are and reported (``RewriteResult.hazards``, a
        warning; the user's session can pass ``disabled_optimizers=["MatmulTransposeFusion"]``).
    W10 after W8, before W7's inference: ``onnx_cast_placement`` (rules C1-C6) removes the Casts
        the plan does not need -- no-op Casts, exact widening round trips, sibling Casts, Casts of
        initializers, and Casts that meet one of those once moved above a pure movement op --
        without changing any node's precision or any value (ONNX Runtime's outputs stay
        bit-identical); ``RewriteResult.placement`` lists each rewrite with its rule and reason.

    >>> result = rewrite_onnx(model, slots, vertex_of, plan, source_dtypes)
    >>> result.model, len(result.casts), result.converted
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .onnx_cast_placement import PlacementRemark, place_casts, value_readers
from .plan import PrecisionPlan

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
SHORT = {TensorProto.FLOAT16: "f16", TensorProto.BFLOAT16: "bf16", TensorProto.FLOAT: "f32",
         TensorProto.DOUBLE: "f64"}
TYPE_STR = {TensorProto.FLOAT: "tensor(float)", TensorProto.FLOAT16: "tensor(float16)",
            TensorProto.BFLOAT16: "tensor(bfloat16)", TensorProto.DOUBLE: "tensor(double)"}
SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})


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


@dataclass(frozen=True)
class NodeSlots:
    """How each input and output slot of one node relates to its compute precision (W1).

    ``inputs``: ``"follow"`` | ``"keep"`` | ``"any"`` per input; ``outputs``: ``"follow"``,
    ``"keep"``, or the index of the input whose delivered dtype the output takes.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str | int, ...]


@dataclass
class RewriteResult:
    """The rewritten model and what changed: casts (value, dtype, cast output name),
    initializers converted in place, duplicated, and clamped; Transposes moved (W9)."""

    model: onnx.ModelProto
    casts: list[tuple[str, int, str]] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    clamped: list[str] = field(default_factory=list)
    moved_transposes: list[str] = field(default_factory=list)  # W9: MatMuls a Transpose moved below
    hazards: list["TransposeHazard"] = field(default_factory=list)  # W9 matches left in place
    placement: list[PlacementRemark] = field(default_factory=list)  # W10: Casts removed or moved


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


def _subgraphs(node: onnx.NodeProto):
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
            for sub in _subgraphs(n):
                walk(sub, local)
            local |= set(n.output)

    for sub in _subgraphs(node):
        walk(sub, set())
    return found


def _rename_in_subgraphs(node: onnx.NodeProto, old: str, new: str) -> None:
    for g in _subgraphs(node):
        for n in g.node:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new
            _rename_in_subgraphs(n, old, new)
        for o in g.output:
            if o.name == old:  # a body output passing an outer value through: outputs are positional
                o.name = new


class _Names:
    """Fresh names that collide with no value or node name of the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used: set[str] = set()
        def walk(g):
            self.used |= {i.name for i in g.input} | {o.name for o in g.output} | {i.name for i in g.initializer}
            for n in g.node:
                self.used |= set(n.input) | set(n.output) | {n.name}
                for s in _subgraphs(n):
                    walk(s)
        walk(model.graph)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def rewrite_onnx(model: onnx.ModelProto, slots: Mapping[int, NodeSlots], vertex_of: Mapping[int, str],
                 plan: PrecisionPlan, source_types: Mapping[str, int], *,
                 keep_io_types: bool = True) -> RewriteResult:
    """Apply ``plan`` to a copy of ``model`` (rules W1-W10).

    ``slots`` and ``vertex_of`` are indexed by position in ``model.graph.node``; ``source_types``
    gives every value's element type in the source model (before any change).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    low = TORCH_TO_ONNX[plan.low_dtype]
    names = _Names(out)
    result = RewriteResult(out)

    inits = {t.name: t for t in g.initializer}
    overridable = {i.name for i in g.input} & set(inits)
    runtime: dict[str, int] = dict(source_types)
    if not keep_io_types:  # W5: floating graph inputs arrive in the low dtype
        for vi in g.input:
            if vi.name not in inits and elem_type(vi) in FLOAT_TYPES and elem_type(vi) != low:
                vi.type.tensor_type.elem_type = low
                runtime[vi.name] = low

    cast_cache: dict[tuple[str, int], str] = {}
    # initializer -> dtype -> [(node, input index)] (W4 decides after the pass)
    init_uses: dict[str, dict[int, list[tuple[onnx.NodeProto, int]]]] = {}
    new_nodes: list[onnx.NodeProto] = []

    def deliver(value: str, want: int, node: onnx.NodeProto, slot: int | None) -> str:
        """Name under which ``value`` is available as ``want`` (W3/W4); records initializer uses."""
        if value in inits and value not in overridable:
            init_uses.setdefault(value, {}).setdefault(want, []).append((node, slot))
            return value
        have = runtime.get(value)
        if have is None or have == want:
            return value
        key = (value, want)
        if key not in cast_cache:
            cast_out = names.fresh(f"{value}_{SHORT.get(want, want)}")
            new_nodes.append(helper.make_node("Cast", [value], [cast_out], to=want,
                                              name=names.fresh(f"amp_cast_{cast_out}")))
            runtime[cast_out] = want
            cast_cache[key] = cast_out
            result.casts.append((value, want, cast_out))
        return cast_cache[key]

    for idx, node in enumerate(list(g.node)):
        s = slots[idx]
        d = plan.get(vertex_of[idx])
        compute = TORCH_TO_ONNX.get(d.precision) if d is not None and d.precision is not None else None
        if compute not in FLOAT_TYPES or (d is not None and d.category in ("non_float", "cast")) \
                or (d is not None and d.rule == "R0:passthrough"):
            compute = None  # W2
        produces_float = any(source_types.get(o) in FLOAT_TYPES for o in node.output if o)
        follow_in = [(i, v) for i, v in enumerate(node.input)
                     if v and i < len(s.inputs) and s.inputs[i] == "follow" and source_types.get(v) in FLOAT_TYPES]
        as_is = compute is None and not produces_float and len({runtime.get(v) for _, v in follow_in}) <= 1
        delivered: dict[int, int | None] = {}
        for i, v in enumerate(node.input):
            if not v:
                continue
            role = s.inputs[i] if i < len(s.inputs) else "keep"
            src = source_types.get(v)
            if src not in FLOAT_TYPES or role == "any" or (role == "follow" and as_is):
                delivered[i] = runtime.get(v)
                if v in inits and role != "any" and src in FLOAT_TYPES:
                    deliver(v, src, node, i)  # an initializer read as it is: keeps its dtype
                continue
            want = compute if (role == "follow" and compute is not None) else src
            node.input[i] = deliver(v, want, node, i)
            delivered[i] = want
        if node.op_type in SUBGRAPH_OPS or any(True for _ in _subgraphs(node)):
            for v in outer_references(node):  # W6
                src = source_types.get(v)
                if src in FLOAT_TYPES:
                    new = deliver(v, src, node, None)
                    if new != v:
                        _rename_in_subgraphs(node, v, new)
        follow_dtype = compute if compute is not None else next(
            (delivered.get(i) for i, _ in follow_in if delivered.get(i) is not None), None)
        for k, o in enumerate(node.output):
            if not o:
                continue
            src = source_types.get(o)
            role = s.outputs[k] if k < len(s.outputs) else "keep"
            if src not in FLOAT_TYPES:
                runtime[o] = src
            elif role == "follow" and follow_dtype is not None:
                runtime[o] = follow_dtype
            elif isinstance(role, int) and delivered.get(role) is not None:
                runtime[o] = delivered[role]
            else:
                runtime[o] = src
        new_nodes.append(node)

    # W4 -- initializers: in place when every consumer needs one low dtype, else a copy
    new_inits: list[TensorProto] = []
    for name, uses in init_uses.items():
        src = inits[name].data_type
        wanted = [dt for dt in uses if dt != src]
        for dt in wanted:
            in_place = len(uses) == 1 and name not in overridable and not _is_graph_output(g, name)
            target = name if in_place else names.fresh(f"{name}_{SHORT.get(dt, dt)}")
            tensor, clamped = convert_tensor(inits[name], dt, name=target)
            if clamped:
                result.clamped.append(name)
                warnings.warn(f"initializer '{name}' has values beyond the {SHORT.get(dt)} range; "
                              f"clamped to +-{float(torch.finfo(ONNX_TO_TORCH[dt]).max):g}. Keep its "
                              f"consumers in fp32 (keep_fp32=...) if that matters", stacklevel=3)
            if in_place:
                inits[name].CopyFrom(tensor)
                result.converted.append(name)
            else:
                new_inits.append(tensor)
                result.duplicated.append(name)
                for node, slot in uses[dt]:
                    if slot is None:
                        _rename_in_subgraphs(node, name, target)
                    else:
                        node.input[slot] = target
            runtime[target] = dt
    g.initializer.extend(new_inits)

    # W5 -- graph outputs back to their source dtype (or low, keep_io_types=False)
    for vo in g.output:
        src = source_types.get(vo.name)
        if src not in FLOAT_TYPES:
            continue
        want = src if keep_io_types else low
        have = runtime.get(vo.name)
        if have == want:
            vo.type.tensor_type.elem_type = want
            continue
        producer = next((n for n in new_nodes if vo.name in n.output), None)
        if producer is None:
            continue  # an input or initializer passed straight out: left as it is
        inner = names.fresh(f"{vo.name}_{SHORT.get(have, have)}")
        producer.output[list(producer.output).index(vo.name)] = inner
        for n in new_nodes:
            for i, v in enumerate(n.input):
                if v == vo.name:
                    n.input[i] = inner
            _rename_in_subgraphs(n, vo.name, inner)
        new_nodes.append(helper.make_node("Cast", [inner], [vo.name], to=want,
                                          name=names.fresh(f"amp_cast_{vo.name}")))
        result.casts.append((inner, want, vo.name))
        vo.type.tensor_type.elem_type = want

    new_nodes = _fold_fill_casts(new_nodes, result, out_names={o.name for o in g.output})
    del g.node[:]
    g.node.extend(new_nodes)
    # W10 -- the same plan with fewer Casts, every value unchanged (onnx_cast_placement C1-C6)
    _, result.placement = place_casts(out)
    if result.placement:
        made = {o for n in g.node for o in n.output}
        result.casts = [r for r in result.casts if r[2] in made]
    # W7 -- value_info describes the old dtypes: drop it and infer again
    del g.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(out)
        g.value_info.extend(inferred.graph.value_info)
    except Exception:  # noqa: BLE001 -- value_info is optional; the checker reports real errors
        pass
    # W9 -- after W7: it reads ranks from the fresh value_info (and refreshes it when it moves)
    result.moved_transposes, result.hazards = sink_transposes(out)
    if result.hazards:
        warnings.warn(hazard_message(result.hazards), stacklevel=3)
    return result


def _fold_fill_casts(nodes: list[onnx.NodeProto], result: RewriteResult, *,
                     out_names: set[str]) -> list[onnx.NodeProto]:
    """W8: ``Cast(ConstantOfShape(v))`` with no other reader becomes ``ConstantOfShape(cast(v))``."""
    ours = {cast_out for _, _, cast_out in result.casts}
    readers: dict[str, int] = {}
    for n in nodes:
        for v in n.input:
            readers[v] = readers.get(v, 0) + 1
    producer = {o: n for n in nodes for o in n.output}
    drop: set[int] = set()
    for c in nodes:
        if c.op_type != "Cast" or c.output[0] not in ours:
            continue
        fill = producer.get(c.input[0])
        if fill is None or fill.op_type != "ConstantOfShape" or readers.get(c.input[0]) != 1 \
                or c.input[0] in out_names:
            continue
        value = next((a for a in fill.attribute if a.name == "value"), None)
        to = _cast_to(c)
        if value is None or value.t.data_type not in FLOAT_TYPES or to not in FLOAT_TYPES:
            continue
        value.t.CopyFrom(convert_tensor(value.t, to)[0])
        fill.output[0] = c.output[0]
        drop.add(id(c))
        result.casts = [r for r in result.casts if r[2] != c.output[0]]
    return [n for n in nodes if id(n) not in drop]


def _is_graph_output(g: onnx.GraphProto, name: str) -> bool:
    return any(o.name == name for o in g.output)


def set_io_dtype(model: onnx.ModelProto, low: int) -> onnx.ModelProto:
    """Floating graph inputs and outputs of ``model`` become ``low`` (in place; returns it).

    An input whose consumers include ``Cast(to=low)`` feeds them directly (the cast goes); its
    other consumers get one shared ``Cast`` back to the input's old dtype. An output made by
    ``Cast`` from a ``low`` value loses that cast; any other floating output gets a ``Cast`` to
    ``low`` under its own name.
    """
    g = model.graph
    types = value_types(g)
    inits = {t.name for t in g.initializer}
    names = _Names(model)
    nodes = list(g.node)
    out_names = {o.name for o in g.output}
    prepend: list[onnx.NodeProto] = []
    for vi in g.input:
        old = elem_type(vi)
        if vi.name in inits or old not in FLOAT_TYPES or old == low:
            continue
        vi.type.tensor_type.elem_type = low
        back: str | None = None
        for n in [n for n in nodes if vi.name in n.input]:  # snapshot: bypassed users join below
            if n.op_type == "Cast" and _cast_to(n) == low and n.output[0] not in out_names:
                for m in nodes:
                    for i, v in enumerate(m.input):
                        if v == n.output[0]:
                            m.input[i] = vi.name
                nodes.remove(n)
                continue
            if back is None:
                back = names.fresh(f"{vi.name}_{SHORT.get(old, old)}")
                prepend.append(helper.make_node("Cast", [vi.name], [back], to=old,
                                                name=names.fresh(f"amp_cast_{back}")))
            for i, v in enumerate(n.input):
                if v == vi.name:
                    n.input[i] = back
    nodes = prepend + nodes
    for vo in g.output:
        old = elem_type(vo) or types.get(vo.name)
        if old not in FLOAT_TYPES or old == low:
            continue
        producer = next((n for n in nodes if vo.name in n.output), None)
        consumers = [n for n in nodes if vo.name in n.input]
        if producer is not None and producer.op_type == "Cast" and not consumers \
                and types.get(producer.input[0]) == low:
            source = producer.input[0]
            nodes.remove(producer)
            for n in nodes:
                for i, v in enumerate(n.output):
                    if v == source:
                        n.output[i] = vo.name
                for i, v in enumerate(n.input):
                    if v == source:
                        n.input[i] = vo.name
            for o in g.output:
                if o.name == source:
                    o.name = vo.name
        elif producer is not None:
            inner = names.fresh(f"{vo.name}_{SHORT.get(old, old)}")
            producer.output[list(producer.output).index(vo.name)] = inner
            for n in consumers:
                for i, v in enumerate(n.input):
                    if v == vo.name:
                        n.input[i] = inner
            nodes.append(helper.make_node("Cast", [inner], [vo.name], to=low,
                                          name=names.fresh(f"amp_cast_{vo.name}")))
        vo.type.tensor_type.elem_type = low
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return model


def _cast_to(node: onnx.NodeProto) -> int | None:
    for a in node.attribute:
        if a.name == "to":
            return a.i
    return None


# -- W9: no Transpose -> [Cast] -> MatMul that ONNX Runtime's MatmulTransposeFusion breaks -------

REASON_KEY = "amp_compiler.reason"  # node metadata entry saying why we changed or made a node
# MatMul input types ONNX Runtime's CPU EP has no MatMul kernel for (x86): it runs such a MatMul
# in float32 behind a Cast it inserts itself, so a Transpose feeding it becomes Transpose -> Cast.
_NO_CPU_MATMUL = frozenset({TensorProto.FLOAT16, TensorProto.BFLOAT16})


@dataclass(frozen=True)
class TransposeHazard:
    """A MatMul input ONNX Runtime's MatmulTransposeFusion rewrites and then abandons (W9):
    ``Transpose(perm) [-> Cast] -> MatMul`` whose other operand has another (or no known) rank."""

    matmul: str           # node names
    slot: int             # the MatMul input the Transpose reaches
    transpose: str
    cast: str | None      # our Cast in between; None where ONNX Runtime's inserted Cast will be
    perm: tuple[int, ...]
    other_rank: int | None


def ort_fused_transpose(perm) -> tuple[bool, bool] | None:
    """(trans, trans_batch) when ONNX Runtime's MatmulTransposeFusion folds a Transpose with
    ``perm`` into a MatMul input, else None (its ``GetTransposeNodeFromOutput``, 1.32): the last
    axis ends in the last two, and batch axes stay contiguous with axis 0 or 1 first."""
    r = len(perm)
    if r < 2 or r - 1 not in perm[-2:]:
        return None
    if r >= 3 and (perm[0] not in (0, 1) or any(perm[i] + 1 != perm[i + 1] for i in range(r - 3))):
        return None
    return perm[-2] == r - 1, r >= 3 and perm[0] == 1


@dataclass
class _Facts:
    """Element type and rank of the values of a graph, kept up to date by W9's rewrites."""

    types: dict[str, int]
    ranks: dict[str, int]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_Facts":
        """From the recorded value_info, inferred where it does not cover every node output."""
        g = model.graph
        known = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}
        if not {o for n in g.node for o in n.output if o} <= known.keys():
            try:
                inferred = onnx.shape_inference.infer_shapes(model).graph
                known.update({vi.name: vi for vi in inferred.value_info if vi.name not in known})
            except Exception:  # noqa: BLE001 -- unknown ranks count as hazards, never rewritten
                pass
        ranks = {name: len(vi.type.tensor_type.shape.dim) for name, vi in known.items()
                 if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
        ranks.update({t.name: len(t.dims) for t in g.initializer})
        for n in g.node:
            if n.op_type == "Constant":
                ranks.update({n.output[0]: len(a.t.dims) for a in n.attribute if a.name == "value"})
        types = {name: et for name, vi in known.items() if (et := elem_type(vi)) is not None}
        types.update(value_types(g))  # initializers and Constants
        return cls(types, ranks)


def _perm_of(node: onnx.NodeProto, rank: int | None) -> tuple[int, ...] | None:
    for a in node.attribute:
        if a.name == "perm":
            return tuple(a.ints)
    return tuple(reversed(range(rank))) if rank is not None else None  # the default: reverse


def transpose_hazards(model: onnx.ModelProto) -> list[TransposeHazard]:
    """Every top-level MatMul input of ``model`` that matches W9's pattern."""
    return [h for h, *_ in _hazards(model, _Facts.of(model))]


def _hazards(model: onnx.ModelProto, facts: _Facts):
    """W9's matches: (hazard, MatMul node, Transpose node, Cast node or None); nodes by identity,
    since node names may be empty or repeated."""
    g = model.graph
    types, ranks = facts.types, facts.ranks
    producer = {o: n for n in g.node for o in n.output if o}
    outputs = {o.name for o in g.output}
    found = []
    for node in g.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        for slot, v in enumerate(node.input):
            src, cast = producer.get(v), None
            if src is not None and src.op_type == "Cast":
                cast, src = src, producer.get(src.input[0])
            elif types.get(v) not in _NO_CPU_MATMUL:
                continue  # a kernel for this type: ONNX Runtime inserts no Cast here
            if src is None or src.op_type != "Transpose" or src.output[0] in outputs:
                continue
            perm = _perm_of(src, ranks.get(src.input[0]))
            fused = ort_fused_transpose(perm) if perm is not None else None
            other = ranks.get(node.input[1 - slot])
            if fused is None or not fused[1] or (other == len(perm) and v in ranks):
                continue  # not matched, or fused for good (it gives up on batch axes of unequal rank)
            hazard = TransposeHazard(node.name, slot, src.name, cast.name if cast else None, perm, other)
            found.append((hazard, node, src, cast))
    return found


def _movable(h: TransposeHazard) -> bool:
    """The transposed operand is the left one, its last axis stays last and the right one is a
    matrix: then MatMul(Transpose(x), W) == Transpose(MatMul(x, W)), element for element."""
    return h.slot == 0 and h.perm[-1] == len(h.perm) - 1 and h.other_rank == 2


def sink_transposes(model: onnx.ModelProto) -> tuple[list[str], list[TransposeHazard]]:
    """W9, in place: move each movable hazard's Transpose below its MatMul (and the bias Add
    after it). Returns the MatMuls rewritten and the hazards left (not movable)."""
    g = model.graph
    facts = _Facts.of(model)
    names = _Names(model)
    moved: list[str] = []
    reshaped: set[str] = set()
    for _ in range(len(g.node)):  # one at a time: a shared Cast leaves a new hazard downstream
        match = next((m for m in _hazards(model, facts) if _movable(m[0])), None)
        if match is None:
            break
        reshaped |= _sink(model, *match, facts, names)
        moved.append(match[0].matmul)
    if reshaped:  # their recorded shapes are the transposed ones; value_info is optional
        keep = [vi for vi in g.value_info if vi.name not in reshaped]
        del g.value_info[:]
        g.value_info.extend(keep)
    return moved, [h for h, *_ in _hazards(model, facts) if not _movable(h)]


def _sink(model: onnx.ModelProto, h: TransposeHazard, mm: onnx.NodeProto, tr: onnx.NodeProto,
          cast: onnx.NodeProto | None, facts: _Facts, names: _Names) -> set[str]:
    """Move one hazard's Transpose; returns the values that keep their name but now hold the
    untransposed shape (the others keep their shapes, or are new)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    readers = value_readers(g.node)
    rank, ranks, types = len(h.perm), facts.ranks, facts.types
    after: dict[int, onnx.NodeProto] = {}  # id(node) -> the node placed right after it

    def transpose(src: str, out: str, what: str) -> onnx.NodeProto:
        node = helper.make_node("Transpose", [src], [out], perm=list(h.perm),
                                name=names.fresh(f"{tr.name}_{what}"))
        node.metadata_props.extend(p for p in tr.metadata_props if p.key != REASON_KEY)
        node.metadata_props.add(key=REASON_KEY, value=(
            f"W9: Transpose(perm={list(h.perm)}) moved below MatMul '{mm.name}': ONNX Runtime "
            f"(1.32, MatmulTransposeFusion then NchwcTransformer) crashes loading a file where it "
            f"reaches a MatMul through a Cast and the other operand has another rank"))
        return node

    x, reshaped = tr.input[0], set()
    if cast is not None:  # the Cast reads x itself: same elements, one Cast as before
        cast.input[0] = x
        others = [n for n in readers.get(cast.output[0], []) if n is not mm]
        if others or cast.output[0] in outputs:  # they still read the transposed value
            inner = names.fresh(f"{cast.output[0]}_untransposed")
            after[id(cast)] = transpose(inner, cast.output[0], "for_others")
            types[inner] = types.get(cast.output[0], _cast_to(cast))
            cast.output[0] = inner
            ranks[inner] = rank
        else:
            reshaped.add(cast.output[0])
        mm.input[0] = cast.output[0]
    else:
        mm.input[0] = x
    last = mm
    follow = readers.get(mm.output[0], [])
    if len(follow) == 1 and follow[0].op_type == "Add" and mm.output[0] not in outputs:
        add = follow[0]
        bias = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
        if ranks.get(bias, rank) <= 1:  # broadcast along the last axis only: commutes too
            last = add
            reshaped.add(mm.output[0])
    inner = names.fresh(f"{last.output[0]}_untransposed")
    after[id(last)] = transpose(inner, last.output[0], "sunk")
    if last.output[0] in types:
        types[inner] = types[last.output[0]]
    last.output[0] = inner
    ranks[inner] = rank
    still_read = any(tr.output[0] in n.input for n in g.node)
    nodes = []
    for n in g.node:
        if n is tr and not still_read:
            continue
        nodes.append(n)
        if id(n) in after:
            nodes.append(after[id(n)])
    del g.node[:]
    g.node.extend(nodes)
    return reshaped


def hazard_message(hazards: list[TransposeHazard]) -> str:
    """One sentence for the W9 matches left in a file (logged by export, warned by convert_onnx)."""
    where = ", ".join(f"{h.transpose} -> {h.matmul}" for h in hazards[:5])
    more = f" and {len(hazards) - 5} more" if len(hazards) > 5 else ""
    return (f"ONNX Runtime 1.32 may crash (SIGSEGV) loading this model at the default optimization "
            f"level: its MatmulTransposeFusion breaks Transpose -> MatMul at {where}{more}, which "
            f"could not be rewritten; load it with "
            f"InferenceSession(..., disabled_optimizers=['MatmulTransposeFusion'])")
