"""ranges (analysis): what values the model really computes on calibration data, and which nodes
those values force to fp32.

``collect_ranges`` runs the fp32, un-rewritten captured graph on calibration batches with an
``fx.Interpreter`` and records, per floating value (``ValueRange``): max|x| (overall and per
batch), the fraction of non-zero values below each low dtype's smallest normal, and for
reductions (linear, matmul, conv, sum, mean) the reduced length and the largest accumulator any
sign pattern of its terms can give (max of sum|terms|, computed by running the op on |inputs|). It also
runs every compute node once more per low dtype, on its inputs rounded to that dtype, and keeps
the node's local relative error.

``range_overrides`` turns those facts into fp32 pins. Rules (numbered as they appear in
Decisions; thresholds per low dtype in ``THRESHOLDS``, measured in ``docs/thresholds.md``):

    D1  overflow: a value the node reads or writes in low precision (its output or a castable
        input) reached max|x| > ``data_max`` on calibration data. fp16: 2**14 = 65504 / 4. On
        held-out data of the calibration distribution the max exceeded the 4-batch calibration
        max by at most 1.53x on the reference models (heavy-tailed inputs: up to 6.6x, see the
        doc), and BERT's additive -10000 attention mask stays below it. bf16: 2**120 (it has
        fp32's range).
    D2  underflow: at least ``underflow_fp32`` (90%) of the non-zero values the node reads or
        writes are below the dtype's smallest normal (fp16: 6.1e-5): the tensor's scale itself
        has moved into the subnormal range, where relative precision falls with every halving.
        Below that fraction the max-norm error stays at ordinary fp16 rounding (measured), so
        the finding is only noted from ``underflow_note`` (1%) on.
    D3  reduction: a low-precision reduction (linear, matmul, conv, sum, mean) whose terms can add
        up to sum|terms| > ``acc_max`` (fp16: 2**15). The result of a sum is bounded by
        sum|terms| and reaches it when the terms align in sign, so such a node overflows on
        inputs of the calibrated magnitudes even where calibration saw cancellation keep the
        result small. (The kernels' own partial sums do not overflow: torch's CPU and CUDA
        kernels and ONNX Runtime's CPU EP accumulate fp16 in fp32; measured in
        docs/thresholds.md.)
    D4  precision: the node itself, computed in low precision on rounded inputs, is off by more
        than ``local_error`` relative to fp32: 16 units of roundoff (fp16 16 * 2**-11, bf16
        16 * 2**-8), 5x the worst node of the reference models. That is catastrophic
        cancellation (``(x + c) - c`` with c >= 32 max|x|). bf16's rule: its range is fp32's, its
        8-bit mantissa is not.

Only nodes the plan computes in low precision are considered; a user's ``force_low`` wins over
D1-D4 (the user said so explicitly), a user's ``keep_fp32`` is kept as is.

    >>> gm, _ = capture(model)
    >>> ranges = collect_ranges(gm, [(x1,), (x2,)])
    >>> range_overrides(build_dataflow(gm), ranges, torch.float16)
    {'linear_1': ('D1:overflow', 'output: observed max|x| = 1.02e+05 > data_max 16384 on 2 of 2
    calibration batches (float16 max 65504)')}
    >>> gm, dataflow, plan = plan_with_ranges(model, None, calibration, dtype=torch.float16)
    >>> plan["linear_1"].rule
    'D1:overflow'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import torch
import torch.fx as fx

from amp_compiler.errors import ConfigError

from .classify import Classification, classify, override_entries
from .graph import DataflowGraph
from .kinds import LEAF_PARAMS_FOLLOW
from .metrics import float_tensors, rel_error
from .plan import PrecisionPlan, dtype_name
from .policy import policy_for
from .propagate import propagate

LOW_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Thresholds:
    """Per-low-dtype limits of rules D1-D4 (docs/thresholds.md gives the measurements)."""

    data_max: float        # D1: max|x| a value may reach on calibration data
    underflow_fp32: float  # D2: fraction of non-zero values below smallest normal -> fp32
    underflow_note: float  # D2: ... -> noted only
    acc_max: float         # D3: largest sum|terms| a low-precision reduction may reach
    local_error: float     # D4: local relative error of the node in low precision


# Source: our measurements, docs/thresholds.md. fp16's limits are about range (max 65504,
# smallest normal 6.1e-5); bf16 has fp32's range, so only its precision rule can fire.
THRESHOLDS: dict[torch.dtype, Thresholds] = {
    torch.float16: Thresholds(data_max=2.0 ** 14, underflow_fp32=0.9, underflow_note=0.01,
                              acc_max=2.0 ** 15, local_error=16 * 2.0 ** -11),
    torch.bfloat16: Thresholds(data_max=2.0 ** 120, underflow_fp32=0.9, underflow_note=0.01,
                               acc_max=2.0 ** 120, local_error=16 * 2.0 ** -8),
}

# Ops that sum over a reduced axis, and how long that axis is (from the fp32 inputs). The
# bound runs the op itself on |inputs|: sum|terms| for products and sums; ``mean`` divides by
# the length, so its bound is multiplied back (its kernel sums first).
REDUCTION_KINDS = frozenset({"linear", "matmul", "conv", "sum", "mean"})
# aten / torch names whose first tensor argument is an added bias, not the left factor
_BIAS_FIRST = frozenset({"addmm", "addmv", "baddbmm", "addbmm"})
# compute kinds never re-run in low precision: they do not compute on floating values
_NO_LOW_RUN = frozenset({"cast", "factory", "shape", "assert", "guards", "getitem", "output"})


@dataclass(frozen=True)
class ValueRange:
    """What one floating value looked like on the calibration batches.

    ``below_normal`` and ``low_error`` are keyed by dtype name ("float16", "bfloat16").
    ``reduce_len`` and ``acc_bound`` are set for reductions only. ``low_error`` is set for compute
    nodes that could be re-run in that dtype.
    """

    max_abs: float
    batch_max: tuple[float, ...]
    nonzero: int
    below_normal: Mapping[str, float]
    reduce_len: int | None = None
    acc_bound: float | None = None
    low_error: Mapping[str, float] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        return len(self.batch_max)


@dataclass(frozen=True)
class Finding:
    """One rule that fired on one node: ``action`` is "fp32" (pinned) or "note" (reported only)."""

    node: str
    rule: str
    action: str
    reason: str


# -- calibration data ---------------------------------------------------------------------------

def check_calibration(calibration: Iterable) -> list[tuple]:
    """Calibration batches as a list of input tuples; ConfigError on NaN/inf or an empty set."""
    batches: list[tuple] = []
    for i, batch in enumerate(calibration):
        batch = batch if isinstance(batch, (tuple, list)) else (batch,)
        for j, x in enumerate(batch):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                bad = "NaN" if torch.isnan(x).any() else "inf" if torch.isinf(x).any() else None
                if bad:
                    raise ConfigError(f"calibration batch {i} contains {bad} at input {j}: range "
                                      f"analysis needs finite data; drop or clean that batch")
        batches.append(tuple(batch))
    if not batches:
        raise ConfigError("calibration is empty: pass an iterable of input tuples, e.g. "
                          "[(x1,), (x2,)], drawn from the data the model will see")
    return batches


# -- the recording interpreter ------------------------------------------------------------------

def _map_inputs(node: fx.Node, args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """Apply ``fn(producer_node, position, key, value)`` to every value fed by an fx.Node."""
    def walk(a_node, a_val, position, key):
        if isinstance(a_node, fx.Node):
            return fn(a_node, position, key, a_val)
        if isinstance(a_node, (list, tuple)) and isinstance(a_val, (list, tuple)) and len(a_node) == len(a_val):
            return type(a_val)(walk(n, v, position, key) for n, v in zip(a_node, a_val))
        return a_val
    new_args = tuple(walk(n, v, i, None) for i, (n, v) in enumerate(zip(node.args, args)))
    new_kwargs = {k: walk(node.kwargs[k], v, None, k) if k in node.kwargs else v for k, v in kwargs.items()}
    return new_args, new_kwargs


def run_target(interp: fx.Interpreter, node: fx.Node, args: tuple, kwargs: dict, dtype=None):
    """Run ``node``'s op on ``args``; with ``dtype``, leaf modules whose parameters must follow
    the compute dtype (``nn.LSTM``) run with their parameters cast, as insert_casts arranges."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if node.op == "call_module":
        module = interp.fetch_attr(node.target)
        if dtype is not None and dtype != torch.float32 and _leaf_kind(module) in LEAF_PARAMS_FOLLOW:
            from amp_compiler.passes.runtime import module_in_dtype
            return module_in_dtype(module, dtype, *args, **kwargs)
        return module(*args, **kwargs)
    raise ValueError(f"cannot re-run node {node.name} ({node.op})")


