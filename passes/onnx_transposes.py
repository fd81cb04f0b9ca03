"""onnx_transposes (ONNX rewrite, rule W9): no ``Transpose -> [Cast] -> MatMul`` that crashes
ONNX Runtime.

``onnx_rewrite`` runs it last on every converted model, and ``export_onnx`` on every exported
one (``sink_transposes``); ``transpose_hazards`` lists the matches in any file.

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

    >>> moved, hazards = sink_transposes(model).facts   # in place
    >>> transpose_hazards(model) == []
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from .infra import PassResult, Remark, result
from .onnx_cast_placement import value_readers
from .onnx_graph import REASON_KEY, FreshNames, cast_to, elem_type, value_types
from .rules import Rule

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


def sink_transposes(model: onnx.ModelProto) -> PassResult:
    """W9, in place: move each movable hazard's Transpose below its MatMul (and the bias Add
    after it). One remark per MatMul rewritten, a missed one per hazard left (not movable);
    ``facts``: (the MatMuls rewritten, the hazards left)."""
    g = model.graph
    facts = _Facts.of(model)
    names = FreshNames(model)
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
    left = [h for h, *_ in _hazards(model, facts) if not _movable(h)]
    remarks = [Remark("onnx_transposes", Rule.W9_TRANSPOSES, mm, "its Transpose moved below it: ONNX "
                      "Runtime's MatmulTransposeFusion finds nothing to abandon") for mm in moved]
    remarks += [Remark("onnx_transposes", Rule.W9_TRANSPOSES, h.matmul, f"Transpose '{h.transpose}' "
                       "cannot move below it", missed=True) for h in left]
    return result(model, remarks, facts=(moved, left))


def _sink(model: onnx.ModelProto, h: TransposeHazard, mm: onnx.NodeProto, tr: onnx.NodeProto,
          cast: onnx.NodeProto | None, facts: _Facts, names: FreshNames) -> set[str]:
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
            types[inner] = types.get(cast.output[0], cast_to(cast))
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
