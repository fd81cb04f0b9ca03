"""LSTM sequence classifier: Embedding -> ``nn.LSTM(batch_first=True)`` -> Linear on the last step.

``nn.LSTM`` is the one module the fx tracers in this project keep as a leaf, so
this model checks that an opaque recurrent op (whose cuDNN kernel has its own
precision rules) survives the AMP pipeline.  ``forward`` indexes the LSTM's
output tuple with ``[0]`` instead of unpacking it, because a leaf module's
result is a single fx Proxy that cannot be iterated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LSTMClassifier", "LSTMConfig", "SIZES", "from_preset"]


@dataclass
class LSTMConfig:
    """Hyper-parameters of :class:`LSTMClassifier`.

    Example:
        >>> LSTMConfig(vocab_size=100, emb=32, hidden=64).num_layers
        1
    """

    vocab_size: int = 100
    emb: int = 32
    hidden: int = 64
    num_layers: int = 1
    num_classes: int = 10
    dropout: float = 0.0


class LSTMClassifier(nn.Module):
    """Classify a token sequence from the LSTM state at its last time step.

    Example:
        >>> m = LSTMClassifier(LSTMConfig())
        >>> m(torch.zeros(4, 12, dtype=torch.long)).shape
        torch.Size([4, 10])
    """

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.emb)
        self.lstm = nn.LSTM(
            config.emb,
            config.hidden,
            num_layers=config.num_layers,
            batch_first=True,
            # nn.LSTM warns when given dropout with a single layer.
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(config.hidden, config.num_classes)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits ``(B, num_classes)``, or mean cross-entropy when ``targets`` is given.

        Example:
            >>> m = LSTMClassifier(LSTMConfig())
            >>> m(torch.zeros(2, 5, dtype=torch.long), torch.tensor([1, 2])).shape
            torch.Size([])
        """
        out = self.lstm(self.embedding(tokens))[0]
        logits = self.head(out[:, -1])
        if targets is None:
            return logits
        return F.cross_entropy(logits, targets)


# Model config plus example-input shape (``batch``, ``seq_len``).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 100, "emb": 32, "hidden": 64, "num_layers": 1, "batch": 4, "seq_len": 12},
    "small": {"vocab_size": 1000, "emb": 128, "hidden": 256, "num_layers": 2, "batch": 16, "seq_len": 32},
    "bench": {
        "vocab_size": 10000,
        "emb": 512,
        "hidden": 1024,
        "num_layers": 2,
        "batch": 256,
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
) -> tuple[LSTMClassifier, tuple[torch.Tensor, ...]]:
    """Build an :class:`LSTMClassifier` plus ``(tokens[, targets])`` example inputs.

    Example:
        >>> m, (tok,) = from_preset("tiny", generator=torch.Generator().manual_seed(1))
        >>> tok.shape
        torch.Size([4, 12])
    """
    cfg = {**SIZES[size], **config}
    b = batch if batch is not None else cfg["batch"]
    cfg.pop("batch")
    t = cfg.pop("seq_len")
    known = {f.name for f in fields(LSTMConfig)}
    unknown = set(cfg) - known
    if unknown:
        raise TypeError(f"unknown lstm config keys {sorted(unknown)}; valid: {sorted(known | {'seq_len'})}")
    model = LSTMClassifier(LSTMConfig(**cfg))
    tokens = torch.randint(0, model.config.vocab_size, (b, t), generator=generator)
    if not with_targets:
        return model, (tokens,)
    targets = torch.randint(0, model.config.num_classes, (b,), generator=generator)
    return model, (tokens, targets)
