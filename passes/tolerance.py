"""tolerance (analysis + search): move the fewest, most harmful nodes to fp32 until the converted
model is within ε of fp32 on the calibration data.

Rules (numbered as they appear in Decisions):

    T1  a node moved to fp32 by the search. Its reason gives its measured contribution: the
        first-order share of the output error it causes on its own, in units of max|fp32 output|.

The search, and why it needs O(log n) full evaluations:

    1. Evaluate the converted model with nothing moved. Done if its error is <= ε.
    2. Sensitivity, one instrumented run of the fp32 graph per calibration batch (not one run per
       node): at every candidate node the interpreter also computes the node alone in low
       precision on its fp32 inputs rounded where insert_casts would cast them, giving the
       perturbation δ_n it introduces. One backward pass from the outputs, weighted by the sign
       of the converted model's actual error at its worst output elements (those within 2x of
       the largest), gives every node's first-order contribution |<∂y/∂x_n, δ_n>| / max|y| at
       once. A node whose low-precision value is not finite (overflow) ranks first. If the graph
       cannot be differentiated, the node's local error max|δ_n| / max|x_n| ranks it instead.
    3. Rank the candidates by contribution and search the smallest prefix of the ranking that
       meets ε: galloping (1, 2, 4, ... nodes) then bisection, so the number of evaluations is
       at most ``2 * ceil(log2(n)) + 2`` for n candidates. Pinning a node fp32 lets propagate's
       rules (R3 fp32-input, R5 fp32_acc) move its elementwise and normalisation neighbours with
       it, so each pinned node takes its connected region along, without extra casts.
    4. The answer is the evaluated configuration itself: its error on the calibration data is
       measured, not predicted, so ``error <= ε`` holds whenever no ToleranceError is raised.
       Error may not fall monotonically with the prefix length; bisection then still returns a
       measured passing prefix, just not necessarily the shortest.

``amp_compiler.convert.amp_builder`` captures the model once and builds a converted module per
fp32 set in a few milliseconds (the plan with the set pinned, then convert's own rewrite stages on
a copy of the graph), instead of a full ``convert()`` per evaluation.

    >>> build = amp_builder(model, example_inputs, dtype=torch.float16)
    >>> result = repair_to_tolerance(build, model, calibration, 1e-3, build.low_candidates())
    >>> result.error <= 1e-3, result.evaluations, sorted(result.fp32_nodes)
    (True, 5, ['linear_1'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from amp_compiler.errors import ConfigError, ToleranceError

from .graph import DataflowGraph
from .plan import dtype_name
from .metrics import float_tensors, rel_error
from .range_recorder import check_calibration, run_in_dtype
from .rules import Rule

RULE = Rule.T1_TOLERANCE
# Output elements whose error is within this factor of the largest steer the backward pass: the
# max-norm error is decided there, and a handful of elements is a steadier target than one.
_WORST_BAND = 0.5


@dataclass(frozen=True)
class TolerancePlan:
    """The result of ``repair_to_tolerance``.

    ``fp32_nodes``: node -> (``"T1:tolerance"``, reason with its measured contribution), the
    format ``range_overrides`` uses, ready to pin in a plan. ``contributions``: every candidate's
    measured contribution, most harmful first. ``error``: the final max relative error on the
    calibration data; ``baseline_error``: the same with nothing moved. ``evaluations``: full
    evaluations of a converted model on all calibration batches. ``module``: the module built for
    the final set. ``history``: (nodes moved, error) for each evaluation, in order.
    """

    eps: float
    fp32_nodes: Mapping[str, tuple[str, str]]
    contributions: Mapping[str, float]
    error: float
    baseline_error: float
    evaluations: int
    candidates: int
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    history: tuple[tuple[int, float], ...] = ()

    @property
    def low_fraction(self) -> float:
        """Fraction of the candidates left in low precision."""
        return 1.0 - len(self.fp32_nodes) / self.candidates if self.candidates else 1.0

    def summary(self) -> str:
        return (f"tolerance eps={self.eps:g}: error {self.error:.3g} on calibration data "
                f"(baseline {self.baseline_error:.3g}); {len(self.fp32_nodes)} of "
                f"{self.candidates} candidates moved to fp32 ({self.low_fraction:.0%} left low); "
                f"{self.evaluations} evaluations")


# -- sensitivity: one instrumented run per batch ------------------------------------------------

class _Sensitivity(fx.Interpreter):
    """Runs the fp32 graph; at each candidate records δ_n (its value computed alone in low
    precision minus its fp32 value) and adds a zero probe whose gradient is ∂y/∂x_n."""

    def __init__(self, gm: fx.GraphModule, dataflow: DataflowGraph, low: torch.dtype,
                 candidates: set[str]) -> None:
        super().__init__(gm)
        self.dataflow = dataflow
        self.low = low
        self.candidates = candidates
        self.probes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.local: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        low_out = None
        if n.name in self.candidates:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            low_out = run_in_dtype(self, n, args, kwargs, self.dataflow, self.low)  # before in-place ops
        out = super().run_node(n)
        if low_out is None:
            return out
        self.local[n.name] = rel_error(low_out, out)
        probes = []

        def probe(value, low_value):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and isinstance(low_value, torch.Tensor):
                p = torch.zeros_like(value, requires_grad=True)
                ref = value.detach().float()
                # equal values (masks' -inf included) perturb nothing; inf - inf would read as NaN
                same = (low_value == ref) | (torch.isnan(low_value) & torch.isnan(ref))
                delta = torch.where(same, torch.zeros_like(ref), low_value - ref)
                probes.append((p, delta.to(value.dtype)))
                return value + p
            if isinstance(value, (tuple, list)) and isinstance(low_value, (tuple, list)) and len(value) == len(low_value):
                items = [probe(v, lv) for v, lv in zip(value, low_value)]
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
            return value

        out = probe(out, low_out)
        self.probes[n.name] = probes
        return out


def _output_weights(out_tensors, ref_tensors, amp_tensors):
    """Sign of the actual error at the worst output elements (non-finite ones count as worst)."""
    deltas = [(a.double() - r.double()) for a, r in zip(amp_tensors, ref_tensors)]
    bad = [~torch.isfinite(d) for d in deltas]
    if any(b.any() for b in bad):
        return [b.to(o.dtype) for b, o in zip(bad, out_tensors)]
    worst = max((d.abs().max().item() for d in deltas if d.numel()), default=0.0)
    if worst == 0:
        return None
    return [(torch.sign(d) * (d.abs() >= _WORST_BAND * worst)).to(o.dtype)
            for d, o in zip(deltas, out_tensors)]


def measure_contributions(gm: fx.GraphModule, dataflow: DataflowGraph, low: torch.dtype,
                          batches: list[tuple], amp_outputs: list, candidates: Iterable[str]) -> dict[str, float]:
    """Each candidate's first-order contribution to the output error (max over batches)."""
    cands = set(candidates)
    contrib: dict[str, float] = dict.fromkeys(cands, 0.0)
    for batch, amp_out in zip(batches, amp_outputs):
        interp = _Sensitivity(gm, dataflow, low, cands)
        with torch.enable_grad():
            out = interp.run(*batch)
            outs = float_tensors(out)
            scale = max((o.detach().abs().max().item() for o in outs if o.numel()), default=0.0) or 1.0
            weights = _output_weights(outs, [o.detach() for o in outs], float_tensors(amp_out))
            pairs = [(n, p, d) for n, ps in interp.probes.items() for p, d in ps]
            grads = None
            if weights is not None and pairs:
                target = sum((w * o).sum() for w, o in zip(weights, outs))
                try:
                    grads = torch.autograd.grad(target, [p for _, p, _ in pairs], allow_unused=True)
                except RuntimeError:
                    grads = None  # not differentiable (in-place on a view, integer paths...)
        per_node: dict[str, float] = {}
        if grads is not None:
            for (n, _, delta), g in zip(pairs, grads):
                if not bool(torch.isfinite(delta).all()):
                    c = math.inf  # this node overflows on its own
                elif g is None:
                    c = 0.0
                else:
                    c = abs((g.double() * delta.double()).sum().item()) / scale
                per_node[n] = per_node.get(n, 0.0) + c
        else:
            per_node = {n: e if math.isfinite(e) else math.inf for n, e in interp.local.items()}
        for n, c in per_node.items():
            contrib[n] = max(contrib[n], c)
    return contrib


