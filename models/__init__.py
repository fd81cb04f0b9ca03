"""Reference models for testing and benchmarking the AMP compiler, behind a small registry.

``build(name, size)`` returns a freshly initialised fp32 model (in the default
training mode, like any new ``nn.Module``) and a tuple of example inputs:

>>> from amp_compiler.models import build
>>> model, inputs = build("mlp")
>>> model(*inputs).shape
torch.Size([8, 10])

Sizes: ``"tiny"`` (CPU unit tests, each forward well under 50 ms), ``"small"``
(a bit larger, still CPU-friendly), ``"bench"`` (the GPU benchmark sizes).

Tracing notes for pass authors:

* Every model except ``"gpt"`` traces with ``torch.fx`` through every submodule
  (only ``nn.LSTM``/``GRU``/``RNN`` need to be leaves); ``"gpt"`` deliberately
  fails fx tracing and needs ``torch.export``.  All of them export with
  ``torch.export.export(model, inputs, strict=False)``.
* ``forward(x, targets=None)`` branches on ``targets is None``.  A plain
  ``symbolic_trace`` turns ``targets`` into a placeholder and therefore always
  records the *loss* branch; pass ``concrete_args={"targets": None}`` (``labels``
  for bert and mf) to trace the logits branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import bert, data, gpt, lstm, mf, mlp, resnet

__all__ = ["NAMES", "SIZES", "UnknownModelError", "build", "describe", "data"]

NAMES: tuple[str, ...] = ("mlp", "mlp_wide", "resnet", "gpt", "bert", "lstm", "mf")
SIZES: tuple[str, ...] = ("tiny", "small", "bench")


class UnknownModelError(KeyError):
    """Raised by :func:`build`/:func:`describe` for a name not in :data:`NAMES`.

    Example:
        >>> try:
        ...     describe("vgg")
        ... except UnknownModelError as e:
        ...     "mlp" in str(e)
        True
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        # KeyError's own __str__ repr()s the argument; give a readable message instead.
        return f"unknown model {self.name!r}; valid names: {', '.join(NAMES)}"


_Factory = Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]


def _mlp_wide(size: str, **kw: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return mlp.from_preset(size, variant="mlp_wide", **kw)


_REGISTRY: dict[str, tuple[str, _Factory]] = {
    "mlp": ("MLP 784-128-10 (Linear+ReLU) on flattened 28x28 images", mlp.from_preset),
    "mlp_wide": (
        "MLP 784-4096-4096-10, GEMM-bound at batch 4096 (tiny: 784-512-512-10)",
        _mlp_wide,
    ),
    "resnet": ("ResNet with BasicBlocks, BatchNorm and max-pool stem (bench: ResNet-18, 224x224)", resnet.from_preset),
    "gpt": (
        "nanoGPT decoder, pre-LN, tied LM head, explicit causal attention (not fx-traceable)",
        gpt.from_preset,
    ),
    "bert": ("BERT encoder classifier, post-LN, additive -10000 padding mask (bench: BERT-base)", bert.from_preset),
    "lstm": ("Embedding + nn.LSTM + Linear on the last time step", lstm.from_preset),
    "mf": ("Matrix-factorisation recommender: user/item embeddings, dot product + biases, BCE loss", mf.from_preset),
}


def _entry(name: str) -> tuple[str, _Factory]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModelError(name) from None


def describe(name: str) -> str:
    """One-line description of a registered model.

    Example:
        >>> describe("lstm")
        'Embedding + nn.LSTM + Linear on the last time step'
    """
    return _entry(name)[0]


def build(
    name: str,
    size: str = "tiny",
    *,
    batch: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    **config: Any,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build model ``name`` at ``size`` in fp32 with example inputs, both on ``device``.

    Weights are a function of ``seed`` alone (initialised on CPU under a forked
    RNG, so the caller's global RNG state is untouched and CPU/CUDA builds get
    identical weights); inputs come from a ``torch.Generator`` seeded with
    ``seed + 1``.  ``batch`` overrides the preset's example batch size.
    ``config`` overrides model hyper-parameters (e.g. ``n_layer=48``) and a few
    input-shape keys (``seq_len`` for gpt/bert/lstm, ``image_size`` for resnet);
    ``with_targets=True`` appends targets/labels to the inputs so that
    ``model(*inputs)`` returns the scalar loss.

    Example:
        >>> m, (idx, tgt) = build("gpt", "tiny", with_targets=True, n_layer=1)
        >>> m(idx, tgt).shape
        torch.Size([])
    """
    _, factory = _entry(name)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    with_targets = bool(config.pop("with_targets", False))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, inputs = factory(size, batch=batch, generator=gen, with_targets=with_targets, **config)
    model = model.to(device)
    return model, tuple(t.to(device) for t in inputs)
