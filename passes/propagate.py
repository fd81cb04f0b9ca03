"""propagate: dataflow painting, after TensorFlow grappler's AutoMixedPrecision pass.

Every vertex ends with a precision and the number of the rule that set it:

    R0  sources and bookkeeping: inputs, parameters, constants and factories keep their dtype;
        user casts keep theirs; non-float values have none; ops that only unpack or index
        (``getitem``) keep their producer's dtype; float64 (and complex128) values stay float64.
        ``R0:module-dtype``: a submodule whose parameters the user stored in a floating dtype
        of their own (``nn.Linear(...).half()`` in a float32 model converted to bfloat16, a
        ``.bfloat16()`` one converted to float16, a float32 one in a float16 model) computes in
        that dtype, as the model does: its parameters are never cast to the conversion's low
        dtype, its inputs are cast to its dtype at its border, its outputs to whatever their
        consumers need. The model's own dtype (that of most parameter elements) is the one
        being converted, so this is only for submodules; the innermost enclosing module that
        holds parameters decides, and only when they all share that one dtype. A submodule
        stored in the conversion's low dtype needs no rule (its parameters are already low),
        nor does a float64 one (the float64 rule). An op outside the submodule that reads one
        of its parameters computes in its dtype too. Like every R0 decision it comes before
        the overrides (R6).
    R1  ``allow`` ops are low precision -- except ``R1:user-fp32``: a matrix op whose every
        floating operand the model itself casts to fp32 (``a.float() @ b.float()``, through
        views) stays fp32, as written. That is how code meant to run under
        ``torch.autocast(enabled=False)`` reads once captured (the autocast region is gone from
        the graph, the casts are not): Hugging Face's rotary embedding computes
        ``inv_freq.float() @ position_ids.float()`` there, and in bfloat16 the phases of
        positions past a few hundred are off by radians (Llama at 8 x 1024 on the H200: 11x
        autocast's logits error, growing with the position). Pinned before R1, like R8.
    R2  ``deny`` ops are fp32, and fp32 spreads forward from them through ``infer``/``clear``
        ops (an elementwise op fed by ``exp`` would otherwise undo its protection) -- but not
        from a 0-dim value into an op that also reads a dimensioned one (``k / sqrt(d)`` with
        the square root computed as a tensor): torch's type promotion would not make that op
        fp32 either (autocast runs it in the low dtype).
    R3  ``infer``/``clear`` ops on a path between two low-precision ops (through infer, clear
        and fp32_acc ops) are low: casting them back up would only add casts -- unless one of
        their inputs is a real fp32 value (``R3:fp32-input``): then, as autocast's type
        promotion does, they stay fp32, because rounding that input would add error. A 0-dim
        fp32 input beside a dimensioned one does not block: torch's promotion ignores it (the
        op computes in the dimensioned operand's dtype under autocast too). Measured
        on the gpt model: rounding the residual stream to fp16 raised the output error 1.4x
        over autocast's; values built only from integers, masks and factories are exact and
        do not block. An fp32 parameter or buffer with a dimension blocks too (ConvNeXt's layer
        scale, ViT's position embedding): type promotion makes autocast's op fp32 there, and
        keeping it low raised a small ConvNeXt-style stack's bf16 error 1.4x over autocast's
        (torchvision's convnext_tiny in fp16: 1.19x); a 0-dim one does not promote and does not
        block. Parameters read by allow ops (weights) never block,
        nor do any in ONNX graphs (``type_promotion=False``: no promotion at run time, and
        their parameter-fed Adds are the biases of exported nn.Linear layers).
        ``R3:fp32-consumer``: a movement (``clear``) op that carries the value of an
        ``fp32_acc`` op (through other movement ops) to an op that stays fp32 is fp32 itself,
        and the fp32_acc op then emits fp32 (R5): otherwise the value would be rounded on its
        way only to be cast back up, and what the fp32 op keeps would be lost. ConvNeXt's stem
        ``layer_norm -> permute`` feeds the first block's convolution (low) and its residual
        add (fp32 by the layer scale): rounded there, the whole fp32 residual stream starts
        from a low-precision value. CUDA autocast computes layer_norm in fp32 and so keeps it;
        torchvision's convnext_tiny in fp16 on the H200 had 2.4x autocast's eval error at batch
        1 without this rule. It costs one cast where the fp32_acc op's input is low.
    R4  low precision spreads through chains of ``clear`` ops: forwards always (a view of a
        low-precision value is free to stay low), backwards only into clear ops whose every
        consumer is low (metadata readers such as Shape do not count).
    R5  ``fp32_acc`` ops are low when their producer and every consumer are low (their kernels
        accumulate in fp32 already), fp32 otherwise; resolved to a fixed point. Readers with no
        floating output (``isnan``, comparisons) take the value as it comes and do not count.
    R6  user overrides: ``keep_fp32`` wins over everything, ``force_low`` over the rules. They
        are pinned before R1 so the other rules route around them.
    R7  what remains (``infer``/``clear`` ops outside low regions, ``unknown`` ops) is fp32,
        as torch.autocast's type promotion would leave it.
    R8  an op whose low-precision kernel this device lacks (classify's rule C5 probed it) is
        fp32, whatever the other rules say, ``force_low`` included: a plan never puts an op in a
        dtype the device cannot run. Pinned before R1, like R6.
    R9  ops that make or read complex numbers (classify's category ``complex``, rule C6:
        ``view_as_complex``, ``polar``, ``torch.fft.*``, ``z.abs()``, ``z * w``) are fp32, with
        their complex values in complex64 and their real results in fp32, ``force_low``
        included: torch has no complex bfloat16, and complex32 has few kernels
        (``view_as_complex`` refuses bfloat16, CPU ``torch.fft`` refuses both low dtypes), so a
        low-precision real input is cast up at their border. Complex values themselves are
        never cast. Pinned before R1, like R6 and R8; float64 inputs (complex128) stay float64
        (R0).

    >>> plan = propagate(graph, classify(graph, policy), policy)
    >>> plan["fc1"].rule
    'R1:allow'
"""

