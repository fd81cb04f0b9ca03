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
    >>> graph = build_dataflow(gm)
    >>> ranges = collect_ranges(gm, [(x1,), (x2,)], graph=graph)
    >>> range_overrides(graph, ranges, torch.float16)
    {'linear_1': ('D1:overflow', 'output: observed max|x| = 1.02e+05 > data_max 16384 on 2 of 2
    calibration batches (float16 max 65504)')}
    >>> plan_from_ranges(graph, ranges, torch.float16, "cpu")["linear_1"].rule
    'D1:overflow'

``convert(..., calibration=...)`` runs these stages (``convert.numerics_plan``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import torch

from amp_compiler.errors import ConfigError

from .classify import Classification, classify, override_entries
from .graph import DataflowGraph
from .plan import PrecisionPlan, dtype_name
from .policy import policy_for
from .propagate import propagate
from .range_recorder import ValueRange
from .rules import Rule

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

@dataclass(frozen=True)
class Finding:
    """One rule that fired on one node: ``action`` is "fp32" (pinned) or "note" (reported only)."""

    node: str
    rule: str
    action: str
    reason: str


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
                fired.append(Finding(v.name, Rule.D1_OVERFLOW, "fp32",
                                     f"{what}: observed max|x| = {_fmt(x.max_abs)} > data_max "
                                     f"{_limit(th.data_max)} on {over} of {x.batches} calibration "
                                     f"batches ({low} max {_limit(torch.finfo(low_dtype).max)})"))
                break
        for name, what in values:
            x = ranges[name]
            frac = x.below_normal.get(low, 0.0)
            if frac >= th.underflow_note:
                act = "fp32" if frac >= th.underflow_fp32 else "note"
                fired.append(Finding(v.name, Rule.D2_UNDERFLOW, act,
                                     f"{what}: {frac:.1%} of its non-zero values are below {low}'s "
                                     f"smallest normal {tiny:.2g} (max|x| = {_fmt(x.max_abs)}); "
                                     f"fp32 from {th.underflow_fp32:.0%} on"))
                break
        if r.acc_bound is not None and r.acc_bound > th.acc_max:
            fired.append(Finding(v.name, Rule.D3_REDUCTION, "fp32",
                                 f"{v.kind} over a reduced length of {r.reduce_len}: its terms add up "
                                 f"to sum|terms| = {_fmt(r.acc_bound)} > {_limit(th.acc_max)} "
                                 f"(observed output max|x| = {_fmt(r.max_abs)}): when they align in "
                                 f"sign the {low} result overflows"))
        err = r.low_error.get(low)
        if err is not None and err > th.local_error:
            why = ("cancellation loses the low bits" if math.isfinite(err)
                   else f"its {low} result is not finite")
            fired.append(Finding(v.name, Rule.D4_PRECISION, "fp32",
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
               if n in plan and plan[n].rule == Rule.R6_KEEP_FP32
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
    return plan.with_meta(range_findings=[[f.node, f.rule, f.action, f.reason] for f in findings])
