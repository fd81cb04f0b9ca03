"""convert(): the whole pipeline on every reference model, float16 and bfloat16, both front ends.

For each (model, dtype, front end): matrix-class ops are low precision and fp32-required ops are
fp32; the forward error against fp32 is within 1.1x torch.autocast's on the same input; a
training conversion back-propagates into the user's own fp32 parameters with gradients that
match fp32's; the user's model is never modified. Then the cast economy against autocast on the
gpt model, and the typed errors convert() raises on bad input.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import amp_compiler as ac
from amp_compiler.errors import ConfigError, TraceError
from amp_compiler.models import build, gpt as gpt_module

from conftest import (DTYPES, autocast_error_or_skip, FP32_KINDS, FRONTENDS, LOW_KINDS, MODELS, assert_unchanged,
                      eval_record, loss_fn, nodes_of, rel_err, snapshot, train_record)

CASES = [(m, fe) for m in MODELS for fe in FRONTENDS[m]]

def _autocast_error(model, inputs, dtype, ref, ours: float) -> float:
    return autocast_error_or_skip(ours, lambda: model(*inputs), dtype, ref)


@pytest.mark.parametrize("name, frontend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matrix_ops_low_and_fp32_required_ops_fp32(name, frontend, dtype):
    c = eval_record(name, dtype, frontend)
    plan = c.amp.plan
    low = nodes_of(plan, *LOW_KINDS)
    fp32 = nodes_of(plan, *FP32_KINDS)
    assert low or fp32, "nothing to check: the model has neither"
    assert {n: plan[n].precision for n in low} == {n: dtype for n in low}
    assert {n: plan[n].precision for n in fp32} == {n: torch.float32 for n in fp32}
    assert plan.low_dtype == dtype and plan.device_type == "cpu"


@pytest.mark.parametrize("name, frontend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_error_within_autocast(name, frontend, dtype):
    c = eval_record(name, dtype, frontend)
    with torch.no_grad():
        out = c.amp(*c.inputs)
    assert out.dtype == c.ref.dtype and out.shape == c.ref.shape
    ours = rel_err(out, c.ref)
    theirs = _autocast_error(c.model, c.inputs, dtype, c.ref, ours)
    print(f"{name}/{frontend}/{dtype}: amp {ours:.3e}  autocast {theirs:.3e}")
    assert ours <= 1.1 * theirs + 1e-7


@pytest.mark.parametrize("name, frontend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eval_conversion_leaves_the_model_alone(name, frontend, dtype):
    c = eval_record(name, dtype, frontend)
    assert c.unchanged_error is None, c.unchanged_error
    with torch.no_grad():
        c.amp(*c.inputs)
        assert torch.equal(c.model(*c.inputs), c.ref)  # its outputs, bit for bit
    assert not c.model.training


@pytest.mark.parametrize("name, frontend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_conversion_leaves_the_model_alone(name, frontend, dtype):
    c = train_record(name, dtype, frontend)
    assert c.unchanged_error is None, c.unchanged_error
    assert c.model.training


@pytest.mark.parametrize("name, frontend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_backward_reaches_the_fp32_parameters(name, frontend, dtype):
    c = train_record(name, dtype, frontend)
    model, amp = c.model, c.amp
    # the converted module trains the user's own tensors (fp32 master weights)
    assert {id(p) for p in amp.parameters()} == {id(p) for p in model.parameters()}
    ref_model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    out = amp(*c.inputs)
    loss = out if c.targets is None else loss_fn(name)(out, c.targets)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    ref_out = ref_model(*c.inputs)
    ref_loss = ref_out if c.targets is None else loss_fn(name)(ref_out, c.targets)
    ref_loss.backward()
    # fp16 with the loss inside the graph: its gradient was scaled there, by the scaler's scale
    scale = 1.0
    if "scale_loss_grad" in amp.graph_module.code:
        assert dtype == torch.float16
        scale = amp.scaler.get_scale()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    largest = max(q.grad.norm() for q in ref_model.parameters())
    for (pname, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert p.grad is not None, pname
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), pname
        g = p.grad / scale
        if q.grad.norm() < 1e-4 * largest:
            # zero in exact arithmetic (e.g. an attention key bias): only noise to compare
            assert g.norm() < 1e-2 * largest, pname
            continue
        cos = F.cosine_similarity(g.flatten(), q.grad.flatten(), dim=0).item()
        assert cos > 0.98, (pname, cos)


@pytest.mark.parametrize("name", [m for m in MODELS if m != "lstm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_losses_are_fp32_in_training_graphs(name, dtype):
    # torch.export captured the loss branch: the loss (and everything after it) is fp32
    plan = train_record(name, dtype, "export").amp.plan
    losses = nodes_of(plan, "cross_entropy", "bce_with_logits", "nll_loss", "log_softmax")
    assert losses, "no loss in the graph"
    for n in losses:
        assert plan[n].precision == torch.float32, (n, plan[n])
    assert all(plan[n].precision == dtype for n in nodes_of(plan, *LOW_KINDS))


class Numerics(nn.Module):
    """Every fp32-required kind the policy names, in one graph: exp, log, pow, sum, losses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x, y, t):
        h = self.fc(x)
        reg = torch.exp(h).sum(-1).mean() + torch.log(h.abs() + 1).mean() + h.pow(2).mean()
        return F.cross_entropy(h, y) + F.binary_cross_entropy_with_logits(h, t) + 1e-3 * reg


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_required_ops_are_fp32(frontend, dtype):
    torch.manual_seed(0)
    model = Numerics().eval()
    x, y, t = torch.randn(8, 16), torch.randint(0, 4, (8,)), torch.rand(8, 4)
    amp = ac.convert(model, (x, y, t) if frontend == "export" else None, dtype=dtype)
    plan = amp.plan
    for kind in ("exp", "log", "pow", "sum", "cross_entropy", "bce_with_logits"):
        names = nodes_of(plan, kind)
        assert names, kind
        assert all(plan[n].precision == torch.float32 and plan[n].rule.startswith("R2") for n in names), kind
    assert plan[nodes_of(plan, "linear")[0]].precision == dtype
    ref = model(x, y, t)
    out = amp(x, y, t)
    assert out.dtype == torch.float32
    ours = rel_err(out, ref)
    assert ours <= 1.1 * _autocast_error(model, (x, y, t), dtype, ref, ours) + 1e-7