from __future__ import annotations

import math
from collections import deque

import torch

from .classify import Classification
from .graph import DataflowGraph
from .plan import Decision, PrecisionPlan, dtype_name
from .policy import Policy
from .rules import Rule

FP32 = torch.float32
_WIDE = (torch.float64, torch.complex128)
_TRAVERSABLE = ("infer", "clear", "fp32_acc")


def _user_fp32_cast(graph: DataflowGraph, cat: dict[str, str], name: str) -> bool:
    """``name`` is, through movement ops, an explicit cast of the model's to float32."""
    seen = 0
    while cat.get(name) == "clear" and seen < 16:
        inputs = list(graph.float_inputs(name))
        if len(inputs) != 1:
            return False
        name, seen = inputs[0], seen + 1
    return cat.get(name) == "cast" and graph.vertex(name).dtype == FP32


def propagate(graph: DataflowGraph, cls: Classification, policy: Policy, *,
              type_promotion: bool = True) -> PrecisionPlan:
    """Paint every vertex of ``graph`` (rules R0-R9) and return the PrecisionPlan.

    ``type_promotion``: the graph runs with torch's type promotion (FX graphs), so an fp32
    parameter read by an elementwise op makes it fp32 under autocast, and R3 follows; ONNX
    graphs are explicitly typed (their bias Adds after MatMul are nn.Linear's bias) and pass
    False."""
    low = policy.low_dtype
    lowname = dtype_name(low)
    cat = cls.categories
    decided: dict[str, Decision] = {}

    def decide(name: str, precision, rule: str, reason: str) -> None:
        decided[name] = Decision(graph.vertex(name).kind, cat[name], precision, rule, reason)

    own_dtype = _own_dtype_modules(graph, low)

    # R0 -- sources, bookkeeping and pass-through
    for v in graph.vertices():
        c = cat[v.name]
        if c == "input":
            decide(v.name, v.dtype if v.is_float else None, Rule.R0_SOURCE, "model input: keeps the dtype the caller passes")
        elif c in ("param", "const"):
            what = "parameter" if c == "param" else "buffer/constant"
            decide(v.name, v.dtype, Rule.R0_SOURCE, f"{what}: stored as {dtype_name(v.dtype)}, cast once per use dtype")
        elif c == "output":
            decide(v.name, None, Rule.R0_OUTPUT, "graph outputs are restored to their original dtype")
        elif c == "non_float":
            decide(v.name, None, Rule.R0_NON_FLOAT, "no floating-point value (indices, masks or shapes): never cast")
        elif c == "factory":
            decide(v.name, v.dtype if v.is_float else None, Rule.R0_FACTORY, "creates a tensor of its declared dtype")
        elif c == "cast":
            decide(v.name, None, Rule.R0_USER_CAST, "explicit cast in the model: honoured as written")
        elif v.dtype is not None and not v.dtype.is_floating_point and not v.is_complex:
            decide(v.name, None, Rule.R0_NON_FLOAT, f"produces {dtype_name(v.dtype)}: never cast")
        elif v.dtype in _WIDE or any(
                graph.vertex(p).dtype in _WIDE
                or (p in decided and decided[p].precision == torch.float64)  # fx: no recorded dtypes
                for p in [*graph.float_inputs(v.name), *graph.complex_inputs(v.name)]):
            decide(v.name, torch.float64, Rule.R0_FLOAT64, "float64 values are left in float64, as torch.autocast does")
        elif c == "complex":
            continue  # R9, pinned below
        elif not list(graph.float_inputs(v.name)):
            decide(v.name, None, Rule.R0_PASSTHROUGH, "only unpacks or indexes its input: keeps its producer's dtype")
        elif (owner := own_dtype(v.name)) is not None:
            path, dtype = owner
            decide(v.name, dtype, Rule.R0_MODULE_DTYPE,
                   f"parameters of '{path}' are stored as {dtype_name(dtype)} by the user: computes in "
                   f"{dtype_name(dtype)}, as the model does (values from the converted model are cast "
                   f"to {dtype_name(dtype)} where they enter)")

    paint: dict[str, tuple] = {}  # name -> (precision, rule, reason) for compute vertices
    open_ = [n for n in graph if n not in decided]

    # R6 -- user overrides pin their nodes before painting, so the rules route around them;
    # R8 -- an op with no low-precision kernel on this device is fp32, force_low or not
    for n, entry in cls.keep_fp32.items():
        if n in open_:
            paint[n] = (FP32, Rule.R6_KEEP_FP32, f"keep_fp32={entry!r}")
    for n in open_:
        if cat[n] == "complex" and n not in paint:
            what = "makes complex values" if graph.vertex(n).is_complex else "reads complex values"
            paint[n] = (FP32, Rule.R9_COMPLEX, f"{graph.vertex(n).kind} {what}: torch has no complex "
                        f"{lowname} (and few complex32 kernels), so it computes in float32, complex "
                        f"values in complex64")
    for n, why in cls.no_kernel.items():
        if n in open_ and n not in paint:
            paint[n] = (FP32, Rule.R8_NO_KERNEL, f"{graph.vertex(n).kind} has no {lowname} kernel on "
                        f"this {policy.device_type} (probed: {why}): fp32")
    for n, entry in cls.force_low.items():
        if n in open_ and n not in paint:
            paint[n] = (low, Rule.R6_FORCE_LOW, f"force_low={entry!r}")

    # R1:user-fp32 -- a matrix op on the model's own fp32 casts stays fp32, as written
    for n in open_:
        if n in paint or cat[n] != "allow":
            continue
        operands = list(graph.float_inputs(n))
        if operands and all(_user_fp32_cast(graph, cat, p) for p in operands):
            paint[n] = (FP32, Rule.R1_USER_FP32, f"{graph.vertex(n).kind}: the model casts every operand to "
                        "float32 itself (code written for torch.autocast(enabled=False), e.g. rotary "
                        "phases): computes in float32, as written")

    # R1 -- allow ops low
    for n in open_:
        if n in paint:
            continue
        if cat[n] == "allow":
            paint[n] = (low, Rule.R1_ALLOW, f"{graph.vertex(n).kind}: matrix-unit op, computes in {lowname}")

    # R2 -- deny ops fp32, spread forward through infer/clear
    queue = deque()
    for n in open_:
        if cat[n] == "deny" and n not in paint:
            paint[n] = (FP32, Rule.R2_DENY, f"{graph.vertex(n).kind}: numerically unsafe in {lowname} (overflow or accumulation error)")
            queue.append((n, n))
    while queue:
        n, origin = queue.popleft()
        for c in graph.consumers(n):
            if c in decided or c in paint or cat.get(c) not in ("infer", "clear"):
                continue
            if type_promotion and _zero_dim_beside_tensors(graph, c, n):
                continue  # a 0-dim fp32 scale does not promote its dimensioned partner
            paint[c] = (FP32, Rule.R2_DENY_SPREAD, f"fed (through elementwise/movement ops) by fp32-required node '{origin}'")
            queue.append((c, origin))

    allow_nodes = [n for n, p in paint.items() if p[0] == low]
    free = {n for n in open_ if n not in paint and cat[n] in _TRAVERSABLE}
    # the pieces of a split/chunk (getitem, R0:passthrough) are transparent to the reach: a
    # gated MLP's ``gate, up = linear(x).chunk(2)`` then ``silu(gate) * up`` is between low ops
    through = {n for n, d in decided.items() if d.rule == Rule.R0_PASSTHROUGH}

    # R3 -- infer/clear between two low ops, unless an input is a real fp32 value
    down = _reach(graph, allow_nodes, free, forward=True, through=through)
    up = _reach(graph, allow_nodes, free, forward=False, through=through)
    between = {n for n in down & up if cat[n] in ("infer", "clear")}
    exact = _exact_values(graph, cat)

    def _acc_low(p: str) -> bool:
        # an fp32_acc input counts as low only if R5 can make it low: its own inputs are low
        return (cat.get(p) == "fp32_acc" and p in down and p in up
                and all(q in between or q in exact or (q in paint and paint[q][0] == low)
                        for q in graph.data_inputs(p)))

    def _promoting_state(n: str) -> list[str]:
        # fp32 parameters/buffers with a dimension: autocast's type promotion computes the op in
        # fp32 (layer scales, position embeddings, class tokens); 0-dim ones do not promote
        if not type_promotion:
            return []
        return [p for p in graph.float_inputs(n)
                if graph.vertex(p).role in ("param", "const") and p not in exact
                and graph.vertex(p).dtype == FP32 and graph.vertex(p).shape]

    def _unpacks_low(p: str) -> bool:
        # a piece of a split whose source is low (or between low ops) is low itself
        return p in through and all(q in between or (q in paint and paint[q][0] == low)
                                    for q in graph.producers(p))

    changed = True
    while changed:
        changed = False
        for n in sorted(between):
            blocker = next((p for p in graph.data_inputs(n) + _promoting_state(n)
                            if p not in between and p not in exact
                            and not (p in paint and paint[p][0] == low)
                            and not _acc_low(p) and not (type_promotion and _zero_dim_beside_tensors(graph, n, p))
                            and not _unpacks_low(p)), None)
            if blocker is not None:
                between.discard(n)
                changed = True
                own = decided[blocker].precision if blocker in decided else None
                what = f"a {dtype_name(own)} value of the user's" if own not in (None, FP32) else "an fp32 value"
                paint[n] = (FP32, Rule.R3_FP32_INPUT, f"input '{blocker}' is {what}: rounding it would add error, so like autocast's type promotion this stays fp32")
    # R3:fp32-consumer -- a movement op that carries an fp32_acc op's value to an fp32 op
    changed = True
    while changed:
        changed = False
        for n in sorted(between):
            sink = next((c for c in graph.float_consumers(n) if c in paint and paint[c][0] == FP32), None)
            origin = _acc_origin(graph, n, between, cat) if sink is not None else None
            if origin is not None:
                between.discard(n)
                changed = True
                paint[n] = (FP32, Rule.R3_FP32_CONSUMER,
                            f"carries the value of '{origin}' ({graph.vertex(origin).kind}, which accumulates in "
                            f"fp32) to fp32 op '{sink}': rounding it to {lowname} on the way would lose what "
                            f"'{sink}' keeps, so it stays fp32 and '{origin}' emits fp32 (R5)")
    for n in between:
        paint[n] = (low, Rule.R3_BETWEEN_LOW, f"on a path between {lowname} ops: keeping it {lowname} avoids two casts")

    # R4 -- low spreads through clear chains
    clear_free = {n for n in free if cat[n] == "clear" and n not in paint}
    seeds = [n for n, p in paint.items() if p[0] == low]
    # backwards only into clear ops whose every consumer is low: a clear op feeding an fp32
    # consumer would round its fp32 value just to cast it back up
    back = set()
    grew = True
    while grew:
        grew = False
        for n in clear_free - back:
            # metadata readers (Shape) take no precision: they neither block nor count
            cons = [c for c in graph.float_consumers(n) if cat.get(c) != "non_float"]
            if cons and all(c in back or (c in paint and paint[c][0] == low) for c in cons):
                back.add(n)
                grew = True
    for n in _reach(graph, seeds, clear_free, forward=True) | back:
        if n in clear_free:
            paint[n] = (low, Rule.R4_CLEAR_CHAIN, f"data movement next to {lowname} ops: stays {lowname} for free")

    # R5 -- fp32_acc ops: low iff producer and all consumers are low (fixed point)
    acc = [n for n in open_ if cat[n] == "fp32_acc" and n not in paint]
    tentative = {n for n in acc}
    changed = True
    while changed:
        changed = False
        for n in list(tentative):
            if not _neighbours_low(graph, n, paint, tentative, decided, low):
                tentative.discard(n)
                changed = True
    for n in acc:
        kind = graph.vertex(n).kind
        if n in tentative:
            paint[n] = (low, Rule.R5_FP32_ACC_LOW, f"{kind} accumulates in fp32 inside its kernel; producer and consumers are {lowname}, so it stays {lowname}")
        else:
            paint[n] = (FP32, Rule.R5_FP32_ACC_FP32, f"{kind} needs fp32 here: its producer or a consumer is fp32 (or a graph output)")

    # R7 -- the rest is fp32
    for n in open_:
        if n not in paint:
            if cat[n] == "unknown":
                paint[n] = (FP32, Rule.R7_UNKNOWN, f"op '{graph.vertex(n).target or graph.vertex(n).kind}' is not in the policy tables: fp32 (add it to keep_fp32/force_low to decide)")
            else:
                paint[n] = (FP32, Rule.R7_FOLLOW_FP32, "not between low-precision ops: stays fp32, as autocast's type promotion leaves it")

    for n, (precision, rule, reason) in paint.items():
        decide(n, precision, rule, reason)
    decided = _resolve_passthrough(graph, decided)
    ordered = {n: decided[n] for n in graph}
    return PrecisionPlan(ordered, low_dtype=low, device_type=policy.device_type)