def _leaf_kind(module) -> str | None:
    from .kinds import LEAF_MODULE_KINDS
    t = type(module)
    return LEAF_MODULE_KINDS.get(f"{t.__module__}.{t.__qualname__}")


def run_in_dtype(interp: fx.Interpreter, node: fx.Node, args: tuple, kwargs: dict,
                 graph: DataflowGraph, dtype: torch.dtype):
    """The node's output when it alone computes in ``dtype`` on its (fp32) inputs rounded to
    ``dtype``, exactly where insert_casts would cast them; returned as float32 (None if the op
    has no kernel for that dtype)."""
    from amp_compiler.capture.frontend import _castable  # the slot rules insert_casts applies

    castable = set(graph.float_inputs(node.name))
    has_meta = "val" in node.meta
    kind = graph.vertex(node.name).kind

    def cast(src: fx.Node, position, key, value):
        if (src.name in castable and isinstance(value, torch.Tensor) and value.is_floating_point()
                and value.dtype != torch.float64 and _castable(kind, position, key, has_meta)):
            return value.detach().to(dtype)
        return value.detach() if isinstance(value, torch.Tensor) else value

    low_args, low_kwargs = _map_inputs(node, args, kwargs, cast)
    try:
        with torch.no_grad():
            out = run_target(interp, node, low_args, low_kwargs, dtype)
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # no kernel for this dtype on this device: nothing to measure
    return _to_float32(out)


