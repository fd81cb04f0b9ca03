"""nanoGPT-style decoder-only transformer.

This model is *deliberately not* traceable by ``torch.fx.symbolic_trace``: the
explicit-attention path unpacks ``x.size()`` and builds its causal mask in
``forward`` from ``T = x.size(1)``, which a symbolic tracer cannot turn into a
graph.  It exists to exercise the ``torch.export`` front end, which handles it.
Keep it that way: tests assert that fx tracing fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "Block", "CausalSelfAttention", "SIZES", "from_preset"]


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT`. ``attention`` is ``"explicit"`` or ``"sdpa"``.

    Example:
        >>> GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64).attention
        'explicit'
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    attention: str = "explicit"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.attention not in ("explicit", "sdpa"):
            raise ValueError(f"attention must be 'explicit' or 'sdpa', got {self.attention!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection.

    Example:
        >>> cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)
        >>> CausalSelfAttention(cfg)(torch.zeros(1, 5, 8)).shape
        torch.Size([1, 5, 8])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attention = config.attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend causally over the sequence dimension of ``x`` ``(B, T, C)``.

        Example:
            >>> cfg = GPTConfig(16, 8, 1, 2, 8, attention="sdpa")
            >>> CausalSelfAttention(cfg)(torch.zeros(2, 3, 8)).shape
            torch.Size([2, 3, 8])
        """
        B, T, C = x.size()
        hd = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            # Built per call (not a registered buffer) on purpose: this is what
            # defeats torch.fx symbolic tracing, see the module docstring.
            mask = torch.ones(T, T, device=x.device).tril()
            att = att.masked_fill(mask == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Transformer feed-forward: Linear(C, 4C), GELU, Linear(4C, C), dropout.

    Example:
        >>> MLP(GPTConfig(16, 8, 1, 2, 8))(torch.zeros(1, 3, 8)).shape
        torch.Size([1, 3, 8])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward block.

        Example:
            >>> MLP(GPTConfig(16, 8, 1, 2, 8))(torch.zeros(3, 8)).shape
            torch.Size([3, 8])
        """
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    Example:
        >>> Block(GPTConfig(16, 8, 1, 2, 8))(torch.zeros(1, 4, 8)).shape
        torch.Size([1, 4, 8])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Example:
            >>> Block(GPTConfig(16, 8, 1, 2, 8))(torch.zeros(2, 2, 8)).shape
            torch.Size([2, 2, 8])
        """
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only language model with learned positions and a weight-tied LM head.

    Example:
        >>> m = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
        >>> m(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 32])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the AMP pipeline must cope with one parameter feeding
        # both an embedding lookup and a matmul.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scaled init of residual projections keeps the residual stream's
        # variance independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits ``(B, T, vocab)``, or the mean next-token cross-entropy when ``targets`` is given.

        Example:
            >>> m = GPT(GPTConfig(32, 8, 1, 2, 16))
            >>> idx = torch.zeros(1, 8, dtype=torch.long)
            >>> m(idx, idx).shape
            torch.Size([])
        """
        t = idx.size(1)
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        V = logits.size(-1)
        return F.cross_entropy(logits.view(-1, V), targets.view(-1))


# Model config plus example-input shape (``batch``, ``seq_len``; seq_len defaults to block_size).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 256, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 64, "batch": 2},
    "small": {"vocab_size": 512, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, "batch": 4},
    "bench": {
        "vocab_size": 8192,
        "block_size": 1024,
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "batch": 8,
    },
}


def from_preset(
    size: str,
    *,
    batch: int | None = None,
    generator: torch.Generator,
    with_targets: bool = False,
    **config: Any,
) -> tuple[GPT, tuple[torch.Tensor, ...]]:
    """Build a :class:`GPT` from a preset plus overrides (``seq_len=`` shortens the example).

    Example:
        >>> m, (idx, tgt) = from_preset("tiny", generator=torch.Generator().manual_seed(1), with_targets=True)
        >>> idx.shape, tgt.shape
        (torch.Size([2, 32]), torch.Size([2, 32]))
    """
    cfg = {**SIZES[size], **config}
    b = batch if batch is not None else cfg["batch"]
    cfg.pop("batch")
    seq_len = cfg.pop("seq_len", None)
    known = {f.name for f in fields(GPTConfig)}
    unknown = set(cfg) - known
    if unknown:
        raise TypeError(f"unknown gpt config keys {sorted(unknown)}; valid: {sorted(known | {'seq_len'})}")
    model = GPT(GPTConfig(**cfg))
    t = model.config.block_size if seq_len is None else seq_len
    if t > model.config.block_size:
        raise ValueError(f"seq_len {t} exceeds block_size {model.config.block_size}")
    idx = torch.randint(0, model.config.vocab_size, (b, t), generator=generator)
    if not with_targets:
        return model, (idx,)
    targets = torch.randint(0, model.config.vocab_size, (b, t), generator=generator)
    return model, (idx, targets)