def _own_dtype_modules(graph: DataflowGraph, low: torch.dtype):
    """R0:module-dtype: a function vertex name -> (submodule path, dtype) for an op inside (or
    reading a parameter of) a submodule the user stored in a dtype of its own, else None."""
    elements: dict[torch.dtype, int] = {}
    under: dict[str, set] = {}  # module path -> dtypes of the parameters at or below it
    for v in graph.vertices():
        if v.role != "param" or v.dtype is None or not v.dtype.is_floating_point:
            continue
        elements[v.dtype] = elements.get(v.dtype, 0) + math.prod(v.shape or ())
        parts = v.module_path.split(".") if v.module_path else []
        for i in range(1, len(parts) + 1):
            under.setdefault(".".join(parts[:i]), set()).add(v.dtype)
    if not elements:
        return lambda name: None
    model = max(elements, key=elements.__getitem__)

    def owner(path: str):
        # the innermost enclosing module holding parameters decides; mixed dtypes: none
        parts = path.split(".") if path else []
        for i in range(len(parts), 0, -1):
            dtypes = under.get(".".join(parts[:i]))
            if dtypes is not None:
                dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
                keep = dtype is not None and dtype not in (model, low, torch.float64)
                return (".".join(parts[:i]), dtype) if keep else None
        return None

    def own_dtype(name: str):
        params = [graph.vertex(p).module_path for p in graph.float_inputs(name)
                  if graph.vertex(p).role == "param"]
        return next(filter(None, map(owner, [graph.vertex(name).module_path, *params])), None)

    return own_dtype


