"""fused_cross_entropy pass (rules X1-X5) and ``runtime.linear_cross_entropy``.

The runtime function against the unfused computation it replaces (``F.cross_entropy`` of
``F.linear(...).float()``), chunk boundaries forced; the pass on Hugging Face causal LMs built
from default configs (GPT-2 and Llama, labels, dropout as configured): called as Trainer does,
``model(**batch)``, they return their logits, which the fused node computes once (X4); wrapped
to return the loss alone, as many training loops do, the head's linear layer goes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import amp_compiler as ac
import amp_compiler.passes.runtime as runtime
from amp_compiler.models import build
from amp_compiler.passes import fused_cross_entropy as fce
from amp_compiler.passes.runtime import linear_cross_entropy

from conftest import DTYPES

VOCAB = 32000  # >= fce.MIN_VOCAB: fused


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _unfused(h, w, b, target, **kw):
    logits = F.linear(h, w, b).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1), **kw)


# -- the runtime function ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_matches_the_unfused_loss_and_gradients_across_chunks(dtype, reduction, smoothing, padded, monkeypatch):
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 5 * 300)  # 5 rows a chunk: 7 chunks, one short
    if padded:  # X7, as on CUDA: 300 classes computed as 320, the padding's logits -inf
        monkeypatch.setattr(runtime, "padded_vocab", lambda w: 320)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(300, 16, generator=g) / 4).to(dtype).requires_grad_()
    b = (torch.randn(300, generator=g) / 4).to(dtype).requires_grad_()
    target = torch.randint(0, 300, (3, 11), generator=g)
    target[0, :4] = -100  # ignored rows
    kw = dict(reduction=reduction, ignore_index=-100, label_smoothing=smoothing)
    ours = linear_cross_entropy(h, w, b, target, **kw)
    grads = torch.autograd.grad(ours * 3.0, (h, w, b))  # an incoming gradient other than 1
    ref = _unfused(h, w, b, target, **kw)
    ref_grads = torch.autograd.grad(ref * 3.0, (h, w, b))
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(ref)) <= 1e-5 * abs(float(ref))
    for ours_g, ref_g, what in zip(grads, ref_grads, "hwb"):
        assert ours_g.dtype == ref_g.dtype == dtype and ours_g.shape == ref_g.shape
        # the same low-precision matmuls; grad w and b are summed over chunks in fp32 before
        # rounding, the unfused matmul rounds once: a few ulps of the low dtype at most
        assert _rel(ours_g, ref_g) <= 4 * torch.finfo(dtype).eps, what


def test_the_loss_scale_keeps_fp16_gradients_from_underflowing():
    """X5: gradients computed ahead at the loss scale, as the unfused backward computes them
    when the incoming gradient is the scale; backward divides only to apply that gradient."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 16, generator=g).half().requires_grad_()
    w = (torch.randn(5000, 16, generator=g) / 4).half().requires_grad_()
    target = torch.randint(0, 5000, (64,), generator=g)
    scale = torch.tensor(2.0 ** 16)
    ours = torch.autograd.grad(linear_cross_entropy(h, w, None, target, scale=scale) * scale, (h, w))
    ref = torch.autograd.grad(_unfused(h, w, None, target) * scale, (h, w))
    for a, b in zip(ours, ref):
        assert torch.count_nonzero(a) == torch.count_nonzero(b) > 0
        assert _rel(a, b) <= 4 * torch.finfo(torch.float16).eps
    # without the scale, the per-row gradients of a 5000-class softmax mean (~1/(64*5000)) lose
    # bits in fp16: the scale is what keeps them
    unscaled = torch.autograd.grad(linear_cross_entropy(h, w, None, target) * scale, (h, w))
    assert _rel(unscaled[1], ref[1]) > _rel(ours[1], ref[1])


def test_every_row_ignored_is_nan_like_torch_and_no_grad_computes_no_gradients():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(300, 8, requires_grad=True)
    target = torch.full((4,), -100)
    assert torch.isnan(linear_cross_entropy(h, w, None, target)) and torch.isnan(_unfused(h, w, None, target))
    target[1] = 7
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, None, target)
    assert loss.grad_fn is None and abs(float(loss) - float(_unfused(h, w, None, target))) < 1e-5
    with pytest.raises(ValueError, match="reduction='none'"):
        linear_cross_entropy(h, w, None, target, reduction="none")