# -- cast economy --------------------------------------------------------------------------

def _autocast_casts(model, inputs, dtype) -> int:
    """aten::_to_copy kernels torch.autocast launches in one forward (fresh autocast context,
    as in a training step: its weight-cast cache lives for one context)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=dtype):
            model(*inputs)
    return sum(1 for e in prof.events() if e.name == "aten::_to_copy")


@pytest.mark.parametrize("training", [True, False])
def test_fewer_casts_than_autocast_on_gpt(training, capsys):
    model, inputs = build("gpt", "tiny")
    model.train(training)
    amp = ac.convert(model, inputs, dtype="bfloat16", training=training)
    ours = amp.cast_count()
    theirs = _autocast_casts(model, inputs, torch.bfloat16)
    with capsys.disabled():
        print(f"\ngpt tiny ({'train' if training else 'eval'}): amp_compiler {ours} cast nodes, "
              f"torch.autocast {theirs} _to_copy kernels per forward")
    assert theirs > 0
    assert ours < theirs


# -- errors --------------------------------------------------------------------------------

def test_gpt_without_example_inputs_raises_trace_error():
    model, inputs = build("gpt", "tiny")
    with pytest.raises(TraceError) as info:
        ac.convert(model)
    msg = str(info.value)
    # the first untraceable line of GPT.forward, by file and line number
    lines, start = inspect.getsourcelines(gpt_module.GPT.forward)
    offset = next(i for i, line in enumerate(lines) if "if t > self.config.block_size" in line)
    assert f"gpt.py:{start + offset}" in msg
    assert "`<root>`" in msg  # GPT.forward itself: the root module
    assert "example_inputs" in msg
    assert isinstance(info.value, ac.AmpCompilerError)


def test_trace_error_names_the_submodule_path():
    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow
                return x
            return -x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), Gate()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    with pytest.raises(TraceError) as info:
        ac.convert(Net())
    msg = str(info.value)
    line = inspect.getsourcelines(Gate.forward)[1] + 1
    assert "`blocks.1`" in msg and f"test_convert.py:{line}" in msg and "example_inputs" in msg


@pytest.mark.parametrize("bad", [lambda x: x, torch.zeros(3), "mlp", None])
def test_non_module_raises_config_error(bad):
    with pytest.raises(ConfigError, match="nn.Module"):
        ac.convert(bad)


@pytest.mark.parametrize("dtype", ["float32", torch.float32, "int8", torch.int8, "fp8", 16])
def test_bad_dtype_raises_config_error(dtype):
    model, _ = build("mlp", "tiny")
    with pytest.raises(ConfigError, match="float16.*bfloat16"):
        ac.convert(model, dtype=dtype)


@pytest.mark.parametrize("spelling, expected", [
    ("float16", torch.float16), ("fp16", torch.float16), ("mixed_float16", torch.float16),
    (torch.float16, torch.float16), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16),
    ("mixed_bfloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_dtype_spellings(spelling, expected):
    model, _ = build("mlp", "tiny")
    amp = ac.convert(model.eval(), dtype=spelling)
    assert amp.low_dtype == expected and amp.plan["linear"].precision == expected


def test_unknown_keep_fp32_raises_config_error():
    model, _ = build("mlp", "tiny")
    before = snapshot(model)
    with pytest.raises(ConfigError, match="keep_fp32 entry 'lienar'.*Did you mean 'linear'"):
        ac.convert(model, keep_fp32=("lienar",))
    assert_unchanged(model, before)  # failing convert() leaves the model alone too


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_deepcopy_is_an_independent_working_copy(frontend, training):
    """copy.deepcopy(amp) (EMA models, forked checkpoints): same outputs, own tensors, and
    training the copy leaves the original alone. torch.export's graphs carry fake tensors in
    their metadata, which cannot be deep-copied; the copy shares them."""
    model, inputs = build("resnet", "tiny")
    amp = ac.convert(model.train(training), inputs if frontend == "export" else None,
                     dtype="bfloat16", training=training)
    twin = copy.deepcopy(amp)
    assert twin.plan == amp.plan and twin.cast_count() == amp.cast_count()
    mine = {k: v.data_ptr() for k, v in amp.state_dict().items()}
    assert all(v.data_ptr() != mine[k] for k, v in twin.state_dict().items())
    if not training:
        with torch.no_grad():
            assert torch.equal(twin(*inputs), amp(*inputs))
        return
    before = {k: v.clone() for k, v in amp.state_dict().items()}
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin(*inputs).float().pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in amp.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in twin.state_dict().items())
