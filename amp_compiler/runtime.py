"""Functions the rewritten graphs call at run time (they appear by name in ``amp.graph_module.code``)."""

from __future__ import annotations

import torch
from torch import nn

from amp_compiler.scaler import unscale_grad


def module_in_dtype(module: nn.Module, dtype: torch.dtype, *args, **kwargs):
    """Run a leaf module (e.g. ``nn.LSTM``) with its floating parameters cast to ``dtype``.

    The module's own parameters stay fp32 (master weights); gradients flow back to them through
    the casts. Used in training mode; inference folding stores a low-precision copy instead.

        >>> out, (h, c) = module_in_dtype(lstm, torch.bfloat16, x.bfloat16())
    """
    scale = kwargs.pop("_amp_unscale", None)  # rule L4 (fp16 training): gradients unscaled
    params = {}
    for n, p in module.named_parameters():
        if scale is not None:
            p = unscale_grad(p, scale)
        params[n] = p.to(dtype) if p.is_floating_point() else p
    return torch.func.functional_call(module, params, args, kwargs)


def module_unscaled(module: nn.Module, scale: torch.Tensor, *args, **kwargs):
    """Run a leaf module (``nn.BatchNorm1d`` left whole by fx tracing) with the gradients of its
    parameters divided by the loss scale (rule L4: ``.grad`` holds true gradients).

        >>> y = module_unscaled(bn, scaler.scale_tensor(), x)
    """
    params = {n: unscale_grad(p, scale) for n, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args, kwargs)