def _zero_dim_beside_tensors(graph: DataflowGraph, n: str, p: str) -> bool:
    """Input ``p`` of ``n`` is 0-dim and ``n`` reads a dimensioned float too: under torch's type
    promotion ``p`` (a scale computed as a tensor) cannot make ``n`` fp32 (autocast runs it in
    the low dtype too); unknown shapes (fx graphs) count as dimensioned."""
    return graph.vertex(p).shape == () and any(
        graph.vertex(q).shape != () for q in graph.float_inputs(n) if q != p)


def _exact_values(graph: DataflowGraph, cat: dict[str, str]) -> set[str]:
    """Floating values computed only from factories, scalars and casts of integers/booleans
    (masks such as ``(1 - attention_mask.float()) * -1e4``): rounding them loses nothing."""
    exact: set[str] = set()
    for n in graph:
        v = graph.vertex(n)
        c = cat.get(n)
        ins = list(graph.producers(n))
        if c == "factory":
            exact.add(n)
        elif c == "cast" and all(_integral(graph, p) for p in ins):
            exact.add(n)
        elif c in ("infer", "clear", "cast") and v.role == "compute" and ins and all(
                p in exact or _integral(graph, p) for p in ins):
            exact.add(n)
    return exact


def _integral(graph: DataflowGraph, name: str) -> bool:
    """Integers, booleans, shapes: no floating or complex value to round."""
    v = graph.vertex(name)
    return v.is_float is False and not v.is_complex


