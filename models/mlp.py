"""Multi-layer perceptron classifiers: the simplest reference models.

Two registry entries live here:

* ``"mlp"``: 784-128-10 at every size (MNIST-shaped, matches :func:`amp_compiler.models.data.digits`).
* ``"mlp_wide"``: 784-4096-4096-10 for ``"small"`` and ``"bench"``.  The ``"tiny"``
  preset keeps the depth but narrows the hidden layers to 512, because a 20 M
  parameter init alone would eat most of the CPU test budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "SIZES", "from_preset"]


class MLP(nn.Module):
    """Linear+ReLU stack ending in a Linear classifier head.

    Example:
        >>> m = MLP(in_features=784, hidden=(128,), out_features=10)
        >>> m(torch.zeros(2, 784)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (128,),
        out_features: int = 10,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden = tuple(hidden)
        self.out_features = out_features
        layers: list[nn.Module] = []
        width = in_features
        for h in self.hidden:
            # Not in-place: in-place ReLU shows up as a mutation in traced
            # graphs and gets in the way of precision-rewriting passes.
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits ``(B, out_features)``, or the mean cross-entropy when ``targets`` is given.

        Example:
            >>> m = MLP(8, (4,), 3)
            >>> m(torch.zeros(2, 8), torch.tensor([0, 2])).shape
            torch.Size([])
        """
        logits = self.net(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits, targets)


# Each preset: model kwargs plus the default example batch.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": {
        "tiny": {"in_features": 784, "hidden": (128,), "out_features": 10, "batch": 8},
        "small": {"in_features": 784, "hidden": (128,), "out_features": 10, "batch": 64},
        "bench": {"in_features": 784, "hidden": (128,), "out_features": 10, "batch": 4096},
    },
    "mlp_wide": {
        "tiny": {"in_features": 784, "hidden": (512, 512), "out_features": 10, "batch": 8},
        "small": {"in_features": 784, "hidden": (4096, 4096), "out_features": 10, "batch": 64},
        "bench": {"in_features": 784, "hidden": (4096, 4096), "out_features": 10, "batch": 4096},
    },
}


def from_preset(
    size: str,
    *,
    variant: str = "mlp",
    batch: int | None = None,
    generator: torch.Generator,
    with_targets: bool = False,
    **config: Any,
) -> tuple[MLP, tuple[torch.Tensor, ...]]:
    """Build an :class:`MLP` from a named preset plus overrides, with CPU example inputs.

    Weights come from the global RNG (the registry seeds it); inputs come from ``generator``.

    Example:
        >>> m, (x,) = from_preset("tiny", generator=torch.Generator().manual_seed(1))
        >>> x.shape
        torch.Size([8, 784])
    """
    cfg = {**SIZES[variant][size], **config}
    b = batch if batch is not None else cfg.pop("batch")
    cfg.pop("batch", None)
    model = MLP(**cfg)
    x = torch.randn(b, model.in_features, generator=generator)
    if not with_targets:
        return model, (x,)
    y = torch.randint(0, model.out_features, (b,), generator=generator)
    return model, (x, y)