def _to_float32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value) if not hasattr(value, "_fields") else \
            type(value)(*(_to_float32(v) for v in value))
    return value


def _reduce_len(node: fx.Node, kind: str, tensors: list[torch.Tensor], out: torch.Tensor) -> int | None:
    if not tensors:
        return None
    if kind in ("sum", "mean"):
        return max(1, tensors[0].numel() // max(1, out.numel()))
    if kind == "conv" and len(tensors) > 1:
        w = tensors[1]
        return int(w.shape[1] * math.prod(w.shape[2:]))
    from .kinds import target_name
    left = tensors[1] if target_name(node) in _BIAS_FIRST and len(tensors) > 1 else tensors[0]
    return int(left.shape[-1]) if left.dim() else None


class _RangeRecorder(fx.Interpreter):
    """Runs the fp32 graph and accumulates per-node statistics (see ``ValueRange``)."""

    def __init__(self, gm: fx.GraphModule, graph: DataflowGraph, low_dtypes) -> None:
        super().__init__(gm)
        self.dataflow = graph
        self.low_dtypes = tuple(low_dtypes)
        self.stats: dict[str, dict] = {}

    def run_node(self, n: fx.Node):
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        v = self.dataflow.vertex(n.name) if n.name in self.dataflow else None
        compute = v is not None and v.role == "compute" and n.op.startswith("call") \
            and v.kind not in _NO_LOW_RUN and v.is_float is not False
        # measured before the op runs: an in-place op would change its own inputs
        low = {d: run_in_dtype(self, n, args, kwargs, self.dataflow, d) for d in self.low_dtypes} if compute else {}
        acc = None
        if compute and v.kind in REDUCTION_KINDS:
            acc = self._accumulator(n, args, kwargs)
        out = super().run_node(n)
        self._record(n, v, out, low, acc, args)
        return out

    def _accumulator(self, n, args, kwargs):
        def absolute(src, position, key, value):
            return value.detach().abs() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        abs_args, abs_kwargs = _map_inputs(n, args, kwargs, absolute)
        try:
            with torch.no_grad():
                return run_target(self, n, abs_args, abs_kwargs)
        except (RuntimeError, TypeError):
            return None

    def _record(self, n, v, out, low, acc, args) -> None:
        tensors = [t.detach() for t in float_tensors(out)]
        if not tensors:
            return
        s = self.stats.setdefault(n.name, {"batch_max": [], "nonzero": 0,
                                           "below": {dtype_name(d): 0 for d in LOW_DTYPES},
                                           "reduce_len": None, "acc": None, "low_error": {}})
        m, nonzero = 0.0, 0
        below = dict.fromkeys(s["below"], 0)
        for t in tensors:
            a = t.abs().float()
            finite = a[torch.isfinite(a)]
            m = max(m, finite.max().item() if finite.numel() else 0.0)
            nz = a[a > 0]
            nonzero += nz.numel()
            for d in LOW_DTYPES:
                below[dtype_name(d)] += int((nz < torch.finfo(d).smallest_normal).sum())
        s["batch_max"].append(m)
        s["nonzero"] += nonzero
        for k, c in below.items():
            s["below"][k] += c
        for d, low_out in low.items():
            if low_out is not None:
                e = rel_error(low_out, out)
                s["low_error"][dtype_name(d)] = max(s["low_error"].get(dtype_name(d), 0.0), e)
        if acc is not None and tensors and isinstance(out, torch.Tensor):
            ins = float_tensors(list(args))
            length = _reduce_len(n, v.kind, ins, out)
            bound = acc.abs().max().item() if isinstance(acc, torch.Tensor) and acc.numel() else 0.0
            if v.kind == "mean" and length:
                bound *= length  # mean's kernel sums before it divides
            s["reduce_len"] = length
            s["acc"] = max(s["acc"] or 0.0, bound)

    def ranges(self) -> dict[str, ValueRange]:
        out = {}
        for name, s in self.stats.items():
            nz = s["nonzero"]
            out[name] = ValueRange(
                max_abs=max(s["batch_max"]), batch_max=tuple(s["batch_max"]), nonzero=nz,
                below_normal={k: (c / nz if nz else 0.0) for k, c in s["below"].items()},
                reduce_len=s["reduce_len"], acc_bound=s["acc"], low_error=dict(s["low_error"]))
        return out


def collect_ranges(gm: fx.GraphModule, calibration: Iterable[tuple], *,
                   graph: DataflowGraph | None = None,
                   low_dtypes: Iterable[torch.dtype] = LOW_DTYPES) -> dict[str, ValueRange]:
    """Run the fp32 captured graph ``gm`` on every calibration batch; ValueRange per float value.

    ``gm`` must be the un-rewritten capture (no casts). Raises ConfigError when a batch holds
    NaN/inf ("calibration batch 2 contains NaN at input 0").

        >>> gm, _ = capture(model)
        >>> r = collect_ranges(gm, [(torch.randn(8, 784),)])
        >>> r["linear"].max_abs, r["linear"].reduce_len
        (3.91, 784)
    """
    from amp_compiler.capture.frontend import build_dataflow

    batches = check_calibration(calibration)
    graph = graph if graph is not None else build_dataflow(gm)
    recorder = _RangeRecorder(gm, graph, low_dtypes)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            _check_batch_shapes(gm, i, batch)
            try:
                recorder.run(*batch)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 -- the graph ran on the example inputs
                raise ConfigError(f"calibration batch {i} does not run through the model "
                                  f"({_first_line(exc)}); each batch must be an input tuple the "
                                  f"model accepts, like example_inputs "
                                  f"({_shapes(batch)} given)") from exc
    return recorder.ranges()


def _first_line(exc: BaseException) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line}"[:300]


