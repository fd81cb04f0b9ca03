"""Tests for amp_compiler/dynamo.py: the TorchDynamo front end.

``amp_compiler.backend(dtype=...)`` as a ``torch.compile`` backend (every captured graph planned
and rewritten, graph breaks eager); ``convert(..., capture="dynamo")`` returning a
``DynamoAmpModule``; the default ``capture="auto"`` falling back to dynamo, with a logged
warning, when torch.export refuses data-dependent control flow (``capture="export"`` keeps
raising). The DynamoAmpModule never changes the user's model (training flags restored after
every call, even a failing one; parameters shared, not copied), has no plan before its first
call and a merged one (``g<i>.<node>``) after, prints a report, and in fp16 training carries a
LossScaler used as GradScaler is used (bf16: none).

The real model is a tiny Hugging Face DeBERTa-v2 classifier trained with labels: its loss
branches on the labels (``if label_index.size(0) > 0``), which torch.export cannot capture.

    python -m pytest -q tests/test_dynamo.py --durations=10
"""

from __future__ import annotations

import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amp_compiler as ac
from amp_compiler.dynamo import DynamoAmpModule
from amp_compiler.errors import TraceError
from conftest import EPS, assert_unchanged, autocast_error_or_skip, rel_err, snapshot

DTYPES = (torch.float16, torch.bfloat16)
C = 16
# gradients against fp32's: a few roundings to the low dtype per layer on a two-layer network;
# the bound of conftest's fp32 comparison (FP32_BOUND_EPS)
GRAD_BOUND_EPS = 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Net(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(C, 2 * C), nn.Linear(2 * C, 4)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


class Branchy(Net):
    """Data-dependent control flow on the labels: torch.export refuses it, dynamo breaks the
    graph there (logits in one graph, the loss in another)."""

    def forward(self, x, labels=None):
        logits = super().forward(x)
        if labels is not None and (labels >= 0).sum() > 0:
            return F.cross_entropy(logits, labels)
        return logits


def _data(b: int = 8, seed: int = 0):
    return torch.randn(b, C, generator=_g(seed)), torch.randint(0, 4, (b,), generator=_g(seed + 1))


def _render(table) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=400)
    console.print(table)
    return console.file.getvalue()


# -- the backend ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_plans_and_rewrites_the_captured_graph(dtype):
    torch.manual_seed(0)
    model = Net().eval()
    be = ac.backend(dtype=dtype)
    compiled = torch.compile(model, backend=be)
    x = _data(8, 1)[0]
    with torch.no_grad():
        ref, out = model(x), compiled(x)
    assert len(be.graphs) == 1
    plan = be.plan
    assert all(name.startswith("g0.") for name in plan)
    linears = [n for n, d in plan.items() if d.kind == "linear"]
    assert len(linears) == 2 and all(plan[n].precision == dtype for n in linears)
    gm = be.graphs[0].graph_module
    assert [n for n in gm.graph.nodes if n.meta.get("amp_cast")], "no casts in the compiled graph"
    assert out.dtype == torch.float32
    ours = rel_err(out, ref)
    theirs = autocast_error_or_skip(ours, lambda: model(x), dtype, ref)
    assert ours <= max(1.1 * theirs, 2 * EPS[dtype]), (ours, theirs)


def test_backend_graph_break_two_graphs_merged_plan():
    torch.manual_seed(0)
    model = Branchy().eval()
    be = ac.backend(dtype=torch.bfloat16)
    compiled = torch.compile(model, backend=be)
    x, y = _data()
    with torch.no_grad():
        loss = compiled(x, y)
        ref = model(x, y)
    assert len(be.graphs) >= 2
    prefixes = {name.split(".", 1)[0] for name in be.plan}
    assert prefixes == {f"g{i}" for i in range(len(be.graphs))}
    assert sum(len(g.plan) for g in be.graphs) == len(be.plan)  # nothing lost in the merge
    kinds = {d.kind: d.precision for d in be.plan.values()}
    assert kinds["linear"] == torch.bfloat16 and kinds["cross_entropy"] == torch.float32
    assert rel_err(loss, ref) <= 4 * EPS[torch.bfloat16]


# -- convert(capture=...) -----------------------------------------------------------------------

def test_capture_dynamo_plan_only_after_the_first_call():
    torch.manual_seed(0)
    model = Net().eval()
    amp = ac.convert(model, capture="dynamo", dtype=torch.bfloat16)
    assert isinstance(amp, DynamoAmpModule)
    with pytest.raises(ac.AmpCompilerError, match="call the model once"):
        amp.plan
    x = _data()[0]
    with torch.no_grad():
        ref, out = model(x), amp(x)
    assert rel_err(out, ref) <= 4 * EPS[torch.bfloat16]
    assert amp.plan and all(name.startswith("g0.") for name in amp.plan)
    assert amp.cast_count() > 0
    text = _render(amp.report(print_=False))
    assert "g0." in text and "linear" in text
    why = _render(amp.report(why=next(n for n, d in amp.plan.items() if d.kind == "linear"), print_=False))
    assert "R1" in why


