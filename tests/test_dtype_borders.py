"""Dtype borders the conversion must not cross (propagate's rules R9:complex and R0:module-dtype).

- Complex numbers: torch has no complex bfloat16 and few complex32 kernels, so ops that make or
  read complex values (``view_as_complex``, ``torch.fft``, ``torch.polar``, ``|z|``) compute in
  float32 with complex64 values, their low-precision real inputs cast up at the border (R9).
  Before, the export path fed them float16/bfloat16 ("Unsupported dtype Half" from rfft, a
  float16 result from ``view_as_complex(...).abs()``) and fx left them fp32 only by accident
  (``unknown`` kinds).
- A submodule the user stored in a dtype of its own (``nn.Linear(...).half()`` in a bfloat16
  conversion, a ``.bfloat16()`` one in a float16 conversion, a float64 one) runs in that dtype,
  its parameters never cast to the conversion's low dtype, casts only at its border
  (R0:module-dtype; float64 by R0:float64). Before, its weights were cast to the conversion's
  dtype: it ran in bfloat16 silently, or failed on a dtype mismatch.
- Tensor attributes fx records as ``getattr`` (``z.real``, ``w.T``) are values with a kind, not
  metadata (they were never cast: ``x @ w.T`` failed in a low dtype).

Both capture paths (fx without example inputs, torch.export with them), both low dtypes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amp_compiler.passes.plan import PrecisionPlan
from conftest import DTYPES, EPS, cast_nodes, convert_via, rel_err, runtime_dtypes

FRONTENDS = ("fx", "export")
X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


# -- complex numbers (R9) ---------------------------------------------------------------------------

class Spectral(nn.Module):
    """A low-precision linear feeding complex ops, whose real results feed another linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(16, 16)
        self.fc_out = nn.Linear(8 + 9 + 16 + 16 + 9, 16)

    def forward(self, x):
        h = self.fc_in(x)
        z = torch.view_as_complex(h.reshape(h.shape[0], 8, 2))
        f = torch.fft.rfft(h, dim=-1)
        back = torch.fft.irfft(f * 2, n=16, dim=-1)
        p = torch.polar(h.abs() + 1, h)
        rotated = p * z.mean(-1, keepdim=True)
        feats = torch.cat([z.abs(), f.imag, back, rotated.real, torch.view_as_real(f).amax(-1)], -1)
        return self.fc_out(feats), z.abs()


def _complex_tail(h: torch.Tensor) -> torch.Tensor:
    """The model's second output computed from ``h`` in float32."""
    return torch.view_as_complex(h.float().reshape(h.shape[0], 8, 2)).abs()


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_complex_values_stay_float32_and_complex64(dtype, frontend):
    model = Spectral().eval()
    with torch.no_grad():
        ref = model(X)
    amp = convert_via(frontend, model, (X,), dtype=dtype)
    out = amp(X)  # rfft and polar ran on low-precision inputs here before (first call failed)
    assert [o.dtype for o in out] == [r.dtype for r in ref] == [torch.float32] * 2

    plan = amp.plan
    complex_kinds = {"view_as_complex", "fft_rfft", "fft_irfft", "polar", "view_as_real", "real", "imag"}
    touched = {n: d for n, d in plan.items() if d.category == "complex"}
    assert complex_kinds <= {d.kind for d in touched.values()}
    # |z|, f * 2, p * z and the mean of z read complex values: complex too, whatever their kind
    assert {"abs", "mul", "mean"} <= {d.kind for d in touched.values()}
    for name, d in touched.items():
        assert (d.precision, d.rule) == (torch.float32, "R9:complex"), (name, d)
        assert "complex" in d.reason and "float32" in d.reason, d.reason
    assert plan["linear"].precision == dtype  # the linears around them stay low
    assert dict(PrecisionPlan.from_json(plan.to_json()).items()) == dict(plan.items())

    # at run time: complex values are complex64, their real results float32, nothing complex32
    rec = runtime_dtypes(amp.graph_module, X)
    ran = {n: rec.dtypes[n] for n in touched if n in rec.dtypes}
    assert set(ran.values()) <= {torch.complex64, torch.float32}, ran
    assert torch.complex64 in ran.values()
    assert torch.complex32 not in rec.dtypes.values()
    # complex values are never cast; low real values are cast up where they enter
    for c in cast_nodes(amp.graph_module):
        assert not c.args[0].meta.get("val", torch.empty(0)).is_complex()
        assert c.meta["amp_cast"]["dtype"] != torch.complex32

    # numbers: the complex part is float32 arithmetic on the low linear's (exact) output
    h_low = rec.values["linear"]
    assert h_low.dtype == dtype
    assert torch.equal(out[1], _complex_tail(h_low))
    assert rel_err(out[1], ref[1]) < 4 * EPS[dtype]
    assert rel_err(out[0], ref[0]) < 8 * EPS[dtype]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_complex_ops_stay_float32_under_force_low(frontend):
    # force_low cannot put an op in a dtype torch has no complex form of (as R8 for kernels)
    model = Spectral().eval()
    amp = convert_via(frontend, model, (X,), dtype=torch.bfloat16, force_low=("view_as_complex", "abs"))
    assert all(d.precision == torch.float32 for d in amp.plan.values() if d.category == "complex")
    amp(X)


def test_saved_plan_cannot_put_complex_ops_in_the_low_dtype():
    import json

    from amp_compiler.errors import PlanError

    data = json.loads(convert_via("fx", Spectral().eval(), (X,), dtype=torch.float16).plan.to_json())
    data["nodes"]["view_as_complex"]["precision"] = "float16"
    with pytest.raises(PlanError, match=r"view_as_complex.*'float16' is not float32 or '-' \(rule R9:complex\)"):
        PrecisionPlan.from_json(json.dumps(data))


