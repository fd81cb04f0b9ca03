"""Matrix-factorisation recommender (dot product of user and item embeddings plus biases).

Almost all of its compute is embedding gathers and a tiny reduction, the
opposite profile to the matmul-bound models: half precision saves memory
bandwidth here but the logit sum is where rounding would bite.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MatrixFactorization", "MFConfig", "SIZES", "from_preset"]


@dataclass
class MFConfig:
    """Hyper-parameters of :class:`MatrixFactorization`.

    Example:
        >>> MFConfig(n_users=50, n_items=40, dim=16).dim
        16
    """

    n_users: int = 50
    n_items: int = 40
    dim: int = 16


class MatrixFactorization(nn.Module):
    """Implicit-feedback MF: ``logit = <u, i> + b_u + b_i + b``.

    Example:
        >>> m = MatrixFactorization(MFConfig())
        >>> m(torch.tensor([0, 1]), torch.tensor([2, 3])).shape
        torch.Size([2])
    """

    def __init__(self, config: MFConfig) -> None:
        super().__init__()
        self.config = config
        self.user = nn.Embedding(config.n_users, config.dim)
        self.item = nn.Embedding(config.n_items, config.dim)
        self.user_bias = nn.Embedding(config.n_users, 1)
        self.item_bias = nn.Embedding(config.n_items, 1)
        self.global_bias = nn.Parameter(torch.zeros(()))
        # std 0.1 gives dot products of order dim * 0.01, i.e. non-trivial but
        # unsaturated logits at init; biases start at zero.
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(
        self, users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return logits ``(B,)``, or mean BCE-with-logits against float ``labels`` in [0, 1].

        Example:
            >>> m = MatrixFactorization(MFConfig())
            >>> m(torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0])).shape
            torch.Size([])
        """
        logits = (
            (self.user(users) * self.item(items)).sum(-1)
            + self.user_bias(users).squeeze(-1)
            + self.item_bias(items).squeeze(-1)
            + self.global_bias
        )
        if labels is None:
            return logits
        return F.binary_cross_entropy_with_logits(logits, labels)


# Model config plus example batch size.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_users": 50, "n_items": 40, "dim": 16, "batch": 8},
    "small": {"n_users": 1000, "n_items": 800, "dim": 32, "batch": 256},
    "bench": {"n_users": 100_000, "n_items": 50_000, "dim": 128, "batch": 65536},
}


def from_preset(
    size: str,
    *,
    batch: int | None = None,
    generator: torch.Generator,
    with_targets: bool = False,
    **config: Any,
) -> tuple[MatrixFactorization, tuple[torch.Tensor, ...]]:
    """Build a :class:`MatrixFactorization` plus ``(users, items[, labels])`` example inputs.

    Example:
        >>> m, (u, i, y) = from_preset("tiny", generator=torch.Generator().manual_seed(1), with_targets=True)
        >>> u.shape, y.dtype
        (torch.Size([8]), torch.float32)
    """
    cfg = {**SIZES[size], **config}
    b = batch if batch is not None else cfg["batch"]
    cfg.pop("batch")
    known = {f.name for f in fields(MFConfig)}
    unknown = set(cfg) - known
    if unknown:
        raise TypeError(f"unknown mf config keys {sorted(unknown)}; valid: {sorted(known)}")
    model = MatrixFactorization(MFConfig(**cfg))
    users = torch.randint(0, model.config.n_users, (b,), generator=generator)
    items = torch.randint(0, model.config.n_items, (b,), generator=generator)
    if not with_targets:
        return model, (users, items)
    labels = torch.randint(0, 2, (b,), generator=generator).float()
    return model, (users, items, labels)
