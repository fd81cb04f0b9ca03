"""onnx_cast_placement (ONNX rewrite): fewer Cast nodes for the same plan, every value unchanged.

``rewrite_onnx`` (W1-W9) applies a PrecisionPlan with at most one Cast per (value, dtype); this
pass then removes the Casts that a plan does not need, among ours and those of the source model.
It never changes the precision any compute node runs in, nor any value a node computes: each
rule below is exact, element for element (so ONNX Runtime's outputs are bit-identical before and
after). Casts move only across pure movement ops, which copy elements and compute nothing.

Rules:

    C1  a Cast to the element type its input already has is the identity: its readers read the
        input. (A Cast that is itself a graph output keeps its node: outputs keep their names.)
    C2  ``Cast(Cast(x: A, B), C)`` with ``B`` representing every ``A`` value exactly (float16 or
        bfloat16 -> float32 -> float64, float32 -> float64: a widening) is ``Cast(x, C)``, and ``x``
        itself when ``C == A``. A narrowing inner Cast (float32 -> float16 -> float32) rounds and is
        never removed: that round trip is a value the plan asked for.
    C3  two Casts of the same value to the same type compute the same tensor: one stays (the
        first), the other's readers read it. W3 already gives our Casts one per (value, dtype);
        this merges the ones C1/C2/C5 and the source model leave.
    C4  a Cast of an initializer (not overridable, i.e. not a graph input) to a float type becomes
        a stored initializer of that type, converted exactly as the Cast converts it (round to
        nearest even; float16 overflow gives inf, as the Cast does -- no clamping here, unlike W4's
        planned conversion). Shared by all such Casts; the original goes when nothing reads it.
        A widening Cast of an initializer of more than ``SMALL`` elements is kept: storing the
        wide copy would add its bytes to the file, which the plan (O8's low embedding tables)
        chose not to store; one Cast node on the looked-up rows costs less.
    C5  ``Cast(Move(x), T)`` where ``Move`` is a pure movement op on its data input (Reshape,
        Transpose, Squeeze, Unsqueeze, Flatten, Expand, Identity, Slice, Gather, GatherElements,
        GatherND, Tile, DepthToSpace, SpaceToDepth) equals ``Move(Cast(x, T))`` element for
        element. The Cast moves above the Move only when that removes a Cast: ``x`` is an
        initializer (C4 folds it), already ``T`` (C1), made by a widening Cast (C2), or already
        cast to ``T`` (C3). The Move then reads the cast value; where ``Move(x)`` has other
        readers a copy of the Move (same inputs, attributes) serves the Cast's readers instead:
        one Cast fewer, no node more.
    C6  two identical movement nodes (op, attributes, inputs) compute the same tensor: one stays
        (C5's copies meet existing ones, e.g. two Reshapes of one cast value).

The pass runs to a fixed point. Each rewrite is recorded as a remark (rule, node, reason).

    >>> remarks = place_casts(model).remarks
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .infra import PassResult, Remark, result
from .onnx_graph import SHORT, fresh_name
from .rules import Rule

FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE)
# C2: (a, b) where b holds every value of a exactly (a float widening).
WIDENS = frozenset({(TensorProto.FLOAT16, TensorProto.FLOAT), (TensorProto.FLOAT16, TensorProto.DOUBLE),
                    (TensorProto.BFLOAT16, TensorProto.FLOAT), (TensorProto.BFLOAT16, TensorProto.DOUBLE),
                    (TensorProto.FLOAT, TensorProto.DOUBLE)})
# C5: movement ops whose input 0 is the data (every output element is a copy of one of its
# elements) and whose other inputs are shapes, indices or axes; each accepts any element type
# (opset >= 13) and its output has the data input's type.
MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Identity",
                      "Slice", "Gather", "GatherElements", "GatherND", "Tile", "DepthToSpace",
                      "SpaceToDepth"})
# C4: initializers up to this many elements are folded even when that widens them (scales,
# biases, fill values: a few KiB); larger ones keep their narrow storage and the Cast.
SMALL = 4096


def _to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor value: declared, else inferred (best effort)."""
    g = model.graph
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    del fresh.graph.value_info[:]  # recorded value_info may predate a rewrite (W7 drops it later)
    try:
        vis = list(onnx.shape_inference.infer_shapes(fresh).graph.value_info)
    except Exception:  # noqa: BLE001 -- unknown types only make rules not apply
        vis = []
    types: dict[str, int] = {}
    for vi in vis + list(g.input) + list(g.output):
        t = vi.type
        if t.HasField("tensor_type") and t.tensor_type.elem_type:
            types[vi.name] = t.tensor_type.elem_type
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Cast" and _default_domain(n) and _to(n) is not None:
            types[n.output[0]] = _to(n)
    return types