# -- a submodule in a dtype of the user's (R0:module-dtype) -------------------------------------------

class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class WithTower(nn.Module):
    """A model in ``model_dtype`` whose ``tower`` the user stored in ``tower_dtype`` (and feeds
    that dtype). Most parameter elements are outside the tower: the model's own dtype is theirs."""

    def __init__(self, tower_dtype: torch.dtype, model_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.tower = Tower()
        self.out = nn.Linear(16, 64)
        self.to(model_dtype)
        self.tower.to(tower_dtype)
        self.tower_dtype = tower_dtype

    def forward(self, x):
        h = torch.relu(self.inp(x))
        t = self.tower(h.to(self.tower_dtype))
        return self.out(h + t.to(h.dtype)), t


_CASES = [  # (submodule dtype, conversion dtype, the model's dtype)
    (torch.float16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float16, torch.float32),
    (torch.float32, torch.bfloat16, torch.float16),  # a float32 piece of a float16 model
    (torch.float64, torch.float16, torch.float32),
    (torch.float64, torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("tower_dtype, dtype, model_dtype", _CASES,
                         ids=lambda d: str(d).replace("torch.", ""))
def test_submodule_runs_in_the_dtype_the_user_gave_it(tower_dtype, dtype, model_dtype, frontend):
    model = WithTower(tower_dtype, model_dtype).eval()
    x = X.to(model_dtype)
    params = {k: (id(p), p.dtype, p.detach().clone()) for k, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(x)
    amp = convert_via(frontend, model, (x,), dtype=dtype)
    with torch.no_grad():
        out = amp(x)
    assert [o.dtype for o in out] == [r.dtype for r in ref] == [model_dtype, tower_dtype]

    # the plan: every tower op computes in the tower's dtype, with its rule and reason
    tower = [n for n, d in amp.plan.items() if amp._dataflow.vertex(n).module_path.startswith("tower")
             and amp._dataflow.vertex(n).role == "compute"]
    assert {amp.plan[n].kind for n in tower} >= {"linear", "gelu"}
    rule = "R0:float64" if tower_dtype == torch.float64 else "R0:module-dtype"
    for n in tower:
        d = amp.plan[n]
        assert (d.precision, d.rule) == (tower_dtype, rule), (n, d)
        if rule == "R0:module-dtype":
            assert d.reason.startswith("parameters of 'tower"), d.reason
            assert f"stored as {str(tower_dtype)[6:]} by the user" in d.reason, d.reason
    assert amp.plan["linear"].precision == dtype  # the model around it is converted
    assert dict(PrecisionPlan.from_json(amp.plan.to_json()).items()) == dict(amp.plan.items())

    # the tower's parameters are never cast (nor folded into low copies); the model untouched
    tower_params = {n for n, d in amp.plan.items() if d.category == "param"
                    and amp._dataflow.vertex(n).module_path.startswith("tower")}
    assert tower_params and not [c for c in amp._casts if c.source in tower_params]
    assert not [b for b in dict(amp.graph_module.named_buffers()) if "tower" in b]
    for k, p in model.named_parameters():
        assert (id(p), p.dtype) == params[k][:2] and torch.equal(p, params[k][2]), k

    # at run time the tower runs in its dtype, and computes what the model's tower computes on
    # the value the converted graph feeds it (the cast at its border)
    rec = runtime_dtypes(amp.graph_module, x)
    assert {rec.dtypes[n] for n in tower if n in rec.dtypes} == {tower_dtype}
    first = next(n for n in amp.graph_module.graph.nodes if n.name == tower[0])
    fed = rec.values[first.args[0].name]
    assert fed.dtype == tower_dtype
    with torch.no_grad():
        assert torch.equal(out[1], model.tower(fed))
    assert rel_err(out[0], ref[0]) < 8 * EPS[dtype]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_submodule_dtype_in_training(frontend):
    # training shares the user's parameters: the float16 tower's are used as they are, with
    # gradients in float16, as in the model
    model = WithTower(torch.float16).train()
    amp = convert_via(frontend, model, (X,), dtype=torch.bfloat16, training=True)
    out, t = amp(X)
    assert t.dtype == torch.float16
    (out.sum() + t.float().sum()).backward()
    assert model.tower.a.weight.grad.dtype == torch.float16
    assert model.inp.weight.grad.dtype == torch.float32
    assert not [c for c in amp._casts if c.source.startswith("tower")]


def test_whole_model_in_another_dtype_is_still_converted():
    # the model's own dtype (most parameter elements) is what is converted: a float16 model
    # converted to bfloat16 runs its linears in bfloat16 (tests/test_insert_casts.py, I5)
    model = Tower().half().eval()
    amp = convert_via("fx", model, (), dtype=torch.bfloat16)
    assert all(d.rule != "R0:module-dtype" for d in amp.plan.values())
    assert amp.plan["linear"].precision == torch.bfloat16


# -- tensor attributes on the fx path ---------------------------------------------------------------

class Transposes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) / 4)

    def forward(self, x):
        return torch.relu(x @ self.w.T) @ self.w.mT


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fx_tensor_attributes_are_values_not_metadata(dtype):
    # fx records ``z.real`` and ``w.T`` as getattr nodes; they were read as metadata (never
    # cast), so ``x @ w.T`` multiplied a low input by an fp32 weight and failed
    model = Transposes().eval()
    amp = convert_via("fx", model, (X,), dtype=dtype)
    assert {d.kind for n, d in amp.plan.items() if n.startswith("getattr")} == {"transpose"}
    with torch.no_grad():
        assert rel_err(amp(X), model(X)) < 8 * EPS[dtype]