# -- the search ---------------------------------------------------------------------------------

def _reference_graph(build_amp, reference: nn.Module, reference_graph):
    """The fp32 graph whose node names the candidates use, and its DataflowGraph: the builder's
    own capture (``convert.AmpBuilder``), or ``reference_graph`` as given."""
    if reference_graph is not None:
        return reference_graph
    gm, dataflow = getattr(build_amp, "graph_module", None), getattr(build_amp, "dataflow", None)
    if gm is None or dataflow is None:
        raise ConfigError("repair_to_tolerance needs the fp32 graph the candidates name: pass "
                          "reference_graph=(gm, build_dataflow(gm)) from amp_compiler.capture, or "
                          "a builder that holds them (amp_compiler.convert.amp_builder)")
    return gm, dataflow


def repair_to_tolerance(build_amp: Callable[[frozenset[str]], nn.Module], reference: nn.Module,
                        calibration: Iterable[tuple], eps: float, candidates: list[str], *,
                        low_dtype: torch.dtype | None = None,
                        reference_graph: tuple[fx.GraphModule, DataflowGraph] | None = None) -> TolerancePlan:
    """Guarantee max relative error <= ``eps`` against ``reference`` (fp32) on ``calibration``.

    ``build_amp(fp32_nodes)`` builds the converted module with those nodes pinned fp32 (e.g.
    ``amp_builder(model, ex, dtype=...)``, or a lambda around ``convert(..., keep_fp32=
    tuple("node:" + n for n in nodes))``, with ``reference_graph=(gm, dataflow)``: the fp32
    capture whose nodes the candidates name). ``candidates``: the node names the search may move
    (usually the low-precision compute nodes of the default plan). Raises ToleranceError with
    the best error reached when even all candidates in fp32 miss ``eps``.

        >>> build = amp_builder(model, None, dtype=torch.float16)
        >>> r = repair_to_tolerance(build, model, calibration, 1e-3, build.low_candidates())
        >>> print(r.summary())
        tolerance eps=0.001: error 0.00071 on calibration data (baseline 0.0023); 2 of 9 ...
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"tolerance={eps!r}: give ε as a positive number, the max relative error "
                          f"(max|amp - fp32| / max|fp32|) allowed on the calibration data, e.g. 1e-3")
    batches = check_calibration(calibration)
    candidates = list(dict.fromkeys(candidates))
    with torch.no_grad():
        refs = [reference(*b) for b in batches]
    evaluations = 0
    history: list[tuple[int, float]] = []

    def evaluate(nodes: frozenset[str]):
        nonlocal evaluations
        module = build_amp(nodes)
        with torch.no_grad():
            outs = [module(*b) for b in batches]
        evaluations += 1
        # an output that cannot be compared counts as failing, never as passing
        err = max(math.inf if math.isnan(e) else e for e in (rel_error(o, r) for o, r in zip(outs, refs)))
        history.append((len(nodes), err))
        return err, module, outs

    base_err, base_module, base_outs = evaluate(frozenset())
    if base_err <= eps:
        return TolerancePlan(eps, {}, {}, base_err, base_err, evaluations, len(candidates),
                             base_module, tuple(history))
    if not candidates:
        raise ToleranceError(f"the converted model's error {base_err:.3g} exceeds tolerance {eps:g} "
                             f"on the calibration data and no node may move to fp32 (no candidates)")

    gm, dataflow = _reference_graph(build_amp, reference, reference_graph)
    unknown = [n for n in candidates if n not in dataflow]
    if unknown:
        raise ConfigError(f"tolerance candidates {unknown[:5]} are not nodes of the captured graph; "
                          f"take them from the plan of the same capture (amp.plan.low_nodes())")
    low = low_dtype or getattr(base_module, "low_dtype", None) or torch.float16
    contrib = measure_contributions(gm, dataflow, low, batches, base_outs, candidates)
    position = {n: i for i, n in enumerate(dataflow)}
    order = sorted(candidates, key=lambda n: (-contrib[n], position[n]))

    # galloping: the smallest power of two that passes; then bisection below it
    tried: dict[int, tuple[float, nn.Module]] = {0: (base_err, base_module)}
    lo, hi, k = 0, None, 1
    while hi is None:
        k = min(k, len(order))
        err, module, _ = evaluate(frozenset(order[:k]))
        tried[k] = (err, module)
        if err <= eps:
            hi = k
        elif k == len(order):
            best = min(e for e, _ in tried.values())
            raise ToleranceError(
                f"tolerance {eps:g} is out of reach: with all {len(order)} candidate nodes in fp32 "
                f"the error on the calibration data is {err:.3g} (best reached {best:.3g}, "
                f"baseline {base_err:.3g}, {evaluations} evaluations); raise the tolerance, or "
                f"compare the fp32 model with its own captured graph: ops outside the candidates "
                f"limit the error")
        else:
            lo, k = k, 2 * k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        err, module, _ = evaluate(frozenset(order[:mid]))
        tried[mid] = (err, module)
        if err <= eps:
            hi = mid
        else:
            lo = mid
    err, module = tried[hi]
    moved = {n: (RULE, f"measured contribution {contrib[n]:.3g} x max|output| to the output error "
                       f"in {dtype_name(low)} (first order, worst calibration batch); with the "
                       f"{hi} most harmful nodes in fp32 the error is {err:.3g} <= ε {eps:g} "
                       f"(was {base_err:.3g})")
             for n in order[:hi]}
    if getattr(build_amp, "takes_reasons", False):
        module = build_amp(moved)  # same nodes, so the same numbers; its plan now says why
    return TolerancePlan(eps, moved, {n: contrib[n] for n in order}, err, base_err, evaluations,
                         len(candidates), module, tuple(history))
