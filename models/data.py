"""Offline data for accuracy checks: sklearn's digits as MNIST-shaped tensors, and a synthetic token stream.

Nothing here downloads anything: ``load_digits`` ships inside scikit-learn and
the token stream is generated from a seed.  scikit-learn is a dev dependency
only, so it is imported inside :func:`digits`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["digits", "token_stream", "batches"]


def digits(
    split_seed: int = 0, test_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` from sklearn's 8x8 digits, upsampled to 28x28.

    ``x`` is float32 ``(N, 784)``, ``y`` int64 ``(N,)`` in 0..9.  The split is
    stratified per class (so both halves are class-balanced) and deterministic in
    ``split_seed``.  Pixels are scaled to [0, 1] and then standardised with one
    mean/std taken from the training split: a global scalar rather than per
    pixel, because many border pixels are constant zero in training and a
    per-pixel std would blow up any test image that touches them.

    Example:
        >>> x_tr, y_tr, x_te, y_te = digits()
        >>> x_tr.shape[1], x_tr.dtype, int(y_te.max())
        (784, torch.float32, 9)
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    x = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    # Bilinear interpolation is a convex combination, so the 0..16 range holds.
    x = (x / 16.0).clamp_(0.0, 1.0).flatten(1)

    g = torch.Generator().manual_seed(split_seed)
    train_idx: list[torch.Tensor] = []
    test_idx: list[torch.Tensor] = []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = round(idx.numel() * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    # Shuffle across classes so callers can slice mini-batches in order.
    tr = torch.cat(train_idx)
    tr = tr[torch.randperm(tr.numel(), generator=g)]
    te = torch.cat(test_idx)
    te = te[torch.randperm(te.numel(), generator=g)]

    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr].contiguous(), labels[tr].contiguous(), x[te].contiguous(), labels[te].contiguous()


def token_stream(n_tokens: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Return a fixed ``(n_tokens,)`` int64 stream from a sparse, peaked order-2 Markov chain.

    The next token depends on the previous two: with probability 0.9 it is one
    of 4 candidates picked by the context (weights 0.6/0.2/0.1/0.1), otherwise
    uniform noise.  The context is ``(prev, prev2 mod 4)``, hashed into a table
    of at most 2**16 rows so large vocabularies stay cheap.  A bigram model
    already gets a good part of the way and the order-2 part adds more, so a
    small GPT's loss falls clearly from ``ln(vocab)`` within a couple of hundred
    steps.  Same arguments, same stream.

    Example:
        >>> s = token_stream(1000, 64, seed=0)
        >>> s.shape, s.dtype, bool((s == token_stream(1000, 64, seed=0)).all())
        (torch.Size([1000]), torch.int64, True)
    """
    if n_tokens < 2 or vocab_size < 2:
        raise ValueError("need n_tokens >= 2 and vocab_size >= 2")
    g = torch.Generator().manual_seed(seed)
    k, coarse = 4, 4
    table_rows = min(vocab_size * coarse, 1 << 16)
    table = torch.randint(0, vocab_size, (table_rows, k), generator=g).tolist()
    weights = torch.tensor([0.6, 0.2, 0.1, 0.1])
    # Every random draw is context-free, so draw them all up front and keep
    # the sequential loop down to list indexing.
    choice = torch.multinomial(weights, n_tokens, replacement=True, generator=g).tolist()
    noisy = (torch.rand(n_tokens, generator=g) < 0.1).tolist()
    noise = torch.randint(0, vocab_size, (n_tokens,), generator=g).tolist()
    out = [0] * n_tokens
    out[0], out[1] = noise[0], noise[1]
    a, b = out[0], out[1]
    for t in range(2, n_tokens):
        if noisy[t]:
            nxt = noise[t]
        else:
            nxt = table[(b * coarse + a % coarse) % table_rows][choice[t]]
        out[t] = nxt
        a, b = b, nxt
    return torch.tensor(out, dtype=torch.long)


def batches(
    stream: torch.Tensor,
    batch: int,
    block: int,
    steps: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``steps`` pairs ``(idx, targets)`` of shape ``(batch, block)``; targets are idx shifted by one.

    Windows start at random offsets drawn from a generator seeded with ``seed``,
    so the sequence of batches is reproducible.

    Example:
        >>> s = token_stream(500, 32)
        >>> idx, tgt = next(batches(s, batch=2, block=8, steps=1))
        >>> idx.shape, bool((idx[:, 1:] == tgt[:, :-1]).all())
        (torch.Size([2, 8]), True)
    """
    if stream.numel() < block + 2:
        raise ValueError(f"stream of {stream.numel()} tokens is too short for block={block}")
    g = torch.Generator().manual_seed(seed)
    span = torch.arange(block)
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - block - 1, (batch,), generator=g)
        pos = starts[:, None] + span
        yield stream[pos].to(device), stream[pos + 1].to(device)
