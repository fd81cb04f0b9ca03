"""size_cache pass (rules K1-K3): what a converted graph computes from its inputs' sizes alone
runs once per input shape. Hugging Face models from default configs, called as users call
them, at other shapes than at capture; against eager (aten ops a forward) and against the
same conversion without the cache (outputs, bit for bit)."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers as T
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import amp_compiler as ac
from amp_compiler.passes import size_cache
from amp_compiler.passes.infra import PassResult
from amp_compiler.passes.size_cache import SizeCache

SMALL = dict(vocab_size=128, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
             intermediate_size=64)
MODELS = {"gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_layer=2, n_embd=32, n_head=2)),
          "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **SMALL)),
          "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**SMALL))}
# what each family computes from sizes and buffers alone
CACHED = {"gpt2": {"arange", "unsqueeze"}, "llama": {"arange", "cos", "sin", "cat"},
          "bert": {"expand", "slice"}}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.casts = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.casts += func.overloadpacket.__name__ == "_to_copy"
        return func(*args, **(kwargs or {}))


def _ids(shape, seed=1):
    return {"input_ids": torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))}


def _without_cache(monkeypatch):
    monkeypatch.setattr(sys.modules["amp_compiler.convert"], "cache_size_only", lambda gm: PassResult(gm, False))


@pytest.mark.parametrize("family", list(MODELS))
def test_size_only_ops_run_once_per_shape_and_change_no_bit(family, monkeypatch):
    torch.manual_seed(0)
    model = MODELS[family]().eval()
    amp = ac.convert(model, example_kwargs=_ids((1, 16), 0), dtype="bfloat16", training=False)
    (row,) = [r for r in amp.plan.meta["rewrites"] if r[0] == "size_cache"]
    assert row[1] == "K2:cached" and all(k in row[3] for k in CACHED[family])
    assert amp.op_count()["per_shape"] >= 3
    _without_cache(monkeypatch)
    plain = ac.convert(model, example_kwargs=_ids((1, 16), 0), dtype="bfloat16", training=False)
    assert plain.op_count()["per_shape"] == 0
    for shape, seen in [((1, 16), False), ((2, 24), False), ((1, 16), True)]:
        batch = _ids(shape)
        with torch.no_grad():
            with Count() as eager:
                model(**batch)
            with Count() as first:
                out = amp(**batch)
            with Count() as again:
                out_again = amp(**batch)
            ref = plain(**batch)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out_again.logits, ref.logits)
        # a new shape computes the size-only ops, a shape seen before takes them from the cache
        assert (first.ops == again.ops) if seen else (again.ops < first.ops)
        # beside its casts, a forward from the cache runs fewer aten ops than eager's
        assert again.ops - again.casts < eager.ops - eager.casts
    (cache,) = [m for m in amp.graph_module.modules() if isinstance(m, SizeCache)]
    assert len(cache._cache) == 2  # two shapes seen


def test_training_gradients_are_the_same_bits_with_the_cache(monkeypatch):
    grads = []
    for cached in (True, False):
        if not cached:
            _without_cache(monkeypatch)
        torch.manual_seed(0)
        model = MODELS["llama"]().train()
        batch = {**_ids((2, 12), 0), "labels": _ids((2, 12), 0)["input_ids"]}
        amp = ac.convert(model, example_kwargs=batch, dtype="bfloat16")
        assert any(r[0] == "size_cache" for r in amp.plan.meta["rewrites"]) == cached
        for seed in (1, 2):
            batch = {**_ids((3, 10), seed), "labels": _ids((3, 10), seed)["input_ids"]}
            torch.manual_seed(seed)
            amp(**batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


class AutocastOffPhases(nn.Module):
    """Rotary-style phases written under ``torch.autocast(enabled=False)``, as HF writes them:
    torch.export keeps that region as a ``wrap_with_autocast`` higher-order op with a body."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freq", torch.arange(1.0, 5.0))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            # the .to()s leave dtype asserts in the body (hygiene H8 removes them)
            pos = torch.arange(x.shape[1], device=x.device).to(torch.float32)
            phases = (pos[:, None] * self.freq[None].float()).cos()
        return self.lin(x * phases.to(x.dtype))


def test_a_higher_order_op_body_of_pure_ops_is_cached_with_the_ops_around_it(monkeypatch):
    model = AutocastOffPhases().eval()
    example = (torch.randn(2, 5, 4),)
    amp = ac.convert(model, example, dtype="bfloat16", training=False)
    (row,) = [r for r in amp.plan.meta["rewrites"] if r[0] == "size_cache"]
    assert "cos" in row[3] and "arange" in row[3]  # the ops of the body
    (cache,) = [m for m in amp.graph_module.modules() if isinstance(m, SizeCache)]
    assert any(str(n.target).endswith("wrap_with_autocast") for n in cache.fn.graph.nodes)
    _without_cache(monkeypatch)
    plain = ac.convert(model, example, dtype="bfloat16", training=False)
    for n in (5, 9, 5):
        x = torch.randn(2, n, 4)
        with torch.no_grad():
            assert torch.equal(amp(x), plain(x))
    assert len(cache._cache) == 2


