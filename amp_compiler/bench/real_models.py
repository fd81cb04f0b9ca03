"""The real-model suite's seven models (``amp-compiler bench --suite real``), built from their
libraries' default configurations with random weights (nothing is downloaded), and how they are
fed: the batch shapes of each mode and the keyword inputs of one step. ``--tiny`` builds each one
small enough for a CPU test (2 layers, hidden 32, 2 x 16 tokens, 32 x 32 images) with the same
architecture, loss and call path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Spec", "SPECS", "WithLoss", "batch_shapes", "make_batch", "output_field", "PROMPT",
           "TINY_BATCH", "TINY_SEQ", "TINY_IMAGE"]

PROMPT = 64                  # tokens of the batch-1 inference run (the design's GPT latency case)
# --tiny: every model small enough for a CPU test (2 layers, hidden 32, 2 x 16 tokens, 32 x 32
# images); the architecture, the loss and the call path stay the real ones.
TINY_BATCH, TINY_SEQ, TINY_IMAGE = 2, 16, 32
TINY_TEXT = {"vocab_size": 128}


@dataclass(frozen=True)
class Spec:
    """One model of the suite: how to build it and how to feed it."""

    name: str
    library: str                       # the import that provides it; missing: skipped
    task: str                          # "causal_lm" | "classify" | "seq2seq" | "image"
    dtype: str                         # the suite's low dtype for it (--dtype overrides)
    batch: int                         # training batch of the full configuration
    length: int                        # tokens per sequence, or the image side
    build: Callable[[bool], nn.Module]  # tiny -> a fresh fp32 model with random weights
    config: str                        # the configuration in words, for the JSON

    @property
    def text(self) -> bool:
        return self.task != "image"


def _hf(model_class: str, config_class: str, full: dict, tiny: dict) -> Callable[[bool], nn.Module]:
    def build(is_tiny: bool) -> nn.Module:
        import transformers  # optional: without it the suite skips the model

        config = getattr(transformers, config_class)(**(tiny if is_tiny else full))
        return getattr(transformers, model_class)(config)
    return build


class WithLoss(nn.Module):
    """A torchvision classifier with the loss Hugging Face models compute themselves, so that
    every model of the suite is called alike, ``model(**batch)``: the cross entropy when
    ``labels`` are given, the logits otherwise."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model, self.num_classes = model, num_classes

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.model(pixel_values)
        return logits if labels is None else F.cross_entropy(logits, labels)


def _resnet50(is_tiny: bool) -> nn.Module:
    import torchvision  # optional: without it the suite skips the model
    from torchvision.models.resnet import Bottleneck, ResNet

    if is_tiny:  # one bottleneck per stage, narrow: the same blocks, batch norm and head
        return WithLoss(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16), 10)
    return WithLoss(torchvision.models.resnet50(weights=None), 1000)


