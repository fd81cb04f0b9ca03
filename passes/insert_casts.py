"""insert_casts (FX rewrite): make every node receive its inputs in the precision the plan gives it.

Rules:

    I1  a floating input is cast to the consumer's precision only where the dataflow graph marks
        the use castable (never indices, masks, shapes, running statistics);
    I2  at most one cast per (value, dtype): every consumer needing that dtype shares it; tied
        parameters (one tensor under two names) share one cast too;
    I3  no cast to the dtype a value already has, and no cast chains: a value needed in a third
        dtype is cast from its source, never from another cast;
    I4  a cast is placed right before its first consumer, so it fuses with it under
        torch.compile and is never computed for a branch that does not need it;
    I5  graph outputs are restored to the dtype the original model returned; where tracing recorded
        no dtype (fx), a value we computed in another float dtype goes back to the model's own
        floating dtype (``model_float_dtype``: that of most of its parameter elements, else its
        buffers', float32 when it has neither), so a float16 model still returns float16;
        complex values are never cast (their plan, rule R9, keeps them complex64); in a
        training graph, logits returned beside a fused loss are not restored (rule X8 of
        fused_cross_entropy, which runs after this pass);
    I7  an fp32 elementwise op with an fp32 tensor operand (``add``, ``mul``...) reads its
        low-precision operands as they are: type promotion upcasts them inside the kernel to the
        same values a cast would give, without a cast kernel or a second copy in memory (the
        residual adds of a transformer);
    I6  a leaf module (``nn.LSTM``) computing in a low dtype runs with its parameters cast per
        call (``runtime.module_in_dtype``); fold_weights swaps in a stored low copy for inference;
    I9  a ``masked_fill`` computing in a low dtype whose fill value is finite but beyond that
        dtype's range (``torch.finfo(torch.float32).min`` baked in at capture, ``-1e9``) fills
        with the dtype's finite extreme instead: the value cannot be represented (torch refuses
        it), and as a mask sentinel the extreme does the same job, which is what transformers
        itself writes in float16 (``torch.finfo(dtype).min``). The node's reason says so.
    I8  I7's converse, as torch's type promotion has it: a 0-dim fp32 operand (a scale computed
        as a tensor) of a low-precision elementwise op that also reads a dimensioned operand in
        that precision is read as it is: it does not promote, the kernel computes in the low
        dtype, exactly as after a cast. I7 applies only to dimensioned fp32 operands (or when
        every operand is 0-dim), since a 0-dim one would not promote the others.

Returns an ``InsertCastsResult`` listing the casts (``CastRecord``), for the report and tests.

    >>> result = insert_casts(gm, graph, plan)
    >>> result.count, gm.code.count(".to(")
    (5, 5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx


from .dtypes import dtype_name, short_name
from .graph import DataflowGraph, attribute
from .infra import PassResult, Remark, result
from .kinds import LEAF_PARAMS_FOLLOW
from .plan import PrecisionPlan
from .rules import Rule, rule_family
from .runtime import module_in_dtype
from .slots import castable

# Elementwise kinds whose kernels apply torch's type promotion (fp16 op fp32 -> fp32).
PROMOTING = frozenset({"add", "sub", "mul", "div", "where", "maximum", "minimum"})

# Fill ops whose scalar is a "minus infinity" sentinel in practice (attention masks filled with
# torch.finfo(float32).min or -1e9): kind -> (position, keyword) of the value. Source: ours.
SATURATING_FILLS = {"masked_fill": (2, "value")}


@dataclass(frozen=True)
class CastRecord:
    """One inserted cast: value ``source`` to ``dtype``, used by ``consumers``."""

    node: str
    source: str
    dtype: torch.dtype
    consumers: tuple[str, ...]
    is_param: bool
    rule: str = ""     # I1 (one consumer), I2 (shared), I5 (an output restored)
    reason: str = ""

    def remark(self) -> Remark:
        return Remark("insert_casts", self.rule, self.node, self.reason)


@dataclass
class InsertCastsResult:
    casts: list[CastRecord] = field(default_factory=list)
    saturated: dict[str, str] = field(default_factory=dict)  # node -> what rule I9 did

    @property
    def count(self) -> int:
        return len(self.casts)


def model_float_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype ``module`` computes in, for outputs whose dtype was not recorded (I5).

    The dtype holding most floating parameter elements (the ``next(model.parameters()).dtype``
    idiom, made robust to a stray float32 scale); buffers decide only when there are no floating
    parameters; float32 when there are neither.
    """
    for tensors in (module.parameters(), module.buffers()):
        counts: dict[torch.dtype, int] = {}
        for t in tensors:
            if t.is_floating_point():
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        if counts:
            return max(counts, key=counts.__getitem__)
    return torch.float32


