"""Functions the rewritten graphs call at run time (they appear by name in ``amp.graph_module.code``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amp_compiler.scaler import unscale_grads


def module_in_dtype(module: nn.Module, dtype: torch.dtype, *args, **kwargs):
    """Run a leaf module (e.g. ``nn.LSTM``) with its floating parameters cast to ``dtype``.

    The module's own parameters stay fp32 (master weights); gradients flow back to them through
    the casts. Used in training mode; inference folding stores a low-precision copy instead.

        >>> out, (h, c) = module_in_dtype(lstm, torch.bfloat16, x.bfloat16())
    """
    scale = kwargs.pop("_amp_unscale", None)  # rule L4 (fp16 training): gradients unscaled
    params = _unscaled(module, scale)
    params = {n: (p.to(dtype) if p.is_floating_point() else p) for n, p in params.items()}
    return torch.func.functional_call(module, params, args, kwargs)


def module_unscaled(module: nn.Module, scale: torch.Tensor, *args, **kwargs):
    """Run a leaf module (``nn.BatchNorm1d`` left whole by fx tracing) with the gradients of its
    parameters divided by the loss scale (rule L4: ``.grad`` holds true gradients).

        >>> y = module_unscaled(bn, scaler.scale_tensor(), x)
    """
    return torch.func.functional_call(module, _unscaled(module, scale), args, kwargs)


def _unscaled(module: nn.Module, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The module's parameters by name, read through one ``unscale_grads`` when ``scale``."""
    named = dict(module.named_parameters())
    if scale is None or not named:
        return named
    return dict(zip(named, unscale_grads(scale, *named.values())))


CHUNK_ELEMENTS = 1 << 26  # logits per chunk (fused_cross_entropy's X3): 256 MB in fp32


def _chunked_cross_entropy(h, w, b, target, reduction, ignore_index, label_smoothing, scale,
                           need: tuple[bool, bool, bool]):
    """The loss, chunk by chunk, and for each of ``(h, w, b)`` that ``need`` names its
    gradient, computed right away per chunk (the chunk's logits are freed before the next):
    ``(loss, grad_h, grad_w, grad_b)``, the gradients those of ``loss * scale``."""
    rows_h = h.reshape(-1, h.shape[-1])
    rows_t = target.reshape(-1)
    n, vocab = rows_h.shape[0], w.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // max(1, vocab))
    # the gradients computed ahead are of loss * scale / count: the unfused backward's
    # values when the incoming gradient is the loss scale (or 1 without scaling)
    count = (rows_t != ignore_index).sum() if reduction == "mean" else None
    factor = scale.float() if scale is not None else torch.ones((), device=h.device)
    if count is not None:
        factor = factor / count.clamp(min=1).to(factor)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(rows_h) if need[0] else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need[1] else None
    grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need[2] else None
    for start in range(0, n, chunk):
        hs, ts = rows_h[start:start + chunk], rows_t[start:start + chunk]
        with torch.enable_grad() if any(need) else torch.no_grad():
            leaves = [t.detach().requires_grad_(g) if t is not None else None
                      for t, g in zip((hs, w, b), need)]
            logits = F.linear(leaves[0], leaves[1], leaves[2]).float()
            loss = F.cross_entropy(logits, ts, ignore_index=ignore_index, reduction="sum",
                                   label_smoothing=label_smoothing)
            if any(need):
                grads = iter(torch.autograd.grad(loss * factor, [t for t, g in zip(leaves, need) if g]))
                if need[0]:
                    grad_h[start:start + chunk] = next(grads)
                if need[1]:
                    grad_w += next(grads)
                if need[2]:
                    grad_b += next(grads)
        total += loss.detach()
        del logits, loss
    if count is not None:
        total = total / count.to(total)  # torch's mean: nan when every row is ignored
    return total, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: the loss and, chunk by chunk, the gradients (``_chunked_cross_entropy``);
    backward only multiplies them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, w, b, target, reduction, ignore_index, label_smoothing, scale):
        total, grad_h, grad_w, grad_b = _chunked_cross_entropy(
            h, w, b, target, reduction, ignore_index, label_smoothing, scale,
            tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(grad_h, grad_w, grad_b, scale if scale is not None else torch.ones((), device=h.device))
        ctx.shapes = (h.shape, w.dtype, None if b is None else b.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b, scale = ctx.saved_tensors
        h_shape, w_dtype, b_dtype = ctx.shapes
        ratio = grad_out / scale  # 1 when the incoming gradient is the loss scale
        out_h = None if grad_h is None else (grad_h * ratio.to(grad_h.dtype)).reshape(h_shape)
        out_w = None if grad_w is None else (grad_w * ratio).to(w_dtype)
        out_b = None if grad_b is None else (grad_b * ratio).to(b_dtype)
        return out_h, out_w, out_b, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                         target: torch.Tensor, *, reduction: str = "mean", ignore_index: int = -100,
                         label_smoothing: float = 0.0, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, w, b).float().view(-1, V), target.view(-1))`` without
    holding the fp32 logits of every row: rows in chunks of at most ``CHUNK_ELEMENTS`` logits,
    each chunk's logits in ``h``'s dtype and its softmax in fp32, as the unfused graph computes
    them (rule X3 of the fused_cross_entropy pass). ``scale``: the loss scale in fp16 training
    (rule X5), so that the gradients computed ahead do not underflow.

        >>> loss = linear_cross_entropy(hidden.half(), lm_head.weight.half(), None, labels)
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: linear_cross_entropy computes 'mean' or 'sum'")
    if torch.compiler.is_compiling():  # X6: one graph for inductor, which fuses it itself
        logits = F.linear(h, w, b).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b)):
        return _LinearCrossEntropy.apply(h, w, b, target, reduction, ignore_index, label_smoothing, scale)
    with torch.no_grad():  # evaluation: the same chunked loss, no gradients computed ahead
        return _chunked_cross_entropy(h, w, b, target, reduction, ignore_index, label_smoothing,
                                      scale, (False, False, False))[0]
