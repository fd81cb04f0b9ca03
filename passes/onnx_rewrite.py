"""onnx_rewrite (ONNX rewrite): apply a PrecisionPlan to an ``onnx.ModelProto`` as Cast nodes
and low-precision initializers.

The ONNX front end (``amp_compiler.onnx.frontend``) describes every node's input and output
slots (``NodeSlots``) from the operator schema; this pass makes every node receive its inputs in
the dtype the plan and the schema ask for, and gives every output the dtype that results.
``set_io_dtype`` retypes an exported model's floating inputs and outputs the same way (W5).

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
    W9  last: no ``Transpose -> [Cast] -> MatMul`` that ONNX Runtime's ``MatmulTransposeFusion``
        (1.32) rewrites, abandons and then crashes on (``onnx_transposes.sink_transposes``): a
        movable Transpose moves below its MatMul (the same values and Casts), the others are
        reported (``RewriteResult.hazards``, a warning).
    W10 after W8, before W7's inference: ``onnx_cast_placement`` (rules C1-C6) removes the Casts
        the plan does not need -- no-op Casts, exact widening round trips, sibling Casts, Casts of
        initializers, and Casts that meet one of those once moved above a pure movement op --
        without changing any node's precision or any value (ONNX Runtime's outputs stay
        bit-identical); the result's remarks list each rewrite with its rule and reason.

    >>> rewritten = rewrite_onnx(model, slots, vertex_of, plan, source_dtypes)
    >>> rewritten.graph_module, len(rewritten.facts.casts), rewritten.facts.converted
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping

import onnx
import torch
from onnx import TensorProto, helper

from .infra import PassResult
from .onnx_cast_placement import place_casts
from .onnx_graph import (FLOAT_TYPES, ONNX_TO_TORCH, SHORT, SUBGRAPH_OPS, TORCH_TO_ONNX, FreshNames,
                         cast_to, convert_tensor, elem_type, outer_references, refresh_value_info,
                         rename_in_subgraphs, subgraphs, value_types)
from .onnx_transposes import TransposeHazard, hazard_message, sink_transposes
from .plan import PrecisionPlan
from .rules import Rule


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
    """What the rewrite changed (the ``facts`` of its PassResult; the model is its
    ``graph_module``, W9's and W10's remarks its ``remarks``): casts (value, dtype, cast output
    name), initializers converted in place, duplicated, and clamped; Transposes moved (W9)."""

    casts: list[tuple[str, int, str]] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    clamped: list[str] = field(default_factory=list)
    moved_transposes: list[str] = field(default_factory=list)  # W9: MatMuls a Transpose moved below
    hazards: list[TransposeHazard] = field(default_factory=list)  # W9 matches left in place


def rewrite_onnx(model: onnx.ModelProto, slots: Mapping[int, NodeSlots], vertex_of: Mapping[int, str],
                 plan: PrecisionPlan, source_types: Mapping[str, int], *,
                 keep_io_types: bool = True) -> PassResult:
    """Apply ``plan`` to a copy of ``model`` (rules W1-W10).

    ``slots`` and ``vertex_of`` are indexed by position in ``model.graph.node``; ``source_types``
    gives every value's element type in the source model (before any change). The result's
    remarks are W10's and W9's; ``facts`` is the ``RewriteResult`` (casts, initializers).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    low = TORCH_TO_ONNX[plan.low_dtype]
    names = FreshNames(out)
    result = RewriteResult()

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
                or (d is not None and d.rule == Rule.R0_PASSTHROUGH):
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
        if node.op_type in SUBGRAPH_OPS or any(True for _ in subgraphs(node)):
            for v in outer_references(node):  # W6
                src = source_types.get(v)
                if src in FLOAT_TYPES:
                    new = deliver(v, src, node, None)
                    if new != v:
                        rename_in_subgraphs(node, v, new)
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
                        rename_in_subgraphs(node, name, target)
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
        cast = _cast_output(new_nodes, producer, vo.name, have, want, names)
        new_nodes.append(cast)
        result.casts.append((cast.input[0], want, vo.name))
        vo.type.tensor_type.elem_type = want

    new_nodes = _fold_fill_casts(new_nodes, result, out_names={o.name for o in g.output})
    del g.node[:]
    g.node.extend(new_nodes)
    # W10 -- the same plan with fewer Casts, every value unchanged (onnx_cast_placement C1-C6)
    placed = place_casts(out).remarks
    if placed:
        made = {o for n in g.node for o in n.output}
        result.casts = [r for r in result.casts if r[2] in made]
    # W7 -- value_info describes the old dtypes: drop it and infer again
    refresh_value_info(out)
    # W9 -- after W7: it reads ranks from the fresh value_info (and refreshes it when it moves)
    sunk = sink_transposes(out)
    result.moved_transposes, result.hazards = sunk.facts
    if result.hazards:
        warnings.warn(hazard_message(result.hazards), stacklevel=3)
    return PassResult(out, True, placed + sunk.remarks, result)


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
        to = cast_to(c)
        if value is None or value.t.data_type not in FLOAT_TYPES or to not in FLOAT_TYPES:
            continue
        value.t.CopyFrom(convert_tensor(value.t, to)[0])
        fill.output[0] = c.output[0]
        drop.add(id(c))
        result.casts = [r for r in result.casts if r[2] != c.output[0]]
    return [n for n in nodes if id(n) not in drop]


def _cast_output(nodes: list[onnx.NodeProto], producer: onnx.NodeProto, name: str, have: int,
                 to: int, names: FreshNames) -> onnx.NodeProto:
    """The Cast that makes graph output ``name`` of type ``to`` (W5, ``set_io_dtype``): its
    producer writes a fresh value of type ``have`` instead, which every reader of ``name`` in
    ``nodes`` (and in their subgraphs) reads now."""
    inner = names.fresh(f"{name}_{SHORT.get(have, have)}")
    producer.output[list(producer.output).index(name)] = inner
    for n in nodes:
        for i, v in enumerate(n.input):
            if v == name:
                n.input[i] = inner
        rename_in_subgraphs(n, name, inner)
    return helper.make_node("Cast", [inner], [name], to=to, name=names.fresh(f"amp_cast_{name}"))


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
    names = FreshNames(model)
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
            if n.op_type == "Cast" and cast_to(n) == low and n.output[0] not in out_names:
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
            nodes.append(_cast_output(nodes, producer, vo.name, old, low, names))
        vo.type.tensor_type.elem_type = low
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return model