def _reach(graph: DataflowGraph, seeds, allowed: set[str], *, forward: bool,
           through: set[str] = frozenset()) -> set[str]:
    """Vertices in ``allowed`` reachable from ``seeds`` through ``allowed`` vertices only;
    ``through`` vertices (unpacking ``getitem``s) are crossed but not returned."""
    seen: set[str] = set()
    queue = deque(seeds)
    while queue:
        n = queue.popleft()
        if forward:
            nxt = graph.float_consumers(n) + [c for c in graph.consumers(n) if c in through]
        else:
            nxt = list(graph.float_inputs(n)) + (graph.producers(n) if n in through else [])
        for m in nxt:
            if (m in allowed or m in through) and m not in seen:
                seen.add(m)
                queue.append(m)
    return seen - set(through)


def _acc_origin(graph: DataflowGraph, n: str, between: set[str], cat: dict[str, str]) -> str | None:
    """The fp32_acc op whose value the movement (``clear``) op ``n`` carries, through other
    movement ops still between low ops; None when ``n`` is not such a carrier."""
    while cat.get(n) == "clear":
        inputs = graph.data_inputs(n)
        if len(inputs) != 1:
            return None
        n = inputs[0]
        if cat.get(n) == "fp32_acc":
            return n
        if n not in between:
            return None
    return None


