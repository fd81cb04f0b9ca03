"""Tests for the reference models registry (``amp_compiler.models``) and its data helpers.

Everything here runs on the ``"tiny"`` presets and must stay fast on a 2-core
CPU; the bench-size build check is marked ``slow``.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.fx as fx
from torch import nn

from amp_compiler import models
from amp_compiler.models import NAMES, UnknownModelError, build, describe
from amp_compiler.models.data import batches, digits, token_stream

FX_NAMES = [n for n in NAMES if n != "gpt"]
# Name of the optional loss argument of each model's forward.
LOSS_ARG = {"bert": "labels", "mf": "labels"}


class LeafRNNTracer(fx.Tracer):
    """Traces through every module except recurrent ones, as the AMP front end does."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.LSTM, nn.GRU, nn.RNN))


def _trace(model: nn.Module, name: str, logits_branch: bool = True) -> fx.GraphModule:
    concrete = {LOSS_ARG.get(name, "targets"): None} if logits_branch else None
    graph = LeafRNNTracer().trace(model, concrete_args=concrete)
    return fx.GraphModule(model, graph)


@pytest.fixture(scope="module")
def tiny() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    return {n: build(n, "tiny") for n in NAMES}


@pytest.fixture(scope="module")
def tiny_with_targets() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    return {n: build(n, "tiny", with_targets=True) for n in NAMES}


# ---------------------------------------------------------------- registry


def test_names_and_descriptions() -> None:
    assert NAMES == ("mlp", "mlp_wide", "resnet", "gpt", "bert", "lstm", "mf")
    for n in NAMES:
        d = describe(n)
        assert isinstance(d, str) and d and "\n" not in d


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        build("vgg16")
    assert isinstance(info.value, KeyError)
    for n in NAMES:
        assert n in str(info.value)
    with pytest.raises(KeyError):
        describe("nope")


def test_bad_size_and_bad_config() -> None:
    with pytest.raises(ValueError, match="tiny"):
        build("mlp", "huge")
    with pytest.raises(TypeError):
        build("gpt", "tiny", n_layers=3)  # typo of n_layer


def test_build_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    build("mlp", seed=123)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------- models

EXPECTED_OUT = {
    "mlp": (8, 10),
    "mlp_wide": (8, 10),
    "resnet": (4, 10),
    "gpt": (2, 32, 256),
    "bert": (2, 2),
    "lstm": (4, 10),
    "mf": (8,),
}


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_finite(name: str, tiny) -> None:
    model, inputs = tiny[name]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out = model(*inputs)
    assert tuple(out.shape) == EXPECTED_OUT[name]
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_in_seed(name: str, tiny) -> None:
    m1, in1 = tiny[name]
    m2, in2 = build(name, "tiny")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    # Skip BatchNorm running stats: other tests' forwards in train mode update them.
    keys = [k for k in s1 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(s1[k], s2[k]) for k in keys)
    assert all(torch.equal(a, b) for a, b in zip(in1, in2))
    torch.testing.assert_close(m1(*in1), m2(*in2), rtol=0, atol=0)

    m3, in3 = build(name, "tiny", seed=1)
    assert any(not torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(in1, in3))


@pytest.mark.parametrize("name", NAMES)
def test_loss_path_is_scalar_and_differentiable(name: str, tiny_with_targets) -> None:
    model, inputs = tiny_with_targets[name]
    assert len(inputs) == len(build(name)[1]) + 1
    loss = model(*inputs)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", FX_NAMES)
def test_fx_traces_through_everything_but_rnns(name: str, tiny, tiny_with_targets) -> None:
    model, inputs = tiny[name]
    gm = _trace(model, name)
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert all(isinstance(gm.get_submodule(t), nn.LSTM) for t in leaves), leaves
    torch.testing.assert_close(gm(*inputs), model(*inputs))

    # Without concrete_args the loss argument is a placeholder, so the graph is the loss branch.
    model_t, inputs_t = tiny_with_targets[name]
    gm_loss = _trace(model_t, name, logits_branch=False)
    torch.testing.assert_close(gm_loss(*inputs_t), model_t(*inputs_t))


def test_fx_default_symbolic_trace_works_too(tiny) -> None:
    for name in FX_NAMES:
        model, inputs = tiny[name]
        gm = fx.symbolic_trace(model, concrete_args={LOSS_ARG.get(name, "targets"): None})
        torch.testing.assert_close(gm(*inputs), model(*inputs))


def test_gpt_is_not_fx_traceable(tiny) -> None:
    model, _ = tiny["gpt"]
    with pytest.raises((fx.proxy.TraceError, TypeError)):
        _trace(model, "gpt")
    with pytest.raises((fx.proxy.TraceError, TypeError)):
        fx.symbolic_trace(model, concrete_args={"targets": None})


# nn.LSTM keeps its weights in a plain-list attribute that export reports as "assigned"; harmless.
@pytest.mark.filterwarnings("ignore:The tensor attributes self.lstm._flat_weights")
@pytest.mark.parametrize("name", NAMES)
def test_torch_export(name: str, tiny) -> None:
    model, inputs = tiny[name]
    ep = torch.export.export(model, inputs, strict=False)
    torch.testing.assert_close(ep.module()(*inputs), model(*inputs))


def test_torch_export_gpt_loss(tiny_with_targets) -> None:
    model, inputs = tiny_with_targets["gpt"]
    ep = torch.export.export(model, inputs, strict=False)
    torch.testing.assert_close(ep.module()(*inputs), model(*inputs))