def _convnext_tiny(is_tiny: bool) -> nn.Module:
    import torchvision  # optional: without it the suite skips the model
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    if is_tiny:  # two stages of one block, stochastic depth as convnext_tiny sets it
        blocks = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
        return WithLoss(ConvNeXt(blocks, stochastic_depth_prob=0.1, num_classes=10), 10)
    return WithLoss(torchvision.models.convnext_tiny(weights=None), 1000)


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("gpt2", "transformers", "causal_lm", "float16", 8, 1024,
         _hf("GPT2LMHeadModel", "GPT2Config", {},
             {**TINY_TEXT, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
              "bos_token_id": 0, "eos_token_id": 0}),
         "GPT2LMHeadModel(GPT2Config()): 124M, 12 layers x 768, vocab 50257"),
    Spec("llama", "transformers", "causal_lm", "bfloat16", 8, 1024,
         _hf("LlamaForCausalLM", "LlamaConfig",
             {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16,
              "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 32000},
             {**TINY_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}),
         "LlamaForCausalLM(LlamaConfig(hidden_size=1024, num_hidden_layers=12, "
         "num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816, "
         "vocab_size=32000)): 220M (66M of it the untied embedding and head)"),
    Spec("bert", "transformers", "classify", "float16", 32, 128,
         _hf("BertForSequenceClassification", "BertConfig", {},
             {**TINY_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64}),
         "BertForSequenceClassification(BertConfig()): BERT-base, 109M, 2 labels"),
    Spec("t5", "transformers", "seq2seq", "bfloat16", 16, 512,
         # decoder_start_token_id: t5-small's value (the pad token), which T5Config() lacks
         # and the model needs to shift labels into decoder inputs
         _hf("T5ForConditionalGeneration", "T5Config", {"decoder_start_token_id": 0},
             {**TINY_TEXT, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2,
              "num_heads": 2, "decoder_start_token_id": 0}),
         "T5ForConditionalGeneration(T5Config(decoder_start_token_id=0)): t5-small's values "
         "(d_model 512, 6 + 6 layers, 8 heads, d_ff 2048, vocab 32128), 61M; labels of a "
         "quarter of the input length; bfloat16 because T5 overflows float16, under autocast "
         "too"),
    Spec("vit", "transformers", "image", "float16", 64, 224,
         _hf("ViTForImageClassification", "ViTConfig", {},
             {"image_size": TINY_IMAGE, "patch_size": 8, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}),
         "ViTForImageClassification(ViTConfig()): ViT-B/16 at 224 x 224, 86M, 2 labels"),
    Spec("resnet50", "torchvision", "image", "float16", 128, 224, _resnet50,
         "torchvision.models.resnet50(weights=None), 26M, cross entropy on 1000 classes"),
    Spec("convnext_tiny", "torchvision", "image", "float16", 128, 224, _convnext_tiny,
         "torchvision.models.convnext_tiny(weights=None) (stochastic depth 0.1), 29M, cross "
         "entropy on 1000 classes"),
)}


def batch_shapes(spec: Spec, mode: str, tiny: bool,
                 infer_batches: tuple[int | str, ...] = (1, "train")) -> list[tuple[int, int]]:
    """(batch, tokens or image side) of each timed run of ``mode``: the training batch; for
    inference each of ``infer_batches`` in order (a number: that many 64-token prompts or
    images; ``"train"``: the training batch)."""
    if tiny:
        train = (TINY_BATCH, TINY_SEQ if spec.text else TINY_IMAGE)
    else:
        train = (spec.batch, spec.length)
    if mode == "train":
        return [train]
    length = min(PROMPT, train[1]) if spec.text else train[1]
    return list(dict.fromkeys(train if b == "train" else (b, length) for b in infer_batches))


def _classes(model: nn.Module) -> int:
    return model.num_classes if isinstance(model, WithLoss) else model.config.num_labels


def make_batch(spec: Spec, model: nn.Module, batch: int, length: int, *, labels: bool,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """The keyword inputs of one step, on the CPU. With the same seed, the batch without labels
    (the eval forward's) holds the same tokens or pixels as the one with them.

    Example:
        >>> make_batch(SPECS["bert"], model, 2, 16, labels=True).keys()
        dict_keys(['input_ids', 'labels'])
    """
    g = torch.Generator().manual_seed(seed)
    if spec.task == "image":
        out = {"pixel_values": torch.randn(batch, 3, length, length, generator=g)}
        if labels:
            out["labels"] = torch.randint(0, _classes(model), (batch,), generator=g)
        return out
    vocab = model.config.vocab_size
    out = {"input_ids": torch.randint(0, vocab, (batch, length), generator=g)}
    if spec.task == "causal_lm" and labels:
        out["labels"] = out["input_ids"].clone()  # the model shifts them itself
    elif spec.task == "classify" and labels:
        out["labels"] = torch.randint(0, _classes(model), (batch,), generator=g)
    elif spec.task == "seq2seq":
        # with labels the model builds its decoder inputs from them; without, it needs them
        target = torch.randint(0, vocab, (batch, max(1, length // 4)), generator=g)
        out["labels" if labels else "decoder_input_ids"] = target
    return out


def output_field(out: Any, name: str) -> torch.Tensor:
    """``out.loss`` / ``out.logits`` of a library output (a ModelOutput or dict), or ``out``
    itself where the model returns one tensor (``WithLoss``: the loss with labels, else the
    logits). A tuple (``return_dict=False``) starts with the loss when there is one."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return out[name]
    return out[0]
