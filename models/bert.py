"""BERT-style encoder for sequence classification, written to be fx-traceable.

Unlike :mod:`amp_compiler.models.gpt`, every line of ``forward`` here is free of
Python-level shape arithmetic so ``torch.fx.symbolic_trace`` can trace through
every submodule: heads are split with ``unflatten``/``flatten`` instead of
``view(B, T, ...)``, and position ids come from ``ones_like(ids).cumsum(-1) - 1``
because slicing a buffer with ``ids.shape[1]`` needs a real int, which a
symbolic tracer does not have.  The padding mask is additive (``-10000`` on
padded keys), the classic BERT formulation, so an AMP pass sees a large
constant flowing into a softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Bert", "BertConfig", "BertLayer", "BertSelfAttention", "SIZES", "from_preset"]


@dataclass
class BertConfig:
    """Hyper-parameters of :class:`Bert`.

    Example:
        >>> BertConfig(vocab_size=128, hidden=64, n_layer=2, n_head=4).intermediate
        256
    """

    vocab_size: int = 30522
    hidden: int = 768
    n_layer: int = 12
    n_head: int = 12
    intermediate: int | None = None
    max_position: int = 512
    type_vocab_size: int = 2
    num_labels: int = 2
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.intermediate is None:
            self.intermediate = 4 * self.hidden
        if self.hidden % self.n_head:
            raise ValueError(f"hidden={self.hidden} is not divisible by n_head={self.n_head}")


class BertSelfAttention(nn.Module):
    """Explicit scaled dot-product attention with separate Q/K/V projections and an additive mask.

    Example:
        >>> att = BertSelfAttention(BertConfig(hidden=8, n_head=2))
        >>> att(torch.zeros(1, 3, 8), torch.zeros(1, 1, 1, 3)).shape
        torch.Size([1, 3, 8])
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.hidden // config.n_head
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)
        self.dropout = nn.Dropout(config.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, nh, T, hd) without reading B or T.
        return x.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` ``(B, T, C)``; ``additive_mask`` broadcasts to ``(B, nh, T, T)``.

        Example:
            >>> att = BertSelfAttention(BertConfig(hidden=8, n_head=2))
            >>> att(torch.zeros(2, 4, 8), torch.zeros(2, 1, 1, 4)).shape
            torch.Size([2, 4, 8])
        """
        q = self._heads(self.query(x))
        k = self._heads(self.key(x))
        v = self._heads(self.value(x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores + additive_mask
        probs = self.dropout(F.softmax(scores, dim=-1))
        return (probs @ v).transpose(1, 2).flatten(2)


class BertLayer(nn.Module):
    """Post-LayerNorm encoder layer: ``LN(x + attn(x))`` then ``LN(x + FFN(x))`` with a GELU FFN.

    Example:
        >>> layer = BertLayer(BertConfig(hidden=8, n_head=2))
        >>> layer(torch.zeros(1, 3, 8), torch.zeros(1, 1, 1, 3)).shape
        torch.Size([1, 3, 8])
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        assert config.intermediate is not None
        self.attention = BertSelfAttention(config)
        self.attn_out = nn.Linear(config.hidden, config.hidden)
        self.attn_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden, config.intermediate)
        self.gelu = nn.GELU()
        self.output = nn.Linear(config.intermediate, config.hidden)
        self.out_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Example:
            >>> layer = BertLayer(BertConfig(hidden=8, n_head=2))
            >>> layer(torch.zeros(2, 5, 8), torch.zeros(2, 1, 1, 5)).shape
            torch.Size([2, 5, 8])
        """
        x = self.attn_norm(x + self.dropout(self.attn_out(self.attention(x, additive_mask))))
        return self.out_norm(x + self.dropout(self.output(self.gelu(self.intermediate(x)))))


class Bert(nn.Module):
    """BERT encoder + tanh pooler on ``[CLS]`` (position 0) + Linear classifier.

    Example:
        >>> m = Bert(BertConfig(vocab_size=32, hidden=16, n_layer=1, n_head=2, max_position=8))
        >>> ids = torch.zeros(2, 8, dtype=torch.long)
        >>> m(ids, torch.ones(2, 8, dtype=torch.long)).shape
        torch.Size([2, 2])
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embeddings = nn.Embedding(config.max_position, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden)
        self.emb_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([BertLayer(config) for _ in range(config.n_layer)])
        self.pooler = nn.Linear(config.hidden, config.hidden)
        self.classifier = nn.Linear(config.hidden, config.num_labels)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's truncated-normal-ish init (plain normal 0.02, as HF does).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Classify each sequence: logits ``(B, num_labels)``, or mean cross-entropy given ``labels``.

        ``attention_mask`` is ``(B, T)`` of 0/1 (1 = real token).

        Example:
            >>> m = Bert(BertConfig(vocab_size=32, hidden=16, n_layer=1, n_head=2, max_position=8))
            >>> ids, am = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)
            >>> m(ids, am, torch.tensor([0, 1])).shape
            torch.Size([])
        """
        positions = torch.ones_like(input_ids).cumsum(-1) - 1
        token_types = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_types)
        )
        x = self.emb_dropout(self.emb_norm(x))
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, additive_mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        logits = self.classifier(pooled)
        if labels is None:
            return logits
        return F.cross_entropy(logits, labels)


# Model config plus example-input shape (``batch``, ``seq_len``).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 128,
        "hidden": 64,
        "n_layer": 2,
        "n_head": 4,
        "max_position": 64,
        "batch": 2,
        "seq_len": 16,
    },
    "small": {
        "vocab_size": 1024,
        "hidden": 128,
        "n_layer": 4,
        "n_head": 4,
        "max_position": 128,
        "batch": 8,
        "seq_len": 64,
    },
    # BERT-base.
    "bench": {
        "vocab_size": 30522,
        "hidden": 768,
        "n_layer": 12,
        "n_head": 12,
        "max_position": 512,
        "batch": 64,
        "seq_len": 128,
    },
}


def from_preset(
    size: str,
    *,
    batch: int | None = None,
    generator: torch.Generator,
    with_targets: bool = False,
    **config: Any,
) -> tuple[Bert, tuple[torch.Tensor, ...]]:
    """Build a :class:`Bert` plus ``(input_ids, attention_mask[, labels])`` example inputs.

    The second sequence (when the batch has one) has its last quarter padded:
    mask 0 and token id 0, so the additive mask path is actually exercised.

    Example:
        >>> m, (ids, am) = from_preset("tiny", generator=torch.Generator().manual_seed(1))
        >>> ids.shape, am[1].tolist()[-4:]
        (torch.Size([2, 16]), [0, 0, 0, 0])
    """
    cfg = {**SIZES[size], **config}
    b = batch if batch is not None else cfg["batch"]
    cfg.pop("batch")
    t = cfg.pop("seq_len")
    known = {f.name for f in fields(BertConfig)}
    unknown = set(cfg) - known
    if unknown:
        raise TypeError(f"unknown bert config keys {sorted(unknown)}; valid: {sorted(known | {'seq_len'})}")
    model = Bert(BertConfig(**cfg))
    if t > model.config.max_position:
        raise ValueError(f"seq_len {t} exceeds max_position {model.config.max_position}")
    # Ids 0 and 1 are reserved for [PAD] and [CLS].
    ids = torch.randint(2, model.config.vocab_size, (b, t), generator=generator)
    ids[:, 0] = 1
    mask = torch.ones(b, t, dtype=torch.long)
    if b > 1:
        n_pad = t // 4
        if n_pad:
            mask[1, t - n_pad :] = 0
            ids[1, t - n_pad :] = 0
    if not with_targets:
        return model, (ids, mask)
    labels = torch.randint(0, model.config.num_labels, (b,), generator=generator)
    return model, (ids, mask, labels)