# -- the pass on library models ------------------------------------------------------------------

def _gpt2(vocab: int = VOCAB) -> nn.Module:
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2,
                                          n_positions=64, bos_token_id=0, eos_token_id=0)).train()


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, bos_token_id=0,
                                            eos_token_id=0)).train()


def _batch(b: int, t: int, seed: int, vocab: int = VOCAB) -> dict:
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, : t // 3] = -100  # padding the loss ignores
    return {"input_ids": ids, "labels": labels}


class LossOnly(nn.Module):
    """``forward(**batch) -> model(**batch).loss``: the training loop's usual wrapper."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


def _fused_nodes(amp) -> list:
    return [n for n in amp.graph_module.graph.nodes
            if getattr(n.target, "__name__", "") == "linear_cross_entropy"]


@pytest.mark.parametrize("build_model", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_lm_loss_is_fused_and_trains_like_autocast(build_model, dtype):
    model = build_model()
    amp = ac.convert(LossOnly(model), example_kwargs=_batch(1, 8, 0), dtype=dtype)
    (node,) = _fused_nodes(amp)
    rows = [r for r in amp.plan.meta["rewrites"] if r[0] == "fused_cross_entropy"]
    assert [r[1] for r in rows] == ["X3:fused"] and f"{VOCAB} classes" in rows[0][3]
    assert not any(getattr(n.target, "__name__", "") == "cross_entropy_loss"
                   for n in amp.graph_module.graph.nodes)
    assert (node.kwargs["scale"] is not None) == (dtype == torch.float16)  # L5
    errors = {"amp": [], "autocast": []}
    for seed, (b, t) in enumerate([(3, 16), (2, 24)]):  # other shapes than at capture
        batch = _batch(b, t, seed + 1)
        ref = copy.deepcopy(model)
        torch.manual_seed(seed)
        fp32 = ref(**batch)
        fp32.loss.backward()
        torch.manual_seed(seed)
        loss = amp(**batch)
        loss.backward()
        assert loss.dtype == torch.float32 and loss.dim() == 0
        auto = copy.deepcopy(model)
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=dtype):
            auto_loss = auto(**batch).loss
        auto_loss.backward()  # CPU autocast: no scaler needed for a comparison of one step
        grad = lambda m: torch.cat([p.grad.flatten() for p in m.parameters()])  # noqa: E731
        errors["amp"].append((abs(float(loss / fp32.loss) - 1), _rel(grad(model), grad(ref))))
        errors["autocast"].append((abs(float(auto_loss / fp32.loss) - 1), _rel(grad(auto), grad(ref))))
        model.zero_grad()
    print(f"{build_model.__name__} {dtype}: (loss rel. error, gradient rel. error) {errors}")
    eps = torch.finfo(dtype).eps
    for (loss_err, grad_err), (auto_loss_err, auto_grad_err) in zip(errors["amp"], errors["autocast"]):
        assert loss_err <= 1.1 * auto_loss_err + 2 * eps
        assert grad_err <= 1.1 * auto_grad_err + 2 * eps


def _why_not(amp) -> str:
    assert not _fused_nodes(amp)
    (row,) = [r for r in amp.plan.meta["missed"] if r[0] == "fused_cross_entropy"]
    assert row[1] == "X1:no-match"
    return row[3]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("logits", [True, torch.float32], ids=["low", "fp32"])
def test_the_returned_logits_are_the_linear_layers_and_carry_gradients(logits, padded, monkeypatch):
    """X4 at run time: ``logits=`` returns ``F.linear(h, w, b)`` (widened to fp32 when asked),
    and a gradient through them is added to the loss's."""
    monkeypatch.setattr(runtime, "CHUNK_ELEMENTS", 4 * 300)
    if padded:
        monkeypatch.setattr(runtime, "padded_vocab", lambda w: 320)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 9, 16, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(300, 16, generator=g) / 4).bfloat16().requires_grad_()
    b = (torch.randn(300, generator=g) / 4).bfloat16().requires_grad_()
    target = torch.randint(0, 300, (2, 9), generator=g)
    loss, out = linear_cross_entropy(h, w, b, target, logits=logits)
    ref_out = F.linear(h, w, b)
    assert out.shape == ref_out.shape and out.dtype == (torch.bfloat16 if logits is True else torch.float32)
    assert torch.equal(out.float(), ref_out.float())
    grads = torch.autograd.grad(loss + out.float().square().mean(), (h, w, b))
    ref = _unfused(h, w, b, target) + ref_out.float().square().mean()
    for ours_g, ref_g in zip(grads, torch.autograd.grad(ref, (h, w, b))):
        assert _rel(ours_g, ref_g) <= 4 * torch.finfo(torch.bfloat16).eps
    with torch.no_grad():  # evaluation: the same two values
        loss2, out2 = linear_cross_entropy(h, w, b, target, logits=logits)
    assert torch.equal(out2, out.detach()) and float(loss2) == float(loss)