def _neighbours_low(graph, n, paint, tentative, decided, low) -> bool:
    def is_low(m: str) -> bool:
        if m in tentative:
            return True
        if m in paint:
            return paint[m][0] == low
        d = decided.get(m)
        if d is not None and d.rule == Rule.R0_PASSTHROUGH:
            return all(is_low(p) for p in graph.producers(m))
        return False

    producers = graph.data_inputs(n)
    # readers with no floating output (IsNaN, comparisons) take the value as it comes, as in R4
    consumers = [c for c in graph.float_consumers(n)
                 if decided.get(c) is None or decided[c].category != "non_float"]
    consumers += [c for c in graph.consumers(n) if graph.vertex(c).role == "output"]
    # a pass-through consumer (getitem) is low if the things it feeds are
    for c in list(consumers):
        d = decided.get(c)
        if d is not None and d.rule == Rule.R0_PASSTHROUGH:
            consumers.remove(c)
            consumers.extend(graph.consumers(c))
    return bool(producers) and all(is_low(p) for p in producers) and all(
        graph.vertex(c).role != "output" and is_low(c) for c in consumers)


def _resolve_passthrough(graph: DataflowGraph, decided: dict[str, Decision]) -> dict[str, Decision]:
    """Pass-through vertices take their producer's (now known) precision, in graph order."""
    out = dict(decided)
    for n in graph:
        d = out[n]
        if d.rule != Rule.R0_PASSTHROUGH:
            continue
        precisions = {out[p].precision for p in graph.producers(n)
                      if graph.vertex(p).is_float is not False and out[p].precision is not None}
        if len(precisions) == 1:
            out[n] = d.with_(precision=precisions.pop())
    return out