def test_auto_falls_back_to_dynamo_with_a_warning_export_keeps_raising(caplog):
    torch.manual_seed(0)
    model = Branchy().eval()
    x, y = _data()
    with pytest.raises(TraceError, match="capture='dynamo'"):
        ac.convert(model, (x, y), capture="export", dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="amp_compiler"):
        amp = ac.convert(model, (x, y), dtype=torch.bfloat16)
    assert isinstance(amp, DynamoAmpModule)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "TorchDynamo" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    with torch.no_grad():
        assert rel_err(amp(x, y), model(x, y)) <= 4 * EPS[torch.bfloat16]
    # a model export can capture is not sent to dynamo
    assert not isinstance(ac.convert(Net().eval(), (x,), dtype=torch.bfloat16), DynamoAmpModule)


# -- the user's model is never changed --------------------------------------------------------

def test_training_flags_restored_after_each_call_even_a_failing_one():
    torch.manual_seed(0)
    model = Net(p=0.5).eval()
    snap = snapshot(model)
    amp = ac.convert(model, capture="dynamo", dtype=torch.bfloat16, training=True)
    assert amp.training
    x = _data()[0]
    torch.manual_seed(1)
    a = amp(x)
    torch.manual_seed(2)
    b = amp(x)
    assert not torch.equal(a, b), "dropout was off: the call did not run in train mode"
    assert_unchanged(model, snap)  # flags back to eval, parameters and buffers untouched
    with pytest.raises(Exception):
        amp(torch.randn(8, C + 1))
    assert_unchanged(model, snap)
    amp.eval()
    assert not amp.training
    with torch.no_grad():
        assert torch.equal(amp(x), amp(x)), "eval mode: dropout should be off"
    assert_unchanged(model, snap)