@pytest.mark.parametrize("build_model", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_a_model_that_returns_its_logits_has_them_computed_once_by_the_fused_loss(build_model, monkeypatch):
    """X4 + X8: ``model(**batch)`` returns ``CausalLMOutput(loss, logits)``; the fused node
    computes the logits once, in the layer's dtype, and a training graph returns them so, as
    autocast does (the unfused conversion restores fp32, rule I5); no lm_head linear is left.
    Loss, logits and gradients (also through the logits) are those of the unfused conversion."""
    batch = _batch(2, 10, 0)
    models, outs = {}, {}
    for fused in (True, False):
        monkeypatch.setattr(fce, "MIN_VOCAB", VOCAB if fused else 10 ** 9)
        models[fused] = build_model()
        amp = ac.convert(models[fused], example_kwargs=batch, dtype="bfloat16")
        if fused:
            (node,) = _fused_nodes(amp)
            assert node.kwargs["logits"] is True
            assert not [n for n in amp.graph_module.graph.nodes if getattr(n.target, "__name__", "") == "linear"
                        and "lm_head" in n.args[1].name]
            (row,) = [r for r in amp.plan.meta["rewrites"] if r[0] == "fused_cross_entropy"]
            assert row[1] == "X3:fused" and "returned in that dtype, as autocast returns them" in row[3]
        torch.manual_seed(0)  # the same dropout masks in both
        outs[fused] = out = amp(**_batch(3, 14, 1))  # other shapes than at capture
        (out.loss + out.logits.float().square().mean()).backward()
    assert outs[True].logits.dtype == torch.bfloat16 and outs[False].logits.dtype == torch.float32
    assert outs[True].logits.shape == (3, 14, VOCAB)
    # the unfused logits are the same bf16 values widened
    assert torch.equal(outs[True].logits.float(), outs[False].logits)
    assert abs(float(outs[True].loss / outs[False].loss) - 1) <= 1e-5
    for (name, p), q in zip(models[True].named_parameters(), models[False].parameters()):
        assert _rel(p.grad, q.grad) <= 8 * torch.finfo(torch.bfloat16).eps, name


def test_x8_inference_graphs_keep_fp32_logits_and_training_graphs_return_them_low():
    """X8 only in training: an eval conversion returns the model's dtype (I5); a training
    conversion returns the layer's dtype also where the model widens its logits itself
    before returning them (in the captured fp32 graph that cast is the loss's no-op too)."""
    batch = _batch(2, 10, 0)
    amp = ac.convert(_gpt2().eval(), example_kwargs=batch, dtype="bfloat16", training=False)
    (node,) = _fused_nodes(amp)
    assert node.kwargs["logits"] is torch.float32
    with torch.no_grad():
        assert amp(**batch).logits.dtype == torch.float32

    class Widening(nn.Module):  # the logits.float() of older transformers releases
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB, bias=False)

        def forward(self, x, y):
            logits = self.head(self.emb(x)).float()
            return F.cross_entropy(logits.view(-1, VOCAB), y.view(-1)), logits

    x = torch.randint(0, VOCAB, (2, 6))
    model = Widening().train()
    ref_loss, ref_logits = model(x, x)
    amp = ac.convert(model, (x, x), dtype="bfloat16")
    (node,) = _fused_nodes(amp)
    loss, logits = amp(x, x)
    assert node.kwargs["logits"] is True and logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and abs(float(loss / ref_loss) - 1) < 1e-2
    assert _rel(logits.float(), ref_logits) <= torch.finfo(torch.bfloat16).eps
    with torch.no_grad():
        amp.eval()
        assert amp(x, x)[1].dtype == torch.float32


