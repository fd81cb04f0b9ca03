"""fused_patterns pass (rules P1-P5): GPT-2's GELU and the RMSNorm of Llama and T5 become one
torch op each, on Hugging Face models built from default configs (dropout as configured), and
on hand-written formulas, with the near misses left alone and said why; in training graphs the
gated MLP's product (P4) and an activation read by a linear layer (P5) are not kept for
backward but computed again there."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import amp_compiler as ac
from amp_compiler.capture import capture
from amp_compiler.passes.fused_patterns import fuse_patterns, fuse_rotary
from amp_compiler.passes.infra import PassResult

from conftest import DTYPES


def _targets(gm) -> list[str]:
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"]


def _rules(gm) -> list[str]:
    return [r.rule for r in gm.meta["amp_rewrites"] if r.pass_name == "fused_patterns"]


def _small(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2,
                                                num_key_value_heads=2))
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=128, d_model=32, d_kv=16, d_ff=64,
                                                   num_layers=2, num_heads=2, decoder_start_token_id=0))


def _batch(seed: int, b: int = 2, t: int = 12) -> dict:
    ids = torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


# family -> (rule, how many, the op that replaces the chain, ops that must be gone)
EXPECTED = {"gpt2": ("P1:gelu-tanh", 2, "gelu.default", {"tanh.default", "pow.Tensor_Scalar"}),
            "llama": ("P2:rms-norm", 5, "rms_norm.default", {"rsqrt.default", "pow.Tensor_Scalar"}),
            "t5": ("P2:rms-norm", 12, "rms_norm.default", {"rsqrt.default", "pow.Tensor_Scalar"})}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_library_formulas_become_one_op_and_compute_what_eager_computes(family):
    model = _small(family).eval()
    batch = _batch(0)
    gm, _ = capture(model, None, example_kwargs=batch, dynamic_shapes=None)
    rule, count, op, gone = EXPECTED[family]
    assert _rules(gm) == [rule] * count  # one per layer's activation / per norm
    targets = _targets(gm)
    assert targets.count(op) == count and not gone & set(targets)
    if rule == "P2:rms-norm":  # the norm's weight went into the op: no separate multiply
        norms = [n for n in gm.graph.nodes if str(n.target).endswith("rms_norm.default")]
        assert all(n.args[2] is not None and n.args[2].op == "get_attr" for n in norms)
    else:
        assert all(n.kwargs == {"approximate": "tanh"} for n in gm.graph.nodes if str(n.target).endswith("gelu.default"))
    with torch.no_grad():
        ref, ours = model(**batch), gm(**batch)
    assert torch.allclose(ours.logits, ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(EXPECTED))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_converted_models_train_as_close_to_fp32_as_autocast(family, dtype):
    """The fused ops compute in fp32 inside: loss and gradients of a converted training step
    (dropout on, the library's loss) are as close to fp32's as autocast's, at another shape
    than at capture."""
    model = _small(family).train()
    amp = ac.convert(model, example_kwargs=_batch(0), dtype=dtype)
    assert EXPECTED[family][0] in [r[1] for r in amp.plan.meta["rewrites"]]
    batch = _batch(1, 3, 16)
    ref, auto = copy.deepcopy(model), copy.deepcopy(model)
    losses = {}
    for name, module, ctx in [("fp32", ref, None), ("amp", amp, None), ("autocast", auto, dtype)]:
        torch.manual_seed(5)  # the same dropout masks
        if ctx is None:
            loss = module(**batch).loss
        else:
            with torch.autocast("cpu", dtype=ctx):
                loss = module(**batch).loss
        loss.backward()
        losses[name] = float(loss)
    grad = lambda m: torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])  # noqa: E731
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    eps = torch.finfo(dtype).eps
    assert abs(losses["amp"] / losses["fp32"] - 1) <= 1.1 * abs(losses["autocast"] / losses["fp32"] - 1) + 2 * eps
    assert rel(grad(model), grad(ref)) <= 1.1 * rel(grad(auto), grad(ref)) + 2 * eps


class Formulas(nn.Module):
    """The two formulas written out by hand in other spellings, and near misses."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.weight = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        v = self.variant
        if v == "gelu":
            return x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
        if v == "gelu_wrong_constant":
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.04 * torch.pow(x, 3.0))))
        if v == "gelu_inner_read":
            inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
            return 0.5 * x * (1.0 + torch.tanh(inner)) + inner
        if v == "rms":
            h = x.float()
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
        if v == "rms_gemma":  # (1 + weight): the norm is fused, the weight is not
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) * (1.0 + self.weight)
        if v == "rms_not_last_dim":
            return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-5)
        raise AssertionError(v)


