"""The project's measures, in one place: the relative error against a reference and the casts
a run executes (torch) or a file holds (ONNX). Every tool (tolerance search, range analysis,
the demo, the benchmarks, compare) measures with these.

    >>> rel_error(torch.tensor([1.0, 2.01]), torch.tensor([1.0, 2.0]))
    0.005...
    >>> count_casts(lambda: torch.ones(3).half())
    1
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def float_tensors(value) -> list[torch.Tensor]:
    """The floating tensors in a node's value (a tensor, or nested tuples/lists of them)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in float_tensors(v)]
    return []


def rel_error(out, ref) -> float:
    """The project's relative error max|out-ref| / max|ref| over all floating tensors of a value,
    in float64. Positions where ``ref`` is not finite are skipped when ``out`` equals it there."""
    outs, refs = float_tensors(out), float_tensors(ref)
    if len(outs) != len(refs) or not refs:
        return float("nan")
    num, den = 0.0, 0.0
    for o, r in zip(outs, refs):
        o, r = o.detach().double(), r.detach().double()
        finite = torch.isfinite(r)
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        if bool((~finite & ~same).any()) or bool((finite & ~torch.isfinite(o)).any()):
            return float("inf")
        if finite.any():
            num = max(num, (o - r).abs()[finite].max().item())
            den = max(den, r.abs()[finite].max().item())
    return num / max(den, 1e-30)


class _CastCounter(TorchDispatchMode):
    """Counts dtype conversions (``aten._to_copy``: what ``.to(dtype)`` and autocast's own
    casts lower to) below autograd, so eager, autocast and converted runs count alike."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0], out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dtype != dst.dtype:
                self.count += 1
        return out


def count_casts(fn: Callable[[], Any]) -> int:
    """Dtype conversions executed by ``fn()`` (one forward, say).

    Example:
        >>> count_casts(lambda: amp(*inputs)) == amp.cast_count()
        True
    """
    counter = _CastCounter()
    with counter:
        fn()
    return counter.count


def onnx_cast_count(model) -> int:
    """``Cast`` nodes in an ONNX model's main graph (an ``onnx.ModelProto``)."""
    return sum(n.op_type == "Cast" for n in model.graph.node)
