"""cuda_graphs (rules G1-G6 of amp_compiler/cuda_graphs.py): a converted model's inference
replayed from CUDA graphs, one per input shape.

The replays themselves need a CUDA device: those tests are skipped without one (run them on
the GPU machine: ``pytest tests/test_cuda_graphs.py``). Everything a CPU can show runs
everywhere: the arguments, the eager fallbacks and their reasons, the wrapper's surface.
Hugging Face models from default configs (default attention and dropout), called as users call
them, ``fast(**batch)``, at other shapes than at conversion."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as T
from torch import nn

import amp_compiler as ac
from amp_compiler.cuda_graphs import CudaGraphModule
from amp_compiler.passes.size_cache import CAPACITY

SMALL = dict(vocab_size=128, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
             intermediate_size=64)
MODELS = {"gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_layer=2, n_embd=32,
                                                           n_head=2)),
          "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **SMALL)),
          "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**SMALL))}
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device; this machine "
                                "has none (the GPU machine runs these)")


def _batch(family: str, shape, seed: int = 1, device="cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, 128, shape, generator=g)}
    if family == "bert":
        mask = torch.ones(shape, dtype=torch.long)
        mask[0, shape[1] // 2:] = 0  # a padded row: the mask is data, not a size
        out["attention_mask"] = mask
    return {k: v.to(device) for k, v in out.items()}


def _amp(family: str, device="cpu", dtype="bfloat16"):
    torch.manual_seed(0)
    model = MODELS[family]().eval().to(device)
    return model, ac.convert(model, example_kwargs=_batch(family, (2, 16), 0, device),
                             dtype=dtype, training=False)


# --------------------------------------------------------------------------- any machine

@pytest.mark.parametrize("kwargs, word", [({"max_shapes": 0}, "max_shapes"),
                                          ({"warmup": 0}, "warmup"),
                                          ({"max_shapes": 2.5}, "max_shapes"),
                                          ({"max_shapes": True}, "max_shapes")])
def test_bad_arguments_are_config_errors_naming_the_argument(kwargs, word):
    with pytest.raises(ac.ConfigError, match=word):
        ac.cuda_graphs(nn.Linear(2, 2), **kwargs)
    with pytest.raises(ac.ConfigError, match="module or a function"):
        ac.cuda_graphs(3)


def test_amp_cuda_graphs_wraps_the_module_and_keeps_its_parameters():
    _, amp = _amp("gpt2")
    fast = amp.cuda_graphs(max_shapes=3)
    assert isinstance(fast, CudaGraphModule) and fast.module is amp and fast.max_shapes == 3
    assert [id(p) for p in fast.parameters()] == [id(p) for p in amp.parameters()]


def test_cpu_inputs_run_eagerly_with_the_reason_logged_once(caplog):
    _, amp = _amp("gpt2")
    fast = amp.cuda_graphs()
    caplog.set_level(logging.WARNING, logger="amp_compiler.cuda_graphs")
    with torch.no_grad():
        for shape in [(1, 8), (3, 24)]:
            batch = _batch("gpt2", shape)
            assert torch.equal(fast(**batch).logits, amp(**batch).logits)
    assert fast.stats() == {"graphs": 0, "replays": 0, "eager": 2}
    said = [r.getMessage() for r in caplog.records if r.name == "amp_compiler.cuda_graphs"]
    assert said == ["cuda_graphs: eager call: the inputs are not all on one CUDA device"]


def test_a_training_module_runs_eagerly_and_keeps_its_gradients():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    fast = ac.cuda_graphs(model)
    x = torch.randn(2, 4)
    fast(x).sum().backward()  # training mode, grad enabled: the eager call, autograd intact
    assert model[0].weight.grad is not None and fast.stats()["eager"] == 1


# --------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("family", list(MODELS))
def test_replays_are_bitwise_the_eager_outputs_at_every_shape(family):
    _, amp = _amp(family, "cuda", "float16")
    fast = amp.cuda_graphs()
    with torch.inference_mode():
        for shape in [(1, 8), (4, 32), (1, 8), (4, 32)]:
            batch = _batch(family, shape, seed=shape[1], device="cuda")
            got, want = fast(**batch), amp(**batch)
            assert torch.equal(got.logits, want.logits), (family, shape)
    assert fast.stats() == {"graphs": 2, "replays": 4, "eager": 0}  # a capture runs by a replay


@needs_cuda
def test_new_inputs_of_a_known_shape_give_new_outputs_and_outputs_are_not_overwritten():
    _, amp = _amp("gpt2", "cuda", "float16")
    fast = amp.cuda_graphs()
    with torch.no_grad():
        a = fast(**_batch("gpt2", (2, 16), 1, "cuda")).logits  # captured
        b = fast(**_batch("gpt2", (2, 16), 2, "cuda")).logits  # replayed with other tokens
        assert torch.equal(b, amp(**_batch("gpt2", (2, 16), 2, "cuda")).logits)
        assert torch.equal(a, amp(**_batch("gpt2", (2, 16), 1, "cuda")).logits)  # G3: a clone


@needs_cuda
def test_without_cloning_the_graph_own_outputs_are_returned():
    _, amp = _amp("gpt2", "cuda", "float16")
    fast = amp.cuda_graphs(clone_outputs=False)
    with torch.no_grad():
        a = fast(**_batch("gpt2", (2, 16), 1, "cuda")).logits
        b = fast(**_batch("gpt2", (2, 16), 2, "cuda")).logits
    assert a.data_ptr() == b.data_ptr()


@needs_cuda
def test_weights_changed_in_place_are_read_by_the_next_replay():
    model, amp = _amp("gpt2", "cuda", "float16")
    assert amp.folded
    fast = amp.cuda_graphs()
    batch = _batch("gpt2", (2, 16), 1, "cuda")
    with torch.no_grad():
        before = fast(**batch).logits
        fast(**batch)
        for p in model.parameters():  # the fp32 originals; the folded copies refold (G5)
            p.mul_(1.5)
        after = fast(**batch).logits
        assert not torch.equal(before, after)
        assert torch.equal(after, amp(**batch).logits)
        amp.load_state_dict(MODELS["gpt2"]().state_dict())
        assert torch.equal(fast(**batch).logits, amp(**batch).logits)
    assert fast.stats()["graphs"] == 1


@needs_cuda
def test_shapes_past_the_cap_run_eagerly_and_a_move_drops_the_graphs(caplog):
    _, amp = _amp("gpt2", "cuda", "float16")
    fast = amp.cuda_graphs(max_shapes=1)
    caplog.set_level(logging.WARNING, logger="amp_compiler.cuda_graphs")
    with torch.no_grad():
        fast(**_batch("gpt2", (1, 8), 1, "cuda"))
        other = _batch("gpt2", (1, 12), 1, "cuda")
        assert torch.equal(fast(**other).logits, amp(**other).logits)
        assert fast.stats() == {"graphs": 1, "replays": 1, "eager": 1}
        assert any("max_shapes=1" in r.getMessage() for r in caplog.records)
        amp.cpu()
        amp.cuda()  # the graphs read the old tensors: dropped, captured again
        assert torch.equal(fast(**other).logits, amp(**other).logits)
        assert fast.stats()["graphs"] == 1


@needs_cuda
def test_size_cache_evictions_cannot_reach_a_captured_graph():
    # Llama's rotary phases come from the size cache (rule K2); inside a capture they are
    # computed, so evicting the cached entry of that shape cannot free what the graph reads
    _, amp = _amp("llama", "cuda", "float16")
    fast = amp.cuda_graphs()
    batch = _batch("llama", (1, 8), 1, "cuda")
    with torch.no_grad():
        fast(**batch)
        for n in range(CAPACITY + 2):  # eager calls of other shapes evict (1, 8)'s entry
            amp(**_batch("llama", (1, 9 + n), 1, "cuda"))
            torch.empty(1 << 20, device="cuda").fill_(float("nan"))  # reuse freed memory
        assert torch.equal(fast(**batch).logits, amp(**batch).logits)


@needs_cuda
def test_a_function_that_syncs_with_the_host_stays_eager_and_correct(caplog):
    lin = nn.Linear(8, 8).cuda().eval()

    def fn(x):
        y = lin(x)
        return y * float(y.abs().max())  # .item(): a host sync, which a capture refuses

    fast = ac.cuda_graphs(fn)
    caplog.set_level(logging.WARNING, logger="amp_compiler.cuda_graphs")
    x = torch.randn(4, 8, device="cuda")
    with torch.no_grad():
        assert torch.equal(fast(x), fn(x)) and torch.equal(fast(x), fn(x))
    assert fast.stats()["graphs"] == 0 and fast.stats()["eager"] == 2
    assert any("capture failed" in r.getMessage() for r in caplog.records)


@needs_cuda
def test_autocast_under_a_graph_for_the_benchmark_baseline():
    torch.manual_seed(0)
    model = MODELS["bert"]().eval().cuda()

    def autocast(**batch):
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
            return model(**batch)

    fast = ac.cuda_graphs(autocast)
    batch = _batch("bert", (2, 16), 1, "cuda")
    with torch.no_grad():
        fast(**batch)
        assert torch.equal(fast(**batch).logits, autocast(**batch).logits)
    assert fast.stats()["replays"] == 2  # the capturing call ran by a replay too