@pytest.mark.parametrize("variant, rule, fused_op", [
    ("gelu", "P1:gelu-tanh", "gelu.default"),
    ("gelu_wrong_constant", "P1:no-match", None),
    ("gelu_inner_read", "P1:no-match", None),
    ("rms", "P2:rms-norm", "rms_norm.default"),
    ("rms_gemma", "P2:rms-norm", "rms_norm.default"),
    ("rms_not_last_dim", "P2:no-match", None),
])
def test_hand_written_formulas_and_near_misses(variant, rule, fused_op):
    model = Formulas(variant)
    x = torch.randn(4, 16)
    gm, _ = capture(model, (x,), dynamic_shapes=None)
    remarks = [r for r in gm.meta["amp_rewrites"] if r.pass_name == "fused_patterns"]
    assert [r.rule for r in remarks] == [rule]
    if fused_op is None:
        assert "left unfused (P3)" in remarks[0].reason
    else:
        assert fused_op in _targets(gm)
    if variant == "rms":
        assert "and the weight" in remarks[0].reason
    if variant == "rms_gemma":
        assert "and the weight" not in remarks[0].reason
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_symbolic_capture_fuses_the_gelu_with_torch_functions():
    """Without example inputs (torch.fx symbolic tracing: torch functions, no shapes) the GELU is
    ``F.gelu``; the RMSNorm needs its size, which fx does not know: left unfused, said why."""
    gelu, rms = Formulas("gelu"), Formulas("rms")
    gm, source = capture(gelu)
    assert source == "fx" and F.gelu in [n.target for n in gm.graph.nodes]
    x = torch.randn(3, 16)
    assert torch.allclose(gm(x), gelu(x), rtol=1e-6, atol=1e-6)
    gm, _ = capture(rms)
    (remark,) = [r for r in gm.meta["amp_rewrites"] if r.pass_name == "fused_patterns"]
    assert remark.rule == "P2:no-match" and "known size" in remark.reason


def test_the_pass_on_a_graph_without_the_formulas_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh"), nn.LayerNorm(8))
    gm, _ = capture(model, (torch.randn(2, 8),), dynamic_shapes=None)
    before = gm.code
    assert fuse_patterns(gm).remarks == () and gm.code == before


def _saved_bytes(fn):
    """(bytes of the distinct storages autograd keeps for backward during ``fn()``, its result)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(kept.values()), out


def _llama_mlp_wide() -> nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256,
                                            num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=2)).train()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_p4_the_gated_mlp_keeps_its_two_inputs_only(dtype, monkeypatch):
    """P4: a training conversion of Llama runs ``silu_mul`` per layer; autograd keeps exactly one
    MLP-wide activation per layer less than without the rule (``silu(gate)``), the gradients are
    the same bits, and the whole forward keeps less than autocast's."""
    import sys

    batch = _batch(3, 2, 64)
    convert_module = sys.modules["amp_compiler.convert"]
    monkeypatch.setattr(convert_module, "recompute_activations", lambda gm: PassResult(gm, False))  # P4 alone
    kept, grads = {}, {}
    for rule in (True, False):
        if not rule:
            monkeypatch.setattr(convert_module, "fuse_gated_activation", lambda gm: PassResult(gm, False))
        model = _llama_mlp_wide()
        amp = ac.convert(model, example_kwargs=batch, dtype=dtype)
        rules = [r[1] for r in amp.plan.meta["rewrites"]]
        assert rules.count("P4:silu-mul") == (2 if rule else 0)
        torch.manual_seed(0)
        kept[rule], loss = _saved_bytes(lambda: amp(**batch).loss)
        loss.backward()
        grads[rule] = [p.grad for p in model.parameters()]
    width = 2 * 64 * 256 * torch.finfo(dtype).bits // 8  # one (batch, tokens, intermediate) tensor
    assert kept[False] - kept[True] == 2 * width  # two layers
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))
    auto = _llama_mlp_wide()
    with torch.autocast("cpu", dtype=dtype):
        autocast_kept, _ = _saved_bytes(lambda: auto(**batch).loss)
    assert kept[True] < autocast_kept


def test_p4_leaves_inference_graphs_alone():
    amp = ac.convert(_llama_mlp_wide().eval(), example_kwargs={"input_ids": _batch(0)["input_ids"]},
                     dtype="bfloat16", training=False)
    assert "P4:silu-mul" not in [r[1] for r in amp.plan.meta["rewrites"]]
    assert any(str(n.target).endswith("silu.default") for n in amp.graph_module.graph.nodes)


