"""Functions the rewritten graphs call at run time (they appear by name in ``amp.graph_module.code``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _ScaleLossGrad(torch.autograd.Function):
    """Identity in forward; multiplies the incoming gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # Kept as a ctx attribute rather than save_for_backward: the scaler updates the scale in
        # place, and a saved tensor's version check would reject an update made between this
        # forward and its backward. Reading it at backward time is exactly what we want.
        ctx.scale = scale
        return loss.clone()  # a copy, not a view: FSDP2 warns about views returned by forward

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Same arithmetic as GradScaler.scale(loss).backward() (1 * scale), so gradients are
        # bit-identical to the eager recipe; .to() is a no-op when devices already match.
        return grad * ctx.scale.to(device=grad.device, non_blocking=True), None


def scale_loss_grad(loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return ``loss`` unchanged, but make its backward start from ``scale`` instead of 1.

    ``scale`` is read when the backward runs, so in-place updates made by
    :meth:`LossScaler.update` between two steps are seen without rebuilding the graph. Pass the
    tensor returned by :meth:`LossScaler.scale_tensor`. Works under ``torch.compile``.
    """
    # FX Proxies (and other __torch_function__ tensors) get to record this call as one node:
    # symbolic tracing or re-tracing a graph that holds it keeps it a leaf instead of failing
    # inside autograd.Function.apply.
    if torch.overrides.has_torch_function_variadic(loss, scale):
        return torch.overrides.handle_torch_function(
            scale_loss_grad, (loss, scale), loss, scale
        )
    return _ScaleLossGrad.apply(loss, scale)


class _UnscaleGrads(torch.autograd.Function):
    """Identity in forward; divides each incoming gradient by ``scale`` in backward, all of
    them with one foreach call: one autograd node per group (a layer's parameters)."""

    @staticmethod
    def forward(ctx: Any, scale: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.scale = scale  # read at backward time, as in _ScaleLossGrad
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return (None, *grads)
        scale = ctx.scale.to(device=grads[present[0]].device, non_blocking=True)
        # out of place: an incoming gradient may be shared with another input's (add's
        # backward hands the same tensor to both operands). Scales are powers of two, so the
        # division is exact and equals GradScaler's multiplication by the reciprocal.
        divided = torch._foreach_div([grads[i] for i in present], scale)
        out: list[torch.Tensor | None] = [None] * len(grads)
        for i, g in zip(present, divided):
            out[i] = g
        return (None, *out)


def unscale_grads(scale: torch.Tensor, *xs: Any) -> tuple[Any, ...]:
    """Return ``xs`` unchanged, but divide the gradients that flow back into them by ``scale``
    (one autograd node and one foreach division for the group).

    The graph reads every trainable parameter (one call per layer) and its inputs (one call)
    through it, so the loss gradient that :func:`scale_loss_grad` multiplied by the scale
    arrives in ``.grad`` as the true gradient: after ``loss.backward()``, clipping, a plain
    ``optimizer.step()`` and ``torch.autograd.grad`` all see true values, and several
    backwards accumulate true gradients. What is not a floating tensor requiring grad passes
    through untouched.

        >>> w, b = unscale_grads(scaler.scale_tensor(), linear.weight, linear.bias)
    """
    if torch.overrides.has_torch_function((scale, *xs)):
        return torch.overrides.handle_torch_function(unscale_grads, (scale, *xs), scale, *xs)
    wanted = [i for i, x in enumerate(xs)
              if isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point()]
    if not wanted:
        return tuple(xs)
    out = list(xs)
    for i, y in zip(wanted, _UnscaleGrads.apply(scale, *(xs[i] for i in wanted))):
        out[i] = y
    return tuple(out)


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


CHUNK_ELEMENTS = 1 << 25  # logits per chunk (fused_cross_entropy's X3): 128 MB in fp32
VOCAB_ALIGN = 64  # X7: classes padded to a multiple of this on CUDA (tensor-core aligned rows)


def _chunked_cross_entropy(h, w, b, target, reduction, ignore_index, label_smoothing, scale,
                           need: tuple[bool, bool, bool], logits: torch.Tensor | None = None):
    """The loss, chunk by chunk, and for each of ``(h, w, b)`` that ``need`` names its
    gradient, computed right away per chunk (the chunk's fp32 logits are freed before the
    next): ``(loss, grad_h, grad_w, grad_b)``, the gradients those of ``loss * scale``.
    ``logits``: a ``(rows, padded V)`` buffer (``logits_buffer``) that receives each chunk's
    logits (rule X4: the model also returns them).

    Per chunk: ``z = (h @ w.T + b).float()``; the loss of a row is
    ``-(1 - eps) * log_softmax(z)[t] - eps * mean(log_softmax(z))`` (torch's label
    smoothing), 0 for ``ignore_index``; its gradient ``softmax(z) - (1 - eps) * onehot(t) -
    eps / V``, cast to the layer's dtype before the two matmuls, as the unfused backward casts
    it. On CUDA the classes are padded to a multiple of ``VOCAB_ALIGN`` with zero rows of ``w``
    whose logits are -inf before the softmax (rule X7): a vocabulary like GPT-2's 50257 makes
    cuBLAS pick unaligned fp16 kernels several times slower."""
    rows_h = h.reshape(-1, h.shape[-1])
    rows_t = target.reshape(-1)
    n, vocab = rows_h.shape[0], w.shape[0]
    padded = padded_vocab(w)
    w_p = F.pad(w, (0, 0, 0, padded - vocab)) if padded != vocab else w
    b_p = F.pad(b, (0, padded - vocab)) if b is not None and padded != vocab else b
    chunk = max(1, CHUNK_ELEMENTS // max(1, padded))
    eps = float(label_smoothing)
    # the gradients computed ahead are of loss * scale / count: the unfused backward's
    # values when the incoming gradient is the loss scale (or 1 without scaling)
    count = (rows_t != ignore_index).sum() if reduction == "mean" else None
    factor = scale.float() if scale is not None else torch.ones((), device=h.device)
    if count is not None:
        factor = factor / count.clamp(min=1).to(factor)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(rows_h) if need[0] else None
    grad_w = torch.zeros(w_p.shape, dtype=torch.float32, device=w.device) if need[1] else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=b.device) if need[2] else None
    w_t = w_p.t()
    for start in range(0, n, chunk):
        hs, ts = rows_h[start:start + chunk], rows_t[start:start + chunk]
        out = logits[start:start + chunk] if logits is not None else None
        if out is not None and out.dtype == h.dtype:  # straight into the returned tensor
            low = torch.mm(hs, w_t, out=out) if b_p is None else torch.addmm(b_p, hs, w_t, out=out)
        else:
            low = F.linear(hs, w_p, b_p)
        if padded != vocab:
            low[:, vocab:] = float("-inf")  # the padding's logits: no share of the softmax
        if out is not None and out.dtype != h.dtype:
            low = out.copy_(low)  # fp32 logits returned: the cast is the copy into the buffer
        # one fused pass, the fp32 cast inside: log_softmax(z) with z = low.float()
        logp = torch.log_softmax(low, dim=-1, dtype=torch.float32)
        valid = ts != ignore_index
        safe = torch.where(valid, ts, torch.zeros_like(ts)).unsqueeze(1)
        row_loss = -logp.gather(1, safe).squeeze(1)
        if eps:
            row_loss = (1.0 - eps) * row_loss - eps * logp[:, :vocab].mean(dim=-1)
        total += torch.where(valid, row_loss, torch.zeros_like(row_loss)).sum()
        if any(need):
            g = logp.exp_()  # the softmax, in place
            if eps:
                g[:, :vocab].sub_(eps / vocab)
            g.scatter_add_(1, safe, torch.full_like(safe, -(1.0 - eps), dtype=g.dtype))
            # times loss scale / count, 0 on ignored rows, and cast to the layer's dtype: one pass
            g_low = torch.mul(g, (valid.to(g.dtype) * factor).unsqueeze(1),
                              out=torch.empty_like(g, dtype=h.dtype))
            del g, logp
            if need[0]:
                torch.mm(g_low, w_p, out=grad_h[start:start + chunk])
            if need[1]:
                grad_w += torch.mm(g_low.t(), hs)
            if need[2]:
                grad_b += g_low[:, :vocab].sum(0, dtype=torch.float32)
        del low, out
    if count is not None:
        total = total / count.to(total)  # torch's mean: nan when every row is ignored
    return total, grad_h, None if grad_w is None else grad_w[:vocab], grad_b


def padded_vocab(w: torch.Tensor) -> int:
    """The class count the chunks compute: ``w``'s rows, rounded up to ``VOCAB_ALIGN`` on CUDA."""
    vocab = w.shape[0]
    return vocab + (-vocab) % VOCAB_ALIGN if w.is_cuda else vocab


def logits_buffer(h: torch.Tensor, w: torch.Tensor, dtype) -> torch.Tensor:
    """The ``(rows, padded V)`` tensor the chunks write their logits into."""
    return h.new_empty((h.numel() // h.shape[-1], padded_vocab(w)), dtype=dtype)


def _returned(buffer: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The logits as the linear layer returns them: ``h``'s leading sizes, ``V`` classes."""
    return buffer[:, :w.shape[0]].view(*h.shape[:-1], w.shape[0])


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: the loss and, chunk by chunk, the gradients (``_chunked_cross_entropy``), and
    with ``logits_dtype`` the logits too; backward multiplies the gradients by the incoming
    one and adds what flows back through the returned logits, when anything read them."""

    @staticmethod
    def forward(ctx, h, w, b, target, reduction, ignore_index, label_smoothing, scale, logits_dtype):
        buffer = logits_buffer(h, w, logits_dtype) if logits_dtype is not None else None
        total, grad_h, grad_w, grad_b = _chunked_cross_entropy(
            h, w, b, target, reduction, ignore_index, label_smoothing, scale,
            tuple(ctx.needs_input_grad[:3]), buffer)
        ones = torch.ones((), device=h.device)
        ctx.save_for_backward(grad_h, grad_w, grad_b, scale if scale is not None else ones,
                              h if buffer is not None else None, w if buffer is not None else None)
        ctx.shapes = (h.shape, w.dtype, None if b is None else b.dtype)
        ctx.set_materialize_grads(False)
        if buffer is None:
            return total
        return total, _returned(buffer, h, w)

    @staticmethod
    def backward(ctx, grad_out, grad_logits=None):
        grad_h, grad_w, grad_b, scale, h, w = ctx.saved_tensors
        h_shape, w_dtype, b_dtype = ctx.shapes
        out_h = out_w = out_b = None
        if grad_out is not None:
            ratio = grad_out / scale  # 1 when the incoming gradient is the loss scale
            out_h = None if grad_h is None else (grad_h * ratio.to(grad_h.dtype)).reshape(h_shape)
            out_w = None if grad_w is None else grad_w * ratio
            out_b = None if grad_b is None else grad_b * ratio
        if grad_logits is not None:  # something else read the returned logits
            g = grad_logits.reshape(-1, grad_logits.shape[-1]).to(h.dtype)
            rows = h.reshape(-1, h.shape[-1])
            if ctx.needs_input_grad[0]:
                extra = (g @ w).reshape(h_shape)
                out_h = extra if out_h is None else out_h + extra
            if ctx.needs_input_grad[1]:
                extra = (g.t() @ rows).float()
                out_w = extra if out_w is None else out_w + extra
            if ctx.needs_input_grad[2]:
                extra = g.sum(0, dtype=torch.float32)
                out_b = extra if out_b is None else out_b + extra
        out_w = None if out_w is None else out_w.to(w_dtype)
        out_b = None if out_b is None else out_b.to(b_dtype)
        return out_h, out_w, out_b, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                         target: torch.Tensor, *, reduction: str = "mean", ignore_index: int = -100,
                         label_smoothing: float = 0.0, scale: torch.Tensor | None = None,
                         logits: bool | torch.dtype = False):
    """``F.cross_entropy(F.linear(h, w, b).float().view(-1, V), target.view(-1))`` without
    holding the fp32 logits of every row: rows in chunks of at most ``CHUNK_ELEMENTS`` logits,
    each chunk's logits in ``h``'s dtype and its softmax in fp32, as the unfused graph computes
    them (rule X3 of the fused_cross_entropy pass). ``scale``: the loss scale in fp16 training
    (rule X5), so that the gradients computed ahead do not underflow. ``logits=True`` returns
    ``(loss, logits)``, the logits ``F.linear(h, w, b)`` computed once, chunk by chunk, and
    differentiable (rule X4: a model that returns its logits as well as its loss);
    ``logits=torch.float32`` returns them widened to fp32 (what the model's ``.float()`` would
    make of them), without holding a low copy as well.

        >>> loss = linear_cross_entropy(hidden.half(), lm_head.weight.half(), None, labels)
        >>> loss, logits = linear_cross_entropy(hidden, weight, None, labels, logits=True)
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: linear_cross_entropy computes 'mean' or 'sum'")
    if torch.compiler.is_compiling():  # X6: one graph for inductor, which fuses it itself
        out = F.linear(h, w, b)
        z = out.float()
        loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
        if logits is False:
            return loss
        return loss, (out if logits is True else out.to(logits))
    dtype = (h.dtype if logits is True else logits) if logits is not False else None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b)):
        return _LinearCrossEntropy.apply(h, w, b, target, reduction, ignore_index, label_smoothing,
                                         scale, dtype)
    with torch.no_grad():  # evaluation: the same chunked loss, no gradients computed ahead
        buffer = logits_buffer(h, w, dtype) if dtype is not None else None
        loss = _chunked_cross_entropy(h, w, b, target, reduction, ignore_index, label_smoothing,
                                      scale, (False, False, False), buffer)[0]
        return (loss, _returned(buffer, h, w)) if dtype is not None else loss


class _SiluMul(torch.autograd.Function):
    """``silu(a) * b`` keeping ``a`` and ``b`` for backward, not ``silu(a)`` as well: backward
    computes it again (rule P4 of the fused_patterns pass)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return _silu_mul_backward(grad, a, b, F.silu(a), *ctx.needs_input_grad[:2])


def _silu_mul_backward(grad, a, b, silu, need_a: bool, need_b: bool):
    """The gradients of ``silu(a) * b`` for ``a`` and ``b`` (None where not needed), given
    ``silu = silu(a)``: P4's backward, and P5's for the gated MLP."""
    grad_a = grad_b = None
    if need_a:
        grad_a = torch.ops.aten.silu_backward(grad * b, a).sum_to_size(a.shape).to(a.dtype)
    if need_b:
        grad_b = (grad * silu).sum_to_size(b.shape).to(b.dtype)
    return grad_a, grad_b


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.silu(a) * b`` (the gated MLP of Llama, Mistral, Qwen: ``act(gate(x)) * up(x)``) that
    keeps only its two inputs for backward: one activation-sized tensor less per layer, for
    one more elementwise pass in backward (rule P4).

        >>> out = silu_mul(gate, up)
    """
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _SiluMul.apply(a, b)
    return F.silu(a) * b


def _activation(x: torch.Tensor, gate: torch.Tensor | None, act: str) -> torch.Tensor:
    """What ``activation_linear`` feeds its matrix product: ``act(x)``, times ``gate`` for
    ``act="silu_mul"`` (computed as P4's ``silu_mul`` computes it)."""
    if act == "silu_mul":
        return F.silu(x) * gate
    if act.startswith("gelu"):
        return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")
    return F.relu(x) if act == "relu" else F.silu(x)


def _activation_backward(grad: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    if act.startswith("gelu"):
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh" if act == "gelu_tanh" else "none")
    if act == "relu":  # relu(x) > 0 exactly where x > 0: x serves as the threshold's input
        return torch.ops.aten.threshold_backward(grad, x, 0)
    return torch.ops.aten.silu_backward(grad, x)


def _product(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool):
    """``F.linear(a, weight, bias)``, or (``transposed``) ``addmm(bias, a.view(-1, K), weight)``:
    Hugging Face's Conv1D (GPT-2)."""
    if transposed:
        flat = a.reshape(-1, a.shape[-1])
        return torch.mm(flat, weight) if bias is None else torch.addmm(bias, flat, weight)
    return F.linear(a, weight, bias)


class _ActivationLinear(torch.autograd.Function):
    """``act(x)`` and the matrix product that reads it, keeping ``x`` (and the gate) for
    backward, not ``act(x)`` as well: backward computes it again (rule P5 of fused_patterns)."""

    @staticmethod
    def forward(ctx, x, gate, weight, bias, act, transposed):
        ctx.save_for_backward(x, gate, weight)
        ctx.options = (act, transposed, None if bias is None else bias.dtype)
        return _product(_activation(x, gate, act), weight, bias, transposed)

    @staticmethod
    def backward(ctx, grad):
        x, gate, weight = ctx.saved_tensors
        act, transposed, bias_dtype = ctx.options
        a_shape = x.shape if gate is None else torch.broadcast_shapes(x.shape, gate.shape)
        need_x, need_gate, need_w, need_b = ctx.needs_input_grad[:4]
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_gate = grad_w = grad_b = None
        silu = F.silu(x) if act == "silu_mul" else None
        if need_w:
            a = (silu * gate if silu is not None else _activation(x, gate, act)).reshape(-1, a_shape[-1])
            grad_w = a.t().mm(rows) if transposed else rows.t().mm(a)
        if bias_dtype is not None and need_b:
            grad_b = rows.sum(0).to(bias_dtype)
        if need_x or need_gate:
            grad_a = (rows.mm(weight.t()) if transposed else rows.mm(weight)).view(a_shape)
            if act == "silu_mul":
                grad_x, grad_gate = _silu_mul_backward(grad_a, x, gate, silu, need_x, need_gate)
            else:
                grad_x = _activation_backward(grad_a, x, act).sum_to_size(x.shape)
        return grad_x, grad_gate, grad_w, grad_b, None, None


def activation_linear(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor,
                      bias: torch.Tensor | None, act: str, transposed: bool = False) -> torch.Tensor:
    """``F.linear(act(x), weight, bias)`` (``transposed``: ``addmm(bias, act(x).view(-1, K),
    weight)``, Hugging Face's Conv1D) that keeps ``x`` for backward and computes ``act(x)``
    again there, instead of keeping the activation's output as well: one MLP-wide tensor less
    per layer (rule P5). ``act``: "gelu", "gelu_tanh", "relu", "silu", or "silu_mul" (then
    ``act(x)`` is ``silu(x) * gate``, the gated MLP).

        >>> out = activation_linear(h, None, fc2.weight, fc2.bias, "gelu")
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, gate, weight, bias)):
        return _ActivationLinear.apply(x, gate, weight, bias, act, transposed)
    return _product(_activation(x, gate, act), weight, bias, transposed)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, the ops Hugging Face's formula runs."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Rotary(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` with a backward of five kernels, two casts more
    where the phases are fp32 and ``x`` is not (rule P6)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotary(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # autograd's values: each product's gradient in x's dtype, then their sum; the
        # rotate_half's transpose (a, b) -> (b, -a) written at once, not as two zero-filled
        # slices added (fp32 inside instead measured 1.2x-1.3x the gradient error of HF Llama
        # and Qwen2 against fp32: tests/test_hf_models.py)
        straight = (grad * cos).to(ctx.x_dtype)
        g = (grad * sin).to(ctx.x_dtype)
        half = g.shape[-1] // 2
        return straight + torch.cat((g[..., half:], -g[..., :half]), dim=-1), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (Hugging Face's ``apply_rotary_pos_emb``, one of q and
    k) computing the same forward, and autograd's gradient in five kernels instead of nine
    through ``cat``, ``neg`` and the two slices' zero-filled gradients (seven instead of eleven
    with fp32 phases, each product's gradient cast to ``x``'s dtype; rule P6). Phases that
    require a gradient (learned ones) take autograd's path.

        >>> q = rotary(q, cos, sin)
    """
    if torch.is_grad_enabled() and x.requires_grad and not (cos.requires_grad or sin.requires_grad):
        return _Rotary.apply(x, cos, sin)
    return _rotary(x, cos, sin)  # learned phases: autograd's backward, theirs too
