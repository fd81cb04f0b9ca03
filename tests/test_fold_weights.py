"""fold_weights pass (rules F1-F3): inference conversions cast parameters once, at convert time.

Checks the folded graph (no parameter cast left in ``graph_module.code``), the stored
low-precision copies (bit for bit ``param.to(dtype)``), that the graph module keeps no fp32
tensor it does not read, ``amp.eval(); amp.freeze()`` on a training conversion, and that the
user's model is left exactly as it was.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn

import amp_compiler as ac
from amp_compiler.errors import AmpCompilerError
from amp_compiler.models import build

from conftest import (DTYPES, EPS, FRONTENDS, MODELS, assert_unchanged, cast_nodes,
                      eval_conversion, fetch, rel_err, snapshot)

CASES = [(m, fe) for m in MODELS for fe in FRONTENDS[m] if (m, fe) != ("bert", "fx")]


def _tensors_read_by_graph(gm: torch.fx.GraphModule) -> set[int]:
    """ids of every tensor the graph reads: get_attr targets and the state of called modules."""
    read: set[int] = set()
    for n in gm.graph.nodes:
        if n.op not in ("get_attr", "call_module"):
            continue
        obj = fetch(gm, n.target)
        if isinstance(obj, torch.Tensor):
            read.add(id(obj))
        elif isinstance(obj, nn.Module):
            read |= {id(t) for t in itertools.chain(obj.parameters(), obj.buffers())}
    return read


def _param_casts(name: str, dtype, frontend: str) -> set[str]:
    """Names of the parameters a training conversion of the same model casts to ``dtype``
    (cast nodes, and the parameters of leaf modules run in ``dtype``)."""
    model, inputs = build(name, "tiny")
    amp = ac.convert(model.eval(), inputs if frontend == "export" else None, dtype=dtype,
                     training=True, loss_scale=None)
    gm = amp.graph_module
    names = {id(p): n for n, p in model.named_parameters()}
    wanted = {names[id(fetch(gm, c.args[0].target))] for c in cast_nodes(gm)
              if c.args[0].op == "get_attr" and c.args[1] == dtype}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target.__name__ == "module_in_dtype":
            wanted |= {names[id(p)] for p in fetch(gm, n.args[0].target).parameters()}
    return wanted


@pytest.mark.parametrize("name, frontend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eval_conversion_casts_no_parameter_at_run_time(name, frontend, dtype):
    model, inputs, amp = eval_conversion(name, dtype, frontend)
    gm = amp.graph_module
    assert amp.folded
    weights = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    assert not [c.name for c in cast_nodes(gm) if c.args[0].name in weights]
    assert not [c for c in amp.casts if c.is_param]
    # and in the generated code: no `<param>.to(` anywhere
    for line in gm.code.splitlines():
        m = re.search(r"= (\w+)\.to\(", line)
        if m:
            assert m.group(1) not in weights, line
    assert "module_in_dtype" not in gm.code  # F3: leaf modules swapped for low copies


# one dtype per case keeps the file fast; both dtypes are covered across the cases
SAMPLE = [("mlp", "fx", torch.float16), ("resnet", "export", torch.bfloat16),
          ("gpt", "export", torch.float16), ("lstm", "fx", torch.bfloat16),
          ("lstm", "export", torch.float16)]


@pytest.mark.parametrize("name, frontend, dtype", SAMPLE, ids=str)
def test_folded_copies_are_the_cast_weights(name, frontend, dtype):
    # the same model converted for training says which parameters are used in low precision
    wanted = _param_casts(name, dtype, frontend)
    model, inputs, amp = eval_conversion(name, dtype, frontend)
    params = dict(model.named_parameters())
    gm = amp.graph_module
    stored = [b for n, b in gm.named_buffers() if n.startswith("_amp_")]
    stored += [p for n, m in gm.named_children() if n.startswith("_amp_") for p in m.parameters()]
    assert wanted and len(stored) == len(wanted)
    assert {b.dtype for b in stored} == {dtype}
    # bit for bit the weights cast once (build() is deterministic: same weights as `model`)
    unmatched = list(stored)
    for n in sorted(wanted):
        low = params[n].detach().to(dtype)
        hit = next((b for b in unmatched if b.shape == low.shape and torch.equal(b, low)), None)
        assert hit is not None, n
        unmatched = [b for b in unmatched if b is not hit]


@pytest.mark.parametrize("name, frontend", [
    ("mlp", "fx"), ("mlp", "export"), ("resnet", "fx"), ("resnet", "export"), ("gpt", "export"),
    ("bert", "export"), ("mf", "export"), ("lstm", "export"), ("lstm", "fx")])
def test_graph_module_holds_no_fp32_tensor_it_does_not_read(name, frontend):
    model, inputs, amp = eval_conversion(name, torch.float16, frontend)
    gm = amp.graph_module
    read = _tensors_read_by_graph(gm)
    unread = [n for n, t in itertools.chain(gm.named_parameters(), gm.named_buffers())
              if t.is_floating_point() and t.dtype == torch.float32 and id(t) not in read]
    assert unread == []
    dead = [n.name for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    assert dead == []


@pytest.mark.parametrize("name, frontend, dtype", [
    ("mlp", "fx", torch.bfloat16), ("gpt", "export", torch.bfloat16), ("lstm", "fx", torch.float16)],
    ids=str)
def test_eval_then_freeze_folds_a_training_conversion(name, frontend, dtype):
    model, inputs = build(name, "tiny")
    model.train()
    amp = ac.convert(model, inputs if frontend == "export" else None, dtype=dtype, training=True)
    assert not amp.folded and any(c.is_param for c in amp.casts)
    with pytest.raises(AmpCompilerError, match="eval"):
        amp.freeze()
    amp.eval()
    assert any(c.is_param for c in amp.casts)  # eval alone does not fold
    assert amp.freeze() is amp and amp.folded
    assert not [c for c in amp.casts if c.is_param]
    weights = {n.name for n in amp.graph_module.graph.nodes if n.op == "get_attr"}
    assert not [c for c in cast_nodes(amp.graph_module) if c.args[0].name in weights]
    # same numbers as converting for inference directly
    direct = ac.convert(model, inputs if frontend == "export" else None, dtype=dtype, training=False)
    with torch.no_grad():
        assert torch.equal(amp(*inputs), direct(*inputs))
    with pytest.raises(AmpCompilerError, match="training=True"):
        amp.train()
    assert model.training  # the user's model keeps its mode throughout


@pytest.mark.parametrize("name, frontend, dtype", SAMPLE, ids=str)
def test_folding_leaves_the_user_model_alone(name, frontend, dtype):
    model, inputs = build(name, "tiny")
    model.train()  # converted for inference anyway: the flag must come back
    before = snapshot(model)
    with torch.no_grad():
        model.eval()
        ref = model(*inputs)
        model.train()
    amp = ac.convert(model, inputs if frontend == "export" else None, dtype=dtype, training=False)
    with torch.no_grad():
        amp(*inputs)
    assert_unchanged(model, before)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(*inputs), ref)  # its outputs, bit for bit


class _RunningAverage(nn.Module):
    """Reads a buffer in low precision, then updates it in forward (eval mode too)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("avg", torch.zeros(8, 8))

    def forward(self, x):
        y = self.fc(x) @ self.avg
        self.avg.mul_(0.5).add_(0.5)
        return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_f4_a_buffer_written_in_forward_is_not_folded(dtype):
    """A folded copy would keep the value of convert time (all zeros here: output 0 forever);
    the cast stays in the graph and every call reads the current value."""
    torch.manual_seed(0)
    model, twin = _RunningAverage().eval(), _RunningAverage().eval()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 8)
    amp = ac.convert(model, (x,), dtype=dtype)
    assert "_amp_fc_weight" in amp.graph_module.code  # the weight is still folded
    assert not any("avg" in name for name, _ in amp.graph_module.named_buffers()
                   if name.startswith("_amp_"))
    with torch.no_grad():
        for _ in range(3):
            out, ref = amp(x), twin(x)
    assert torch.equal(model.avg, twin.avg)  # the update lands on the user's buffer
    assert rel_err(out, ref) < 8 * EPS[dtype]
