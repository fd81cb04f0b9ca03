"""Tolerance mode (passes/tolerance.py): every reference model meets ε on its calibration data with
O(log n) evaluations, the ranking puts the harmful node first, unreachable ε raises with the best
error, and the callback contract works with convert() itself.

Figures (calibration error, held-out error, nodes left low, evaluations) are printed per model:
``pytest tests/test_tolerance.py -s``.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from torch import nn

import amp_compiler as ac
from amp_compiler.errors import ConfigError, ToleranceError
from amp_compiler.models import build
from amp_compiler.passes import tolerance as tol
from amp_compiler.capture import build_dataflow, capture
from amp_compiler.convert import amp_builder
from amp_compiler.passes.tolerance import repair_to_tolerance
from conftest import MODELS, rel_err

FP16 = torch.float16
EXPORT = ("gpt", "bert")  # gpt needs torch.export; bert's fx conversion is not used here


def evaluation_bound(n: int) -> int:
    """The documented bound: galloping + bisection over n ranked candidates, plus the baseline."""
    return 2 * math.ceil(math.log2(n)) + 2 if n > 1 else n + 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: one thread avoids OpenMP barrier stalls on a loaded 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batches_like(inputs: tuple, n: int, seed: int) -> list[tuple]:
    """Batches from the example inputs' distribution: floats with their mean/std, integers
    uniform over their observed range (token ids, 0/1 masks)."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(x.shape, generator=g) * x.std() + x.mean() if x.is_floating_point()
                  else torch.randint(int(x.min()), int(x.max()) + 1, x.shape, generator=g) for x in inputs)
            for _ in range(n)]


@functools.lru_cache(maxsize=None)
def setup(name: str):
    model, ex = build(name, "tiny")
    model.eval()
    builder = amp_builder(model, ex if name in EXPORT else None, dtype=FP16)
    return model, builder, batches_like(ex, 4, seed=1), batches_like(ex, 8, seed=2)


@pytest.mark.parametrize("eps", [1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("name", MODELS)
def test_reference_models_meet_eps(name, eps):
    model, builder, cal, held = setup(name)
    candidates = builder.low_candidates()
    result = repair_to_tolerance(builder, model, cal, eps, candidates)
    amp = result.module
    with torch.no_grad():
        cal_err = max(rel_err(amp(*b), model(*b)) for b in cal)
        held_err = max(rel_err(amp(*b), model(*b)) for b in held)
    low_left = [n for n in candidates if amp.plan[n].precision == FP16]
    print(f"\n{name:9s} eps={eps:g}: calibration error {cal_err:.3g} (baseline "
          f"{result.baseline_error:.3g}), held-out error {held_err:.3g}, "
          f"{len(low_left)}/{len(candidates)} candidate nodes low "
          f"({len(low_left) / max(1, len(candidates)):.0%}), {result.evaluations} evaluations")

    assert cal_err <= eps and result.error == pytest.approx(cal_err, rel=1e-6, abs=1e-12)
    assert result.evaluations <= evaluation_bound(len(candidates))
    moved = set(result.fp32_nodes)
    assert moved <= set(candidates)
    if result.baseline_error <= eps:
        assert not moved and result.evaluations == 1
    else:
        assert moved
        # the prefix one node shorter was evaluated and missed ε: the search stopped at the edge
        errors = dict(result.history)
        assert errors[len(moved) - 1] > eps
    for n in moved:
        d = amp.plan[n]
        assert (d.precision, d.rule) == (torch.float32, "T1:tolerance")
        assert "measured contribution" in d.reason and f"<= ε {eps:g}" in d.reason


@pytest.mark.parametrize("name", [m for m in MODELS if m != "mf"])
def test_unreachable_eps_reports_the_best_error(name):
    model, builder, cal, _ = setup(name)
    candidates = builder.low_candidates()
    # half the low nodes may move: the other half keeps some fp16 rounding, far above 1e-9
    allowed = candidates[: max(1, len(candidates) // 2)]
    with pytest.raises(ToleranceError, match="out of reach") as info:
        repair_to_tolerance(builder, model, cal, 1e-9, allowed)
    best = float(re.search(r"best reached ([0-9.e+-]+)", str(info.value)).group(1))
    with torch.no_grad():
        baseline = max(rel_err(builder(frozenset())(*b), model(*b)) for b in cal)
    assert 1e-9 < best <= baseline * (1 + 1e-3)


def test_invalid_eps_is_a_config_error():
    model, builder, cal, _ = setup("mlp")
    for eps in (0, -1e-3, float("nan"), "1e-3"):
        with pytest.raises(ConfigError, match="positive number"):
            repair_to_tolerance(builder, model, cal, eps, builder.low_candidates())
    with pytest.raises(ConfigError, match="not nodes of the captured graph"):
        repair_to_tolerance(builder, model, cal, 1e-6, ["no_such_node"])


class Overflowing(nn.Module):
    """fc2's output reaches ~1e5: in fp16 it is inf, and LayerNorm makes NaN of it."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.ln = nn.LayerNorm(64)
        for p in self.parameters():
            if p.dim() == 2:
                p.data = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
        self.fc2.weight.data *= 3e4

    def forward(self, x):
        return self.fc3(self.ln(self.fc2(torch.relu(self.fc1(x)))))


def test_sensitivity_ranks_the_overflowing_node_first_in_one_run_per_batch(monkeypatch):
    model = Overflowing().eval()
    g = torch.Generator().manual_seed(1)
    cal = [(torch.randn(16, 32, generator=g),) for _ in range(3)]
    builder = amp_builder(model, dtype=FP16)
    runs = []
    original = tol._Sensitivity.run
    monkeypatch.setattr(tol._Sensitivity, "run", lambda self, *a: runs.append(1) or original(self, *a))
    result = repair_to_tolerance(builder, model, cal, 1e-2, builder.low_candidates())
    assert len(runs) == len(cal)  # one instrumented run per batch, not one per node
    assert math.isinf(result.baseline_error)
    ranked = list(result.contributions)
    # infinite: the node that overflows, and LayerNorm, which alone in fp16 reads it through a cast
    assert {n for n in ranked if math.isinf(result.contributions[n])} == {"linear_1", "layer_norm"}
    assert ranked[0] == "linear_1"  # ties go in graph order
    # one node moved, its LayerNorm consumer follows by propagation (R5), 2 evaluations in all
    assert list(result.fp32_nodes) == ["linear_1"] and result.evaluations == 2
    assert result.module.plan["layer_norm"].precision == torch.float32
    assert result.error <= 1e-2


def test_convert_as_the_build_callback():
    """The contract with convert(): node-name entries pinned through keep_fp32=("node:...")."""
    model, builder, cal, _ = setup("mlp_wide")
    plan = ac.convert(model, dtype="float16").plan
    candidates = [n for n in plan.low_nodes() if plan[n].category not in ("input", "param", "const")]
    assert candidates == builder.low_candidates()

    def build_amp(nodes):
        return ac.convert(model, dtype="float16", keep_fp32=tuple("node:" + n for n in sorted(nodes)))

    gm, _ = capture(model)
    via_convert = repair_to_tolerance(build_amp, model, cal, 3e-4, candidates,
                                      reference_graph=(gm, build_dataflow(gm)))
    via_builder = repair_to_tolerance(builder, model, cal, 3e-4, candidates)
    assert via_convert.error <= 3e-4
    assert set(via_convert.fp32_nodes) == set(via_builder.fp32_nodes)
    assert via_convert.error == pytest.approx(via_builder.error, rel=1e-6, abs=1e-12)
    assert via_convert.evaluations == via_builder.evaluations