def test_silu_mul_matches_the_unfused_product_with_broadcasting():
    from amp_compiler.passes.runtime import silu_mul

    a = torch.randn(3, 5, 8, requires_grad=True)
    b = torch.randn(1, 5, 8, requires_grad=True)  # broadcast: gradients summed back
    out = silu_mul(a, b)
    ga, gb = torch.autograd.grad(out.square().sum(), (a, b))
    ref = F.silu(a) * b
    ra, rb = torch.autograd.grad(ref.square().sum(), (a, b))
    assert torch.allclose(out, ref) and torch.allclose(ga, ra, atol=1e-6) and torch.allclose(gb, rb, atol=1e-5)
    with torch.no_grad():
        assert silu_mul(a, b).grad_fn is None


def _mlp_model(family: str) -> nn.Module:
    """Two layers, default dropout, an MLP 4x (GPT-2, BERT, ViT) or 256 / 64 (Llama) wide."""
    torch.manual_seed(0)
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2,
                                              n_positions=64)).train()
    if family == "llama":
        return _llama_mlp_wide()
    if family == "bert":
        return T.BertForSequenceClassification(T.BertConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64)).train()
    return T.ViTForImageClassification(T.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128)).train()


# family -> (what the linear layer reads, the MLP's width, tokens per sample)
P5_MODELS = {"gpt2": ("gelu_tanh(x)", 128, 12), "llama": ("silu(x) * gate", 256, 12),
             "bert": ("gelu(x)", 128, 12), "vit": ("gelu(x)", 128, 17)}


def _p5_batch(family: str) -> dict:
    g = torch.Generator().manual_seed(5)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.tensor([0, 1])}
    ids = torch.randint(0, 128, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone() if family in ("gpt2", "llama") else torch.tensor([0, 1])}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", list(P5_MODELS))
def test_p5_an_activation_read_by_a_linear_layer_is_computed_again_in_backward(family, dtype, monkeypatch):
    """P5 on library models with their default dropout and their own loss: one
    ``activation_linear`` per layer, autograd keeps exactly one MLP-wide tensor per layer less
    (the activation's output), and loss and every gradient are the same bits as without it."""
    import sys

    what, width, tokens = P5_MODELS[family]
    batch = _p5_batch(family)
    convert_module = sys.modules["amp_compiler.convert"]
    kept, grads, losses = {}, {}, {}
    for rule in (True, False):
        if not rule:
            monkeypatch.setattr(convert_module, "recompute_activations", lambda gm: PassResult(gm, False))
        model = _mlp_model(family)
        amp = ac.convert(model, example_kwargs=batch, dtype=dtype)
        rows = [r for r in amp.plan.meta["rewrites"] if r[1] == "P5:recompute-activation"]
        assert len(rows) == (2 if rule else 0)
        assert all(r[3].startswith(what) for r in rows)
        torch.manual_seed(0)  # the same dropout masks
        kept[rule], loss = _saved_bytes(lambda: amp(**batch).loss)
        loss.backward()
        losses[rule], grads[rule] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    assert kept[False] - kept[True] == 2 * 2 * tokens * width * torch.finfo(dtype).bits // 8
    assert torch.equal(losses[True], losses[False])
    for name, g in grads[True].items():
        assert torch.equal(g, grads[False][name]), name


def test_p5_leaves_inference_graphs_and_shared_activations_alone():
    """No P5 in an inference graph; an activation that something else reads too is kept
    anyway, so nothing would be saved: left as is."""
    amp = ac.convert(_mlp_model("bert").eval(), example_kwargs={"input_ids": _p5_batch("bert")["input_ids"]},
                     dtype="bfloat16", training=False)
    assert "P5:recompute-activation" not in [r[1] for r in amp.plan.meta["rewrites"]]

    class Mlp(nn.Module):
        def __init__(self, shared: bool):
            super().__init__()
            self.fc1, self.fc2, self.shared = nn.Linear(8, 32), nn.Linear(32, 8), shared

        def forward(self, x):
            a = F.gelu(self.fc1(x))
            return self.fc2(a).sum() + (a.mean() if self.shared else 0)

    for shared, rules in ((False, ["P5:recompute-activation"]), (True, [])):
        amp = ac.convert(Mlp(shared).train(), (torch.randn(4, 8),), dtype="bfloat16")
        assert [r[1] for r in amp.plan.meta["rewrites"] if r[1].startswith("P5")] == rules
    assert any(str(n.target).endswith("gelu.default") for n in amp.graph_module.graph.nodes)