def insert_casts(gm: fx.GraphModule, graph: DataflowGraph, plan: PrecisionPlan, *,
                 model_dtype: torch.dtype | None = None) -> PassResult:
    """Rewrite ``gm`` in place (rules I1-I9); recompiles it. One remark per cast (and per fill
    value I9 changed); ``facts`` is the ``InsertCastsResult``: the casts and I9's notes.

    ``model_dtype``: the dtype outputs without a recorded dtype are restored to (I5); None takes
    ``model_float_dtype(gm)`` (``gm`` holds the user's parameters).
    """
    if model_dtype is None:
        model_dtype = model_float_dtype(gm)
    fxg = gm.graph
    runtime_dtype: dict[str, torch.dtype | None] = {}
    cache: dict[tuple, fx.Node] = {}
    users: dict[fx.Node, list[str]] = {}
    records: list[tuple[fx.Node, str, torch.dtype, bool]] = []
    saturated: dict[str, str] = {}

    def source_key(n: fx.Node):
        if n.op == "get_attr":  # tied parameters: one tensor, two names (I2)
            return ("tensor", id(attribute(gm, str(n.target))))
        return ("node", n.name)

    def cast_of(value: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
        key = (source_key(value), dtype)
        if key not in cache:
            with fxg.inserting_before(before):
                c = fxg.call_method("to", (value, dtype))
            c._rename(f"{value.name}_{short_name(dtype)}")
            c.meta["amp_cast"] = {"source": value.name, "dtype": dtype}
            cache[key] = c
            users[c] = []
            records.append((c, value.name, dtype, value.op == "get_attr"))
        return cache[key]

    for node in list(fxg.nodes):
        if node.meta.get("amp_cast"):
            continue
        if node.op == "output":
            _restore_outputs(fxg, node, graph, plan, runtime_dtype, cast_of, users, model_dtype)
            continue
        d = plan.get(node.name)
        if node.name not in graph:
            continue
        v = graph.vertex(node.name)
        precision = d.precision if d is not None else None
        if precision is not None and v.role == "compute" and d.rule != Rule.R0_PASSTHROUGH:
            castable = set(graph.float_inputs(node.name))
            replaced: dict[fx.Node, fx.Node] = {}
            promotes = precision == torch.float32 and v.kind in PROMOTING and any(
                runtime_dtype.get(n.name) == torch.float32 and _promotes_others(n, node, graph)
                for n in node.all_input_nodes if n.name in castable)
            for src in node.all_input_nodes:
                if src.name not in castable or src.meta.get("amp_cast"):
                    continue
                have = runtime_dtype.get(src.name)
                if have == precision or (have is not None and not have.is_floating_point):
                    continue
                if promotes and have in (torch.float16, torch.bfloat16):
                    continue  # I7: the fp32 operand promotes it inside the kernel, exactly
                if (v.kind in PROMOTING and precision in (torch.float16, torch.bfloat16)
                        and have == torch.float32 and _zero_dim(src, graph)
                        and any(runtime_dtype.get(o.name) == precision and not _zero_dim(o, graph)
                                for o in node.all_input_nodes if o.name in castable and o is not src)):
                    continue  # I8: a 0-dim fp32 operand does not promote: the kernel reads it as precision
                if have is None and src.op == "placeholder" and precision in (torch.float32, torch.float64):
                    continue  # fx: an input of unknown dtype is taken as the model expects it
                if have is None and graph.vertex(src.name).is_float is None and src.op != "placeholder" \
                        and plan.get(src.name) is not None and plan[src.name].precision is None:
                    continue  # unknown dtype from a user cast: leave it as written
                c = cast_of(src, precision, node)
                replaced[src] = c
                users[c].append(node.name)
            if replaced:
                _replace_castable_inputs(node, replaced, graph)
            if node.op == "call_module" and precision != torch.float32 and v.kind in LEAF_PARAMS_FOLLOW:
                node = _run_leaf_in_dtype(fxg, node, precision)
            if precision in (torch.float16, torch.bfloat16) and v.kind in SATURATING_FILLS:
                note = _saturate_fill(node, precision, v.kind)
                if note:
                    saturated[node.name] = note
        runtime_dtype[node.name] = _output_dtype(v, d)

    gm.recompile()
    casts = [_record(c, s, dt, tuple(users[c]), p) for c, s, dt, p in records]
    remarks = [c.remark() for c in casts] + [Remark("insert_casts", Rule.I9_SATURATED_FILL, n, note)
                                              for n, note in saturated.items()]
    return result(gm, remarks, facts=InsertCastsResult(casts, saturated))


def _record(node: fx.Node, source: str, dtype: torch.dtype, consumers: tuple[str, ...],
            is_param: bool) -> CastRecord:
    """A cast with its rule and reason: an output restored (I5), or read by its consumers."""
    what = f"parameter '{source}'" if is_param else f"'{source}'"
    if consumers == ("output",):
        rule, reason = Rule.I5_OUTPUTS, f"{what} goes back to {dtype_name(dtype)}, the dtype the model returns"
    else:
        rule = Rule.I2_ONE_PER_DTYPE if len(consumers) > 1 else Rule.I1_CASTABLE
        reason = (f"{what} is read in {dtype_name(dtype)} by {', '.join(consumers)}"
                  + (f": one cast shared by {len(consumers)} consumers" if len(consumers) > 1 else ""))
    return CastRecord(node.name, source, dtype, consumers, is_param, rule, reason)


def _saturate_fill(node: fx.Node, dtype: torch.dtype, kind: str) -> str | None:
    """I9 on one fill op: a finite fill value beyond ``dtype``'s range becomes its finite extreme."""
    position, key = SATURATING_FILLS[kind]
    if len(node.args) > position:
        value, where = node.args[position], "args"
    elif key in node.kwargs:
        value, where = node.kwargs[key], "kwargs"
    else:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    limit = torch.finfo(dtype).max
    if abs(value) <= limit:
        return None
    new = math.copysign(limit, value)
    if where == "args":
        node.args = (*node.args[:position], new, *node.args[position + 1:])
    else:
        node.kwargs = {**node.kwargs, key: new}
    return (f"its fill value {value:.4g} does not fit {dtype_name(dtype)}: saturated to {new:.6g}, "
            f"the finite extreme, as transformers' torch.finfo(dtype).min is in {dtype_name(dtype)} (I9)")


def _zero_dim(n: fx.Node, graph: DataflowGraph) -> bool:
    return n.name in graph and graph.vertex(n.name).shape == ()


def _promotes_others(n: fx.Node, node: fx.Node, graph: DataflowGraph) -> bool:
    """Does fp32 operand ``n`` make ``node`` compute in fp32 under torch's type promotion? A
    dimensioned tensor does; a 0-dim one only when every tensor operand is 0-dim. Unknown
    shapes (fx graphs) count as dimensioned."""
    if not _zero_dim(n, graph):
        return True
    return all(_zero_dim(o, graph) for o in node.all_input_nodes
               if o.name in graph and graph.vertex(o.name).is_float is not False)


def _run_leaf_in_dtype(fxg: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    with fxg.inserting_before(node):
        module = fxg.get_attr(str(node.target))
        call = fxg.call_function(module_in_dtype, (module, dtype, *node.args), dict(node.kwargs))
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    fxg.erase_node(node)
    call._rename(node.name)
    return call


def _output_dtype(v, d) -> torch.dtype | None:
    if v.is_complex:
        return v.dtype  # complex64 from an fp32 plan (R9); None where fx recorded nothing
    if v.role == "compute" and d is not None and d.precision is not None:
        if v.dtype is not None and not v.dtype.is_floating_point:
            return v.dtype
        return d.precision
    if d is not None and d.precision is not None:
        return d.precision
    return v.dtype


def _replace_castable_inputs(node: fx.Node, replaced: dict, graph: DataflowGraph) -> None:
    """Swap inputs for their casts, except at positions that are not castable (e.g. indices)."""
    has_meta = "val" in node.meta
    kind = graph.vertex(node.name).kind

    def sub(a, position, key):
        if isinstance(a, fx.Node):
            if a in replaced and castable(kind, position, key, has_meta):
                return replaced[a]
            return a
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x, position, key) for x in a)
        if isinstance(a, dict):
            return {k: sub(x, position, key) for k, x in a.items()}
        return a

    node.args = tuple(sub(a, i, None) for i, a in enumerate(node.args))
    node.kwargs = {k: sub(a, None, k) for k, a in node.kwargs.items()}


def _restore_outputs(fxg, out_node, graph, plan, runtime_dtype, cast_of, users,
                     model_dtype: torch.dtype) -> None:
    """I5: every floating output value goes back to the dtype the original graph produced."""
    replaced: dict[fx.Node, fx.Node] = {}
    for src in out_node.all_input_nodes:
        have = runtime_dtype.get(src.name)
        v = graph.vertex(src.name)
        if v.is_complex:
            continue  # complex values are never cast: their plan keeps them complex64 (R9)
        if v.dtype is not None:
            want = v.dtype
        else:
            # fx recorded nothing: only a value whose dtype the plan chose can differ from the
            # model's (user casts and float64 keep theirs: the plan gives them no new precision)
            d = plan.get(src.name)
            chosen = d is not None and d.precision is not None and rule_family(d.rule) != "R0"
            want = model_dtype if chosen and have in (torch.float16, torch.bfloat16, torch.float32) else None
        if want is None or have is None or have == want or not want.is_floating_point:
            continue
        c = cast_of(src, want, out_node)
        replaced[src] = c
        users[c].append("output")
    if replaced:
        out_node.args = fx.node.map_arg(out_node.args, lambda n: replaced.get(n, n))
