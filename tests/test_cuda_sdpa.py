"""On CUDA, converted Hugging Face models keep SDPA on its fused kernels (rules S1-S3).

The profiler must show no ``aten::_scaled_dot_product_attention_math`` (the unfused fallback that
stores the B x H x T x T scores) in a training step or an inference step of BERT, GPT-2 and
Llama, with the library's default attention implementation and dropout, labels included, with
and without a padding mask. Needs a CUDA device (skipped elsewhere: CPU SDPA has no such
fallback to detect); the CPU test of the folded graphs is tests/test_sdpa_masks.py.

    pytest tests/test_cuda_sdpa.py      # on a GPU machine
"""

from __future__ import annotations

import pytest
import torch

import amp_compiler as ac

transformers = pytest.importorskip("transformers", reason="needs `pip install transformers`")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, T, VOCAB = 4, 128, 1000


def _models():
    # head dim 64 and float16/bfloat16: sizes every fused kernel takes
    small = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    return {
        "bert": (lambda: transformers.BertForSequenceClassification(
            transformers.BertConfig(vocab_size=VOCAB, **small)), torch.float16, "cls"),
        "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=4)), torch.float16, "lm"),
        "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, num_key_value_heads=4, **small)), torch.bfloat16, "lm"),
    }


def _batch(task: str, padded: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, T), device="cuda", generator=g)
    batch = {"input_ids": ids}
    if padded:
        mask = torch.ones(B, T, dtype=torch.long, device="cuda")
        mask[::2, T // 2:] = 0
        batch["attention_mask"] = mask
    batch["labels"] = ids if task == "lm" else torch.randint(0, 2, (B,), device="cuda", generator=g)
    return batch


def _sdpa_kernels(step) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    step()  # warm up outside the profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "scaled_dot_product" in e.name]
    return {n: names.count(n) for n in set(names)}


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_no_math_sdpa(name, mode, padded):
    make, dtype, task = _models()[name]
    torch.manual_seed(0)
    model = make().cuda().train(mode == "train")
    batch = _batch(task, padded)
    amp = ac.convert(model, example_kwargs=batch, dtype=dtype)
    if mode == "train":
        def step():
            loss = amp(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        def step():
            with torch.no_grad():
                amp(**batch)
    kernels = _sdpa_kernels(step)
    assert sum(v for k, v in kernels.items() if "scaled_dot_product_attention" in k) > 0, kernels
    assert not any("math" in k for k in kernels), kernels