class Phases(nn.Module):
    """Positions times a frequency buffer, as rotary embeddings compute them."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freq", torch.tensor([1.0, 0.5, 0.25, 0.125]))
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        pos = torch.arange(x.shape[1], dtype=torch.float32)
        phases = (pos[:, None] * self.freq[None, :]).cos()
        return self.proj(x) + phases


def test_a_buffer_written_in_place_is_read_afresh_and_the_cache_is_capped():
    model = Phases()
    amp = ac.convert(model, (torch.randn(2, 8, 4),), dtype="bfloat16", training=False)
    (cache,) = [m for m in amp.graph_module.modules() if isinstance(m, SizeCache)]
    x = torch.randn(2, 8, 4)
    with torch.no_grad():
        before = amp(x)
        model.freq.mul_(3.0)  # in place: the version counter moves
        after = amp(x)
        ref = model(x)
    assert not torch.equal(before, after)
    assert torch.allclose(after, ref, atol=3e-2, rtol=3e-2)
    with torch.no_grad():
        for n in range(2, 2 + 2 * size_cache.CAPACITY):
            amp(torch.randn(1, n, 4))
    assert len(cache._cache) == size_cache.CAPACITY


class ReturnsPositions(nn.Module):
    def __init__(self, view: bool) -> None:
        super().__init__()
        self.view = view

    def forward(self, x):
        pos = torch.arange(x.shape[1]).unsqueeze(0).unsqueeze(-1)
        return x * 2, pos.expand(x.shape[0], -1, 1).squeeze(-1) if self.view else pos.squeeze(-1) + 1


@pytest.mark.parametrize("view", [False, True], ids=["new-tensor", "view"])
def test_a_value_the_graph_returns_is_not_cached_nor_a_view_of_one(view):
    """K3: the caller may write into what it gets back; a cached tensor, or a view of one,
    would carry that into the next call. What the returned value is computed from is cached
    when the returned value is a new tensor."""
    amp = ac.convert(ReturnsPositions(view), (torch.randn(2, 5),), dtype="bfloat16", training=False)
    rows = [r for r in amp.plan.meta["rewrites"] if r[0] == "size_cache"]
    assert bool(rows) != view
    for _ in range(2):
        _, pos = amp(torch.randn(2, 5))
        assert int(pos[0, -1]) == (4 if view else 5)
        if not view:
            pos.zero_()


def test_under_torch_compile_the_subgraph_is_computed_not_looked_up():
    model = Phases()
    amp = ac.convert(model, (torch.randn(2, 8, 4),), dtype="bfloat16", training=False)
    (cache,) = [m for m in amp.graph_module.modules() if isinstance(m, SizeCache)]
    compiled = torch.compile(amp, backend="eager", dynamic=False)
    x = torch.randn(2, 8, 4)
    with torch.no_grad():
        out = compiled(x)
    assert not cache._cache
    with torch.no_grad():
        assert torch.equal(out, amp(x))


def test_report_says_ops_a_forward():
    amp = ac.convert(MODELS["llama"]().eval(), example_kwargs=_ids((1, 16), 0), dtype="bfloat16",
                     training=False)
    counts = amp.op_count()
    caption = amp.report(print_=False).caption
    assert f"{counts['per_call']} ops a forward (+{counts['per_shape']} once per input shape)" in caption


def test_a_new_tensor_at_a_freed_tensors_id_is_not_a_hit():
    """The key holds a buffer's id and version; the entry holds a weak reference to it, so a
    new tensor that reuses a freed one's id and version (both 0) is computed afresh."""
    model = Phases()
    amp = ac.convert(model, (torch.randn(2, 8, 4),), dtype="bfloat16", training=False)
    (cache,) = [m for m in amp.graph_module.modules() if isinstance(m, SizeCache)]
    ones = torch.ones(4)
    with torch.no_grad():
        first = cache(8, ones)
        (key,) = cache._cache
        del ones  # freed: the weak reference dies
        twice = torch.full((4,), 2.0)
        assert all(ref() is None for ref in cache._cache[key][0])
        # the same key, as a tensor allocated where the freed one was would give
        cache._cache[(key[0], ((id(twice), twice._version),))] = cache._cache.pop(key)
        second = cache(8, twice)
    assert not torch.equal(first[0], second[0])