def test_activation_linear_matches_the_two_ops_with_broadcasting():
    """``runtime.activation_linear`` for every activation, both product forms (linear, and
    Conv1D's addmm), a gate broadcast over the batch: the same values and gradients."""
    from amp_compiler.passes.runtime import activation_linear

    g = torch.Generator().manual_seed(0)
    ops = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu,
           "silu": F.silu}
    for act in [*ops, "silu_mul"]:
        for transposed in (False, True):
            x = torch.randn(3, 5, 16, generator=g).requires_grad_()
            gate = torch.randn(1, 5, 16, generator=g).requires_grad_() if act == "silu_mul" else None
            w = torch.randn(*((16, 8) if transposed else (8, 16)), generator=g).requires_grad_()
            b = torch.randn(8, generator=g).requires_grad_()
            a = F.silu(x) * gate if gate is not None else ops[act](x)
            ref = torch.addmm(b, a.reshape(-1, 16), w) if transposed else F.linear(a, w, b)
            out = activation_linear(x, gate, w, b, act, transposed)
            inputs = [t for t in (x, gate, w, b) if t is not None]
            upstream = torch.randn(out.shape, generator=g)
            for ours, theirs in zip(torch.autograd.grad(out, inputs, upstream),
                                    torch.autograd.grad(ref, inputs, upstream)):
                assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5), act
            assert torch.equal(out, ref), act
    with torch.no_grad():
        assert activation_linear(x, gate, w, b, "silu_mul", transposed=True).grad_fn is None


def _backward_nodes(loss: torch.Tensor) -> int:
    """How many autograd nodes backward runs from ``loss``."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return len(seen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_p6_rotary_embeddings_run_one_backward_node_each(dtype, monkeypatch):
    """P6 on HF Llama from its default config (training, labels): q and k of both layers are
    ``runtime.rotary``, backward runs fewer autograd nodes (one for the formula's seven), and
    loss and every gradient are the same bits as the unfused conversion's."""
    import sys

    batch = _batch(4, 2, 16)
    convert_module = sys.modules["amp_compiler.convert"]
    nodes, grads, losses = {}, {}, {}
    for rule in (True, False):
        if not rule:
            monkeypatch.setattr(convert_module, "fuse_rotary", lambda gm: PassResult(gm, False))
        model = _small("llama").train()
        amp = ac.convert(model, example_kwargs=batch, dtype=dtype)
        rows = [r for r in amp.plan.meta["rewrites"] if r[1] == "P6:rotary"]
        assert len(rows) == (4 if rule else 0)  # q and k, two layers
        torch.manual_seed(0)
        loss = amp(**batch).loss
        nodes[rule] = _backward_nodes(loss)
        loss.backward()
        losses[rule], grads[rule] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    assert nodes[False] - nodes[True] >= 4 * 5
    assert torch.equal(losses[True], losses[False])
    for name, g in grads[True].items():
        assert torch.equal(g, grads[False][name]), name


def test_p6_rotary_matches_the_formula_and_leaves_near_misses():
    """``runtime.rotary`` against the formula in fp64 (values, gradient of x); a formula with
    the halves the other way round (``cat((x1, -x2))``) is not P6's and is left alone."""
    from amp_compiler.passes.runtime import rotary

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=g).requires_grad_()
    cos, sin = torch.randn(2, 1, 5, 8, dtype=torch.float64, generator=g), torch.randn(2, 1, 5, 8, dtype=torch.float64, generator=g)
    ref = x * cos + torch.cat((-x[..., 4:], x[..., :4]), -1) * sin
    out = rotary(x, cos, sin)
    up = torch.randn(out.shape, dtype=torch.float64, generator=g)
    assert torch.equal(out, ref)
    assert torch.allclose(torch.autograd.grad(out, x, up)[0], torch.autograd.grad(ref, x, up)[0])
    learned = sin.clone().requires_grad_()  # learned phases: their gradient too, as autograd's
    ours = torch.autograd.grad(rotary(x, cos, learned), (x, learned), up)
    theirs = torch.autograd.grad(x * cos + torch.cat((-x[..., 4:], x[..., :4]), -1) * learned, (x, learned), up)
    assert all(torch.allclose(a, b) for a, b in zip(ours, theirs))

    class Rotation(nn.Module):  # the same harness for the formula and its near miss
        def __init__(self, swapped: bool):
            super().__init__()
            self.swapped = swapped

        def forward(self, q, cos, sin):
            halves = (q[..., :4], -q[..., 4:]) if self.swapped else (-q[..., 4:], q[..., :4])
            return q * cos + torch.cat(halves, -1) * sin

    args = (x.detach().float(), cos.float(), sin.float())
    for swapped, rules in ((False, ["P6:rotary"]), (True, [])):
        gm = torch.export.export(Rotation(swapped), args).module()
        assert [r.rule for r in fuse_rotary(gm).remarks] == rules
        assert torch.equal(gm(*args), Rotation(swapped)(*args))