# ---------------------------------------------------------------- presets and overrides


def test_overrides_and_batch() -> None:
    m, (idx,) = build("gpt", "tiny", n_layer=1, batch=3, seq_len=8)
    assert len(m.transformer.h) == 1 and idx.shape == (3, 8)
    assert m(idx).shape == (3, 8, 256)
    m, (x,) = build("resnet", "tiny", image_size=48, num_classes=7)
    assert m(x).shape == (4, 7) and x.shape[-1] == 48
    m, (ids, mask) = build("bert", "tiny", num_labels=5, seq_len=8)
    assert m(ids, mask).shape == (2, 5)
    m, (x,) = build("mlp", hidden=(32, 16))
    assert m(x).shape == (8, 10)


def test_gpt_sdpa_matches_explicit() -> None:
    m_exp, (idx,) = build("gpt", "tiny")
    m_sdpa, _ = build("gpt", "tiny", attention="sdpa")
    torch.testing.assert_close(m_sdpa(idx), m_exp(idx), rtol=1e-4, atol=1e-5)


def test_gpt_lm_head_is_tied(tiny) -> None:
    model, _ = tiny["gpt"]
    assert model.lm_head.weight is model.transformer.wte.weight


def test_bert_padding_mask_is_used(tiny) -> None:
    model, (ids, mask) = tiny["bert"]
    assert mask[0].all() and (mask[1, -4:] == 0).all() and mask[1, :-4].all()
    # Changing padded tokens must not change the prediction for that sequence.
    ids2 = ids.clone()
    ids2[1, -4:] = 7
    torch.testing.assert_close(model(ids2, mask)[1], model(ids, mask)[1], rtol=1e-4, atol=1e-5)


def test_resnet_bench_is_resnet18() -> None:
    m, _ = build("resnet", "bench", batch=1)
    assert sum(p.numel() for p in m.parameters()) == 11_689_512


def test_bench_presets() -> None:
    assert models.gpt.SIZES["bench"] == {
        "vocab_size": 8192,
        "block_size": 1024,
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "batch": 8,
    }
    assert models.mlp.SIZES["mlp_wide"]["bench"]["hidden"] == (4096, 4096)
    assert models.mlp.SIZES["mlp_wide"]["bench"]["batch"] == 4096
    assert models.resnet.SIZES["bench"]["batch"] == 128
    assert models.resnet.SIZES["bench"]["image_size"] == 224


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bench_builds(name: str) -> None:
    model, inputs = build(name, "bench")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert all(t.device.type == "cpu" for t in inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_build_matches_cpu(name: str) -> None:
    m_cpu, in_cpu = build(name)
    m_gpu, in_gpu = build(name, device="cuda")
    assert all(t.is_cuda for t in in_gpu) and all(p.is_cuda for p in m_gpu.parameters())
    for p, q in zip(m_cpu.parameters(), m_gpu.parameters()):
        assert torch.equal(p, q.cpu())
    torch.testing.assert_close(m_gpu(*in_gpu).cpu(), m_cpu(*in_cpu), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- data


def test_digits() -> None:
    pytest.importorskip("sklearn")
    x_tr, y_tr, x_te, y_te = digits()
    assert x_tr.shape[1] == x_te.shape[1] == 784
    assert x_tr.shape[0] + x_te.shape[0] == 1797
    assert x_tr.dtype == x_te.dtype == torch.float32
    assert y_tr.dtype == y_te.dtype == torch.int64
    assert abs(x_te.shape[0] / 1797 - 0.25) < 0.01
    assert abs(float(x_tr.mean())) < 1e-4 and abs(float(x_tr.std()) - 1.0) < 1e-4
    assert torch.isfinite(x_te).all()

    # Stratified: every class is split in the same proportion.
    n_tr, n_te = Counter(y_tr.tolist()), Counter(y_te.tolist())
    assert set(n_tr) == set(n_te) == set(range(10))
    for c in range(10):
        assert abs(n_te[c] - 0.25 * (n_tr[c] + n_te[c])) <= 1

    again = digits()
    assert all(torch.equal(a, b) for a, b in zip((x_tr, y_tr, x_te, y_te), again))
    other = digits(split_seed=1)
    assert not torch.equal(other[1], y_tr)


def test_token_stream() -> None:
    s = token_stream(50_000, 32, seed=0)
    assert s.shape == (50_000,) and s.dtype == torch.int64
    assert int(s.min()) >= 0 and int(s.max()) < 32
    assert torch.equal(s, token_stream(50_000, 32, seed=0))
    assert not torch.equal(s, token_stream(50_000, 32, seed=1))

    # Learnable structure: the empirical order-2 conditional entropy is far below uniform.
    ctx = Counter(zip(s[:-2].tolist(), s[1:-1].tolist()))
    tri = Counter(zip(s[:-2].tolist(), s[1:-1].tolist(), s[2:].tolist()))
    n = s.numel() - 2
    h = -sum(c / n * math.log(c / ctx[(a, b)]) for (a, b, _), c in tri.items())
    assert h < 0.6 * math.log(32)


def test_batches() -> None:
    s = token_stream(2_000, 50)
    got = list(batches(s, batch=4, block=16, steps=5, seed=3))
    assert len(got) == 5
    for idx, tgt in got:
        assert idx.shape == tgt.shape == (4, 16) and idx.dtype == torch.int64
        assert torch.equal(idx[:, 1:], tgt[:, :-1])
    again = list(batches(s, batch=4, block=16, steps=5, seed=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, again))