def test_what_is_not_fused_says_why():
    small = ac.convert(LossOnly(_gpt2(vocab=512)), example_kwargs=_batch(1, 8, 0, vocab=512),
                       dtype="bfloat16")
    assert "512 classes" in _why_not(small)

    class Weighted(nn.Module):
        def __init__(self, reduction="mean", weighted=False, sliced=False):
            super().__init__()
            self.head = nn.Linear(16, VOCAB)
            self.weight = torch.ones(VOCAB) if weighted else None
            self.reduction, self.sliced = reduction, sliced

        def forward(self, h, y):
            logits = self.head(h).float()
            if self.sliced:
                logits, y = logits[:, :-1], y[:, 1:]
            return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), weight=self.weight,
                                   reduction=self.reduction).sum()

    h, y = torch.randn(2, 6, 16), torch.randint(0, VOCAB, (2, 6))
    for module, why in [(Weighted(weighted=True), "class weights"),
                        (Weighted(reduction="none"), "reduction='none'"),
                        (Weighted(sliced=True), "slices the logits")]:
        amp = ac.convert(module.train(), (h, y), dtype="bfloat16")
        assert why in _why_not(amp)
    assert _fused_nodes(ac.convert(Weighted().train(), (h, y), dtype="bfloat16"))


def test_a_linear_only_the_loss_reads_is_dropped():
    """X4: our reference GPT returns only the loss: its head's linear and the fp32 logits go."""
    model, ex = build("gpt", "tiny", with_targets=True, vocab_size=VOCAB)
    amp = ac.convert(model.train(), ex, dtype="bfloat16")
    assert _fused_nodes(amp)
    heads = [n for n in amp.graph_module.graph.nodes
             if getattr(n.target, "__name__", "") == "linear" and n.args[1].name.startswith("lm_head")]
    assert heads == []
    ref = copy.deepcopy(model)
    loss, ref_loss = amp(*ex), ref(*ex)
    loss.backward()
    ref_loss.backward()
    assert abs(float(loss / ref_loss) - 1) < 1e-2
    assert _rel(model.lm_head.weight.grad, ref.lm_head.weight.grad) < 5e-2


def test_inference_conversion_fuses_the_loss_too():
    model = LossOnly(_gpt2()).eval()
    batch = _batch(2, 12, 3)
    amp = ac.convert(model, example_kwargs=batch, dtype="bfloat16", training=False)
    assert _fused_nodes(amp)
    with torch.no_grad():
        loss, ref = amp(**batch), model(**batch)
    assert abs(float(loss / ref) - 1) < 1e-2


def test_under_torch_compile_the_unfused_expression_is_traced(monkeypatch):
    """X6: no chunk loop inside a compiled graph; the compiled module gives the same loss."""
    model = LossOnly(_gpt2()).eval()
    batch = _batch(2, 12, 3)
    amp = ac.convert(model, example_kwargs=batch, dtype="bfloat16", training=False)
    calls = []
    original = runtime._chunked_cross_entropy
    monkeypatch.setattr(runtime, "_chunked_cross_entropy", lambda *a: calls.append(1) or original(*a))
    compiled = torch.compile(amp, backend="eager", dynamic=False)
    with torch.no_grad():
        eager, traced = amp(**batch), compiled(**batch)
    assert len(calls) == 1  # the eager call only
    assert abs(float(traced / eager) - 1) < 1e-2
