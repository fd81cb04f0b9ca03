"""The pass contract (``passes/infra.py``): every rewrite returns a ``PassResult``; the
``PassManager`` checks the graph after each rewrite and names the failing pass and the passes
before it; remarks, taken and missed, reach the plan."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.fx as fx
from onnx import TensorProto, helper
from torch import nn

import amp_compiler as ac
from amp_compiler.errors import ConfigError, PassError
from amp_compiler.models import build
from amp_compiler.passes import infra
from amp_compiler.passes.hygiene import clean_graph
from amp_compiler.passes.infra import PassManager, PassResult, Remark, result
from amp_compiler.passes.rules import Rule


class _Small(nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def _gm() -> fx.GraphModule:
    return fx.symbolic_trace(_Small())


def _breaks_the_graph(gm: fx.GraphModule) -> PassResult:
    """Leaves a node that reads a value from nowhere (a placeholder after its reader)."""
    relu = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.relu)
    with gm.graph.inserting_after(relu):
        late = gm.graph.placeholder("late")
    relu.args = (late,)
    return result(gm, [Remark("test", Rule.H4_DEAD_CODE, relu.name, "broke it")])


def test_a_rewrite_that_leaves_an_invalid_graph_is_named_with_the_passes_before_it():
    passes = PassManager()
    passes.run(clean_graph, _gm())
    with pytest.raises(PassError, match=r"pass _breaks_the_graph left an invalid graph after clean_graph"):
        passes.run(_breaks_the_graph, _gm())


def test_an_unexpected_failure_names_the_pass_and_keeps_its_cause():
    def explodes(gm):
        raise KeyError("boom")

    with pytest.raises(PassError, match=r"pass explodes failed \(KeyError: 'boom'\) as the first pass") as info:
        PassManager().run(explodes, _gm())
    assert isinstance(info.value.__cause__, KeyError) and isinstance(info.value, ac.AmpCompilerError)


def test_our_own_errors_pass_through_and_a_result_that_is_no_pass_result_is_refused():
    def refuses(gm):
        raise ConfigError("say what to do")

    with pytest.raises(ConfigError, match="say what to do"):
        PassManager().run(refuses, _gm())
    with pytest.raises(PassError, match="returned list, not a PassResult"):
        PassManager().run(lambda gm: [], _gm())


def test_the_check_is_the_pipelines_choice():
    """FX graphs are linted by default; an ONNX pipeline passes its own check, or None where it
    checks the model it returns itself (``convert_onnx``'s full checker at the end)."""
    good = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["a"], ["b"])], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])]))

    def dangling(model):
        model.graph.node[0].input[0] = "nowhere"
        return result(model, [Remark("test", Rule.W3_ONE_CAST, "relu", "renamed its input")])

    with pytest.raises(PassError, match=r"pass dangling left an invalid graph as the first pass"):
        PassManager(check=onnx.checker.check_model).run(dangling, onnx.load_from_string(good.SerializeToString()))
    unchecked = PassManager(check=None)
    assert unchecked.run(dangling, good).modified and unchecked.history == ["dangling"]


def test_modified_follows_the_remarks_taken():
    gm = _gm()
    assert not result(gm, [Remark("p", Rule.A1_ANCHOR, "n", "why", missed=True)]).modified
    r = result(gm, [Remark("p", Rule.A1_ANCHOR, "n", "why"), Remark("p", Rule.A2_SINGLE_USE, "m", "no", missed=True)])
    assert r.modified and [x.node for x in r.taken] == ["n"] and [x.node for x in r.missed] == ["m"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_runs_every_rewrite_through_the_manager(training, monkeypatch):
    ran: list[tuple[str, type]] = []
    real = infra.PassManager.run

    def recording(self, fn, ir, *args, **kwargs):
        out = real(self, fn, ir, *args, **kwargs)
        ran.append((fn.__name__, type(out)))
        return out

    monkeypatch.setattr(infra.PassManager, "run", recording)
    model, inputs = build("gpt", "tiny", with_targets=True)
    model.train(training)
    amp = ac.convert(model, inputs, dtype="float16", rewrite_attention=True)
    names = [n for n, _ in ran]
    assert {t for _, t in ran} == {PassResult}
    expected = ["clean_graph", "fold_sdpa_masks", "fuse_patterns", "rewrite_attention", "insert_casts",
                "fuse_linear_cross_entropy"]
    expected += (["fuse_gated_activation", "recompute_activations", "fuse_rotary", "insert_loss_scaling"]
                 if training else ["fold_weights"])
    assert names == expected + ["cache_size_only"]
    # what they did is in the plan, with the rule that did it
    rows = amp.plan.meta["rewrites"]
    assert {r[0] for r in rows} >= {"attention", "insert_casts"} | ({"loss_scaling"} if training else {"fold_weights"})
    assert all(Rule(r[1]).pass_name in (r[0], "onnx.convert") for r in rows)


def test_a_softmax_that_is_no_attention_is_a_missed_remark_with_its_reason():
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            p = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), dim=-1)
            return p * 2  # the probabilities are not read by a matmul with v

    amp = ac.convert(Scores().eval(), (torch.randn(2, 4, 8),), dtype="bfloat16", rewrite_attention=True)
    (row,) = [r for r in amp.plan.meta["missed"] if r[0] == "attention"]
    assert row[1] == Rule.A2_SINGLE_USE and row[2] == "softmax"
    assert "not read by one matmul(probs, v)" in row[3] and "left as written" in row[3]
    assert not [r for r in amp.plan.meta["rewrites"] if r[0] == "attention"]