def cast_exactly(tensor: TensorProto, to: int, name: str) -> TensorProto:
    """``tensor`` converted as ONNX ``Cast`` converts it (C4): round to nearest even, overflow to
    inf, NaN kept. bfloat16 through torch (numpy has none), stored as raw 16-bit words."""
    array = numpy_helper.to_array(tensor)
    if to == TensorProto.BFLOAT16:
        raw = (torch.from_numpy(np.ascontiguousarray(array.astype(np.float32))).to(torch.bfloat16)
               .view(torch.int16).numpy().tobytes())
        return TensorProto(name=name, data_type=to, dims=list(tensor.dims), raw_data=raw)
    with np.errstate(over="ignore"):  # overflow to inf is what Cast does
        return numpy_helper.from_array(array.astype(helper.tensor_dtype_to_np_dtype(to)), name)


def value_readers(nodes) -> dict[str, list[onnx.NodeProto]]:
    """value name -> the nodes (of ``nodes``, in order) that read it; a node reading a value
    twice (``Mul(d, d)``) is listed twice."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for v in node.input:
            readers.setdefault(v, []).append(node)
    return readers


def _foldable(tensor: TensorProto, to: int) -> bool:
    """C4: storing ``tensor`` as ``to`` adds no more than a small initializer's bytes."""
    widens = (tensor.data_type, to) in WIDENS
    return not widens or int(np.prod(tensor.dims, dtype=np.int64)) <= SMALL