def _shapes(batch: tuple) -> str:
    return ", ".join(f"{tuple(x.shape)} {dtype_name(x.dtype)}" if isinstance(x, torch.Tensor)
                     else type(x).__name__ for x in batch) or "no inputs"


def _check_batch_shapes(gm: fx.GraphModule, i: int, batch: tuple) -> None:
    """Against the shapes torch.export recorded for each input: fixed sizes must match (symbolic
    ones, such as the batch dimension, may differ). fx graphs record none; running them says."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(batch) > len(placeholders):  # the graph would silently ignore the rest
        raise ConfigError(f"calibration batch {i} has {len(batch)} inputs; the captured model "
                          f"takes {len(placeholders)} "
                          f"({', '.join(n.name for n in placeholders) or 'none'}), like "
                          f"example_inputs")
    for j, (node, x) in enumerate(zip(placeholders, batch)):
        want = node.meta.get("val")
        if not isinstance(want, torch.Tensor):
            continue
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"calibration batch {i}, input {j} ({node.name}) is a "
                              f"{type(x).__name__}; the model takes a tensor there, like "
                              f"example_inputs")
        fixed = [d if isinstance(d, int) else None for d in want.shape]
        if x.dim() != len(fixed) or any(f is not None and f != n for f, n in zip(fixed, x.shape)):
            spec = "(" + ", ".join("*" if f is None else str(f) for f in fixed) + ")"
            raise ConfigError(f"calibration batch {i}, input {j} ({node.name}) has shape "
                              f"{tuple(x.shape)}; the captured model takes {spec} (* may vary): "
                              f"give batches shaped like example_inputs")


# -- rules D1-D4 --------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    """Observed values: three significant digits."""
    return f"{x:.3g}"


def _limit(x: float) -> str:
    """Thresholds: exact when they are whole numbers (16384), else three digits."""
    return f"{x:.0f}" if float(x).is_integer() and abs(x) < 1e7 else f"{x:.3g}"


def range_findings(graph: DataflowGraph, ranges: Mapping[str, ValueRange], low_dtype: torch.dtype, *,
                   data_max: float | None = None, plan: PrecisionPlan | None = None,
                   thresholds: Thresholds | None = None) -> list[Finding]:
    """Every rule D1-D4 that fires (pins and notes), in graph order; see the module docstring.

    ``plan``: only nodes it computes in ``low_dtype`` are considered (all compute nodes if None).
    """
    if low_dtype not in THRESHOLDS:
        raise ConfigError(f"range rules are defined for {[dtype_name(d) for d in THRESHOLDS]}, "
                          f"not {low_dtype}")
    th = thresholds or THRESHOLDS[low_dtype]
    if data_max is not None:
        if not data_max > 0:
            raise ConfigError(f"data_max={data_max!r} must be a positive number (max|x| allowed "
                              f"in {dtype_name(low_dtype)})")
        th = replace(th, data_max=float(data_max))
    low = dtype_name(low_dtype)
    tiny = torch.finfo(low_dtype).smallest_normal
    findings: list[Finding] = []
    for v in graph.vertices():
        if v.role != "compute" or v.name not in ranges:
            continue
        if plan is not None and (v.name not in plan or plan[v.name].precision != low_dtype):
            continue
        r = ranges[v.name]
        # the values this node handles in low precision: its output and its castable inputs
        values = [(v.name, "output")] + [(p, f"input '{p}'") for p in graph.float_inputs(v.name) if p in ranges]
        fired: list[Finding] = []
        for name, what in values:
            x = ranges[name]
            if x.max_abs > th.data_max:
                over = sum(m > th.data_max for m in x.batch_max)
                fired.append(Finding(v.name, "D1:overflow", "fp32",
                                     f"{what}: observed max|x| = {_fmt(x.max_abs)} > data_max "
                                     f"{_limit(th.data_max)} on {over} of {x.batches} calibration "
                                     f"batches ({low} max {_limit(torch.finfo(low_dtype).max)})"))
                break
        for name, what in values:
            x = ranges[name]
            frac = x.below_normal.get(low, 0.0)
            if frac >= th.underflow_note:
                act = "fp32" if frac >= th.underflow_fp32 else "note"
                fired.append(Finding(v.name, "D2:underflow", act,
                                     f"{what}: {frac:.1%} of its non-zero values are below {low}'s "
                                     f"smallest normal {tiny:.2g} (max|x| = {_fmt(x.max_abs)}); "
                                     f"fp32 from {th.underflow_fp32:.0%} on"))
                break
        if r.acc_bound is not None and r.acc_bound > th.acc_max:
            fired.append(Finding(v.name, "D3:reduction", "fp32",
                                 f"{v.kind} over a reduced length of {r.reduce_len}: its terms add up "
                                 f"to sum|terms| = {_fmt(r.acc_bound)} > {_limit(th.acc_max)} "
                                 f"(observed output max|x| = {_fmt(r.max_abs)}): when they align in "
                                 f"sign the {low} result overflows"))
        err = r.low_error.get(low)
        if err is not None and err > th.local_error:
            why = ("cancellation loses the low bits" if math.isfinite(err)
                   else f"its {low} result is not finite")
            fired.append(Finding(v.name, "D4:precision", "fp32",
                                 f"computed alone in {low} on rounded inputs it is off by "
                                 f"{_fmt(err)} relative to fp32 on calibration data (> "
                                 f"{_limit(th.local_error)}): {why}"))
        findings.extend(fired)
    return findings


def range_overrides(graph: DataflowGraph, ranges: Mapping[str, ValueRange], low_dtype: torch.dtype, *,
                    data_max: float | None = None, plan: PrecisionPlan | None = None,
                    thresholds: Thresholds | None = None) -> dict[str, tuple[str, str]]:
    """Nodes that must be fp32: node -> (rule, reason with the evidence); first rule that fired.

        >>> range_overrides(graph, ranges, torch.float16)["linear_1"]
        ('D1:overflow', 'output: observed max|x| = 1.02e+05 > data_max 16384 on 4 of 4 ...')
    """
    out: dict[str, tuple[str, str]] = {}
    for f in range_findings(graph, ranges, low_dtype, data_max=data_max, plan=plan, thresholds=thresholds):
        if f.action == "fp32" and f.node not in out:
            out[f.node] = (f.rule, f.reason)
    return out


# -- wiring into the planner --------------------------------------------------------------------

def apply_overrides(classification: Classification, overrides: Mapping[str, tuple[str, str]]) -> Classification:
    """A Classification whose ``keep_fp32`` also pins the ``overrides`` nodes (user entries kept;
    a user's ``force_low`` wins over an analysis pin)."""
    keep = dict(classification.keep_fp32)
    for node, (rule, reason) in overrides.items():
        if node not in keep and node not in classification.force_low:
            keep[node] = _pin_text(rule, reason)
    return replace(classification, keep_fp32=keep)


def _pin_text(rule: str, reason: str) -> str:
    return f"{rule}: {reason}"


def relabel(plan: PrecisionPlan, overrides: Mapping[str, tuple[str, str]]) -> PrecisionPlan:
    """Decisions of pinned nodes name the analysis rule and its evidence, not ``R6:keep_fp32``."""
    changes = {n: plan[n].with_(rule=rule, reason=reason) for n, (rule, reason) in overrides.items()
               if n in plan and plan[n].rule == "R6:keep_fp32"
               and plan[n].reason == f"keep_fp32={_pin_text(rule, reason)!r}"}
    return plan.replace(changes)


def plan_with_overrides(graph: DataflowGraph, low_dtype: torch.dtype, device_type: str = "cpu", *,
                        keep_fp32: Iterable = (), force_low: Iterable = (),
                        overrides: Mapping[str, tuple[str, str]] | None = None) -> PrecisionPlan:
    """classify -> pin ``overrides`` -> propagate -> relabel: the plan with analysis pins."""
    policy = policy_for(device_type, low_dtype)
    cls = classify(graph, policy, keep_fp32=keep_fp32, force_low=force_low, probe_kernels=True)
    overrides = dict(overrides or {})
    plan = propagate(graph, apply_overrides(cls, overrides), policy)
    return relabel(plan, overrides)


def plan_from_ranges(graph: DataflowGraph, ranges: Mapping[str, ValueRange], low_dtype: torch.dtype,
                     device_type: str = "cpu", *, keep_fp32: Iterable = (), force_low: Iterable = (),
                     data_max: float | None = None) -> PrecisionPlan:
    """classify -> propagate with D1-D4 pins, to a fixed point; ``plan.meta["range_findings"]``
    lists every finding as ``[node, rule, action, reason]`` (notes included)."""
    keep_fp32, force_low = override_entries(keep_fp32), override_entries(force_low)
    overrides: dict[str, tuple[str, str]] = {}
    # pins only shrink low regions, so a few rounds reach the fixed point (a pinned node's low
    # neighbours are re-checked: they may now read one of its big values through a cast)
    for _ in range(len(graph)):
        plan = plan_with_overrides(graph, low_dtype, device_type, keep_fp32=keep_fp32,
                                   force_low=force_low, overrides=overrides)
        new = {n: o for n, o in range_overrides(graph, ranges, low_dtype, data_max=data_max, plan=plan).items()
               if n not in overrides}
        if not new:
            break
        overrides.update(new)
    findings = [f for f in range_findings(graph, ranges, low_dtype, data_max=data_max)
                if f.node in overrides or (f.action == "note" and plan[f.node].precision == low_dtype)]
    meta = {**plan.meta, "range_findings": [[f.node, f.rule, f.action, f.reason] for f in findings]}
    return PrecisionPlan(dict(plan.items()), low_dtype=plan.low_dtype, device_type=plan.device_type,
                         meta=meta)


def plan_with_ranges(model: torch.nn.Module, example_inputs: tuple | None, calibration: Iterable[tuple], *,
                     dtype: torch.dtype = torch.float16, keep_fp32: Iterable = (),
                     force_low: Iterable = (), data_max: float | None = None,
                     device_type: str | None = None, training: bool = False,
                     ) -> tuple[fx.GraphModule, DataflowGraph, PrecisionPlan]:
    """capture -> build_dataflow -> collect_ranges -> classify -> propagate with D1-D4 pins.

    Returns ``(gm, dataflow, plan)``: ``gm`` is the captured fp32 graph (not yet rewritten; pass it
    to insert_casts), ``plan.meta["range_findings"]`` lists every finding as
    ``[node, rule, action, reason]`` (notes included).

        >>> gm, graph, plan = plan_with_ranges(model, None, calibration, dtype=torch.float16)
        >>> plan["linear_1"].rule, plan["linear_1"].reason
        ('D1:overflow', 'output: observed max|x| = 1.02e+05 > data_max 16384 on 4 of 4 ...')
    """
    from amp_compiler.convert import model_device_type, resolve_dtype
    from amp_compiler.capture.frontend import build_dataflow, capture

    dtype = resolve_dtype(dtype)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    device_type = device_type or model_device_type(model, example_inputs)
    was_training = model.training
    try:
        model.train(training)
        gm, _ = capture(model, example_inputs)
    finally:
        model.train(was_training)
    graph = build_dataflow(gm)
    ranges = collect_ranges(gm, calibration, graph=graph, low_dtypes=(dtype,))
    plan = plan_from_ranges(graph, ranges, dtype, device_type, keep_fp32=keep_fp32,
                            force_low=force_low, data_max=data_max)
    return gm, graph, plan