def test_parameters_shared_not_copied():
    torch.manual_seed(0)
    model = Net().train()
    amp = ac.convert(model, capture="dynamo", dtype=torch.bfloat16, training=True)
    assert {id(p) for p in amp.parameters()} == {id(p) for p in model.parameters()}
    x, y = _data()
    F.cross_entropy(amp(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_state_dict_has_the_user_models_keys():
    """DESIGN: ``amp.state_dict()`` has the user model's keys (a checkpoint of the converted
    model loads into the model and back)."""
    model = Net().eval()
    amp = ac.convert(model, capture="dynamo", dtype=torch.bfloat16)
    assert list(amp.state_dict()) == list(model.state_dict())


# -- loss scaling ----------------------------------------------------------------------------------

def test_fp16_training_scaler_is_used_as_gradscaler():
    torch.manual_seed(0)
    model = Net().train()
    ref_model = Net().train()
    ref_model.load_state_dict(model.state_dict())
    amp = ac.convert(model, capture="dynamo", dtype=torch.float16, training=True)
    scaler = amp.scaler
    assert isinstance(scaler, ac.LossScaler) and isinstance(scaler, torch.amp.GradScaler)
    x, y = _data(16, 3)
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    # fp32 gradients of the same loss
    F.cross_entropy(ref_model(x), y).backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}

    scale = scaler.get_scale()
    scaler.scale(F.cross_entropy(amp(x), y)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    for n, g in grads.items():  # scaled as GradScaler scales them, and close to fp32's once unscaled
        assert rel_err(g / scale, ref_grads[n]) <= GRAD_BOUND_EPS * EPS[torch.float16], n
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(opt)
    scaler.update()
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n] - lr * grads[n] / scale, rtol=1e-5, atol=1e-7), n
    assert scaler.get_scale() == scale  # no overflow: the scale stays (growth after 2000 steps)

    # an overflowing step is skipped and the scale halves
    opt.zero_grad()
    scaler.scale(F.cross_entropy(amp(x), y)).backward()
    model.a.weight.grad[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert scaler.get_scale() == scale / 2


def test_no_scaler_for_bf16_or_inference():
    assert ac.convert(Net().train(), capture="dynamo", dtype=torch.bfloat16, training=True).scaler is None
    assert ac.convert(Net().eval(), capture="dynamo", dtype=torch.float16, training=False).scaler is None
    assert ac.convert(Net().train(), capture="dynamo", dtype=torch.float16, training=True,
                      loss_scale=None).scaler is None


# -- a real model ------------------------------------------------------------------------------------

def _deberta():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # DeBERTa-v3's settings (relative attention, both disentangled terms); dropout off so that
    # fp32, autocast and the converted model see the same function
    cfg = tr.DebertaV2Config(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=64,
                             relative_attention=True, position_buckets=16,
                             pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                             share_att_key=True, position_biased_input=False,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tr.DebertaV2ForSequenceClassification(cfg)


def _classifier_batch(b: int, t: int, seed: int) -> dict:
    ids = torch.randint(3, 96, (b, t), generator=_g(seed))
    mask = (torch.arange(t)[None, :] < (t - torch.arange(b) % 3)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
            "labels": torch.randint(0, 2, (b,), generator=_g(seed + 1))}


def test_deberta_v2_with_labels_trains_in_fp16_through_the_fallback_dropout_off(caplog):
    """Dropout off (``_deberta``): gradients compared element-wise with fp32's need one function;
    tests/test_hf_models.py trains DeBERTa-v2 through the same fallback with its default dropout."""
    model = _deberta().eval()          # converted for training: the flags must come back to eval
    snap = snapshot(model)
    batch = _classifier_batch(2, 8, 0)
    with caplog.at_level(logging.WARNING, logger="amp_compiler"):
        amp = ac.convert(model, example_kwargs=batch, dtype=torch.float16, training=True)
    assert isinstance(amp, DynamoAmpModule)
    assert any("TorchDynamo" in r.getMessage() for r in caplog.records)
    with pytest.raises(ac.AmpCompilerError):
        amp.plan
    assert_unchanged(model, snap)

    batch = _classifier_batch(3, 10, 1)
    ref = model(**batch)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    out = amp(**batch)
    assert type(out) is type(ref)
    ours = rel_err(out.loss, ref.loss)
    theirs = autocast_error_or_skip(ours, lambda: model(**batch).loss, torch.float16, ref.loss.detach())
    assert ours <= max(1.1 * theirs, 2 * EPS[torch.float16]), (ours, theirs)
    scale = amp.scaler.get_scale()
    amp.scaler.scale(out.loss).backward()
    errs = {n: rel_err(p.grad / scale, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads}
    assert max(errs.values()) <= GRAD_BOUND_EPS * EPS[torch.float16], max(errs.items(), key=lambda kv: kv[1])
    assert all(not m.training for m in model.modules())

    plan = amp.plan
    assert len(amp.graphs) >= 2, "the label branch should break the graph"
    assert {n.split(".", 1)[0] for n in plan} == {f"g{i}" for i in range(len(amp.graphs))}
    assert any(d.kind == "linear" and d.precision == torch.float16 for d in plan.values())
    model.zero_grad(set_to_none=True)


def _wav2vec2():
    transformers = pytest.importorskip("transformers", reason="needs `pip install transformers`")
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 4),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    return transformers.Wav2Vec2ForCTC(cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_wav2vec2_ctc_with_labels_through_the_fallback(dtype):
    """CTC's `labels.max() >= vocab_size` check stops torch.export; dynamo captures around it.
    Eval mode (the CTC loss and the logits, against fp32 and autocast), then a training step
    whose loss is finite (train mode masks time steps at random: SpecAugment, the default)."""
    model = _wav2vec2().eval()
    g = torch.Generator().manual_seed(3)
    batch = {"input_values": torch.randn(2, 4000, generator=g),
             "labels": torch.randint(1, 32, (2, 10), generator=g)}
    amp = ac.convert(model, example_kwargs=batch, dtype=dtype)
    assert isinstance(amp, DynamoAmpModule)
    other = {"input_values": torch.randn(3, 5000, generator=g),
             "labels": torch.randint(1, 32, (3, 12), generator=g)}  # another batch and length
    with torch.no_grad():
        ref, out = model(**other), amp(**other)
    ours = rel_err(out.logits, ref.logits)
    theirs = autocast_error_or_skip(ours, lambda: model(**other).logits, dtype, ref.logits)
    assert ours <= max(1.1 * theirs, 2 * EPS[dtype]), (ours, theirs)
    assert rel_err(out.loss, ref.loss) <= max(1.1 * theirs, 2 * EPS[dtype])
    assert any(d.kind == "conv" and d.precision == dtype for d in amp.plan.values())

    tamp = ac.convert(model, example_kwargs=batch, dtype=dtype, training=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays as it was
    # CTC sums over time: fp16's first scale (2**16) overflows, GradScaler-style skips halve it
    for _ in range(24):
        opt.zero_grad(set_to_none=True)
        loss = tamp(**batch).loss
        assert torch.isfinite(loss)
        if tamp.scaler is None:
            loss.backward()
            break
        tamp.scaler.scale(loss).backward()
        tamp.scaler.unscale_(opt)
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        tamp.scaler.step(opt)
        tamp.scaler.update()
        if finite:
            break
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not model.training