def place_casts(model: onnx.ModelProto) -> PassResult:
    """Rules C1-C6 on the top-level graph of ``model``, in place; one remark per Cast removed or
    moved.

    Subgraph bodies (If/Loop/Scan) are not rewritten, and a value a body reads from the outer
    graph is never renamed away (its producer stays).
    """
    g = model.graph
    remarks: list[Remark] = []
    types = _types(model)
    outputs = {o.name for o in g.output}
    graph_inputs = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer}
    used = {i.name for i in g.input} | outputs | set(inits)
    for n in g.node:
        used |= set(n.input) | set(n.output) | {n.name}
    outer_read: set[str] = set()  # names a subgraph reads: they must keep existing

    def walk(sub: onnx.GraphProto) -> None:
        for n in sub.node:
            outer_read.update(n.input)
            for a in n.attribute:
                for s in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(s)

    for n in g.node:
        for a in n.attribute:
            for s in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                walk(s)
    folded: dict[tuple[str, int], str] = {}  # C4: (initializer, type) -> stored initializer

    nodes = list(g.node)

    def replace_uses(old: str, new: str) -> None:
        for n in nodes:
            for i, v in enumerate(n.input):
                if v == old:
                    n.input[i] = new

    def removable(value: str) -> bool:
        """A node's output that may disappear (its readers redirected)."""
        return value not in outputs and value not in outer_read

    def one_pass() -> bool:
        producer = {o: n for n in nodes for o in n.output if o}
        readers = value_readers(nodes)
        seen_casts: dict[tuple[str, int], onnx.NodeProto] = {}
        seen_moves: dict[tuple, onnx.NodeProto] = {}
        for c in nodes:
            if c.op_type in MOVEMENT and _default_domain(c) and len(c.output) == 1:  # C6
                key = (c.op_type, tuple(c.input), tuple(a.SerializeToString() for a in c.attribute))
                first = seen_moves.get(key)
                if first is not None and removable(c.output[0]):
                    replace_uses(c.output[0], first.output[0])
                    nodes.remove(c)
                    remarks.append(_remark(Rule.C6_SAME_MOVE, c.name, f"the same {c.op_type} of the same "
                                                   f"inputs as '{first.name}'"))
                    return True
                seen_moves.setdefault(key, c)
            if c.op_type != "Cast" or not _default_domain(c) or len(c.input) != 1:
                continue
            x, y, to = c.input[0], c.output[0], _to(c)
            have = types.get(x)
            if to is None:
                continue
            if have == to and removable(y):  # C1
                replace_uses(y, x)
                nodes.remove(c)
                remarks.append(_remark(Rule.C1_IDENTITY_CAST, c.name, f"'{x}' already has element type {to}"))
                return True
            inner = producer.get(x)
            if inner is not None and inner.op_type == "Cast" and _default_domain(inner):  # C2
                a, b = types.get(inner.input[0]), _to(inner)
                if (a, b) in WIDENS:
                    c.input[0] = inner.input[0]
                    remarks.append(_remark(Rule.C2_WIDENING, c.name, f"reads '{inner.input[0]}' directly: "
                                                   f"'{inner.name}' widens {SHORT.get(a)} -> "
                                                   f"{SHORT.get(b)} exactly"))
                    if not readers.get(x, [])[1:] and removable(x):
                        nodes.remove(inner)  # its only reader was c
                    return True
            first = seen_casts.get((x, to))
            if first is not None and removable(y):  # C3
                replace_uses(y, first.output[0])
                nodes.remove(c)
                remarks.append(_remark(Rule.C3_SIBLINGS, c.name, f"'{first.name}' already casts '{x}' "
                                               f"to the same type"))
                return True
            seen_casts.setdefault((x, to), c)
            if x in inits and x not in graph_inputs and to in FLOATS \
                    and inits[x].data_type in FLOATS and removable(y) and _foldable(inits[x], to):  # C4
                key = (x, to)
                if key not in folded:
                    name = fresh_name(used, f"{x}_{SHORT[to]}")
                    g.initializer.append(cast_exactly(inits[x], to, name))
                    inits[name] = g.initializer[-1]
                    types[name] = to
                    folded[key] = name
                replace_uses(y, folded[key])
                nodes.remove(c)
                remarks.append(_remark(Rule.C4_INITIALIZER, c.name, f"initializer '{x}' stored as "
                                               f"{SHORT[to]} ('{folded[key]}')"))
                return True
            move = inner
            if move is None or move.op_type not in MOVEMENT or not _default_domain(move) \
                    or len(move.output) != 1 or not removable(y):
                continue
            data = move.input[0]
            gains = (data in inits and data not in graph_inputs and to in FLOATS
                     and inits[data].data_type in FLOATS and _foldable(inits[data], to)) \
                or types.get(data) == to \
                or any(r.op_type == "Cast" and _to(r) == to and r is not c for r in readers.get(data, [])) \
                or (producer.get(data) is not None and producer[data].op_type == "Cast"
                    and (types.get(producer[data].input[0]), _to(producer[data])) in WIDENS)
            if not gains:
                continue
            # C5: Cast(Move(x)) -> Move(Cast(x)); the new Cast reads x, the Move reads it
            cast_out = fresh_name(used, f"{data}_{SHORT.get(to, to)}")
            new_cast = helper.make_node("Cast", [data], [cast_out], to=to, name=fresh_name(used, f"amp_cast_{cast_out}"))
            types[cast_out] = to
            sole = readers.get(move.output[0], []) == [c] and removable(move.output[0])
            if sole:  # the Move only fed the Cast: it now reads the cast value and makes y
                move.input[0] = cast_out
                move.output[0] = y
                nodes.insert(nodes.index(move), new_cast)
                nodes.remove(c)
            else:
                copy = onnx.NodeProto()
                copy.CopyFrom(move)
                copy.name = fresh_name(used, f"{move.name or move.op_type}_{SHORT.get(to, to)}")
                copy.input[0] = cast_out
                copy.output[0] = y
                at = nodes.index(c)
                nodes[at:at + 1] = [new_cast, copy]
            types[y] = to
            remarks.append(_remark(Rule.C5_MOVE_UP, c.name, f"moved above {move.op_type} "
                                           f"'{move.name}' to meet a cast of '{data}'"))
            return True
        return False

    for _ in range(8 * len(nodes) + 8):  # each rewrite removes a Cast or a node, or moves one up
        if not one_pass():
            break
    _topo_sort(nodes, g)
    still = {v for n in nodes for v in n.input} | outputs | outer_read
    keep = [t for t in g.initializer if t.name in still or t.name in graph_inputs]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    del g.node[:]
    g.node.extend(nodes)
    if remarks:  # recorded shapes and types of moved values are stale: inference redoes them
        del g.value_info[:]
    return result(model, remarks)


def _remark(rule: Rule, node: str, reason: str) -> Remark:
    return Remark("onnx_cast_placement", rule, node, reason)


def _topo_sort(nodes: list[onnx.NodeProto], g: onnx.GraphProto) -> None:
    """Order ``nodes`` (in place) so every node follows its producers, keeping the given order
    where it already does (C5 inserts Casts next to the readers they replace)."""
    made = {o for n in nodes for o in n.output if o}
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    out: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        for k, n in enumerate(pending):
            if all(v in ready or v not in made for v in n.input):
                out.append(n)
                ready.update(n.output)
                del pending[k]
                break
        else:  # a cycle cannot arise from these rules; keep what is left as it was
            out.extend(pending)
            break
    nodes[:] = out
