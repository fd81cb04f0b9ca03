"""Functions the rewritten graphs call at run time (they appear by name in ``amp.graph_module.code``)."""

from __future__ import annotations

import torch
from torch import nn


def module_in_dtype(module: nn.Module, dtype: torch.dtype, *args, **kwargs):
    """Run a leaf module (e.g. ``nn.LSTM``) with its floating parameters cast to ``dtype``.

    The module's own parameters stay fp32 (master weights); gradients flow back to them through
    the casts. Used in training mode; inference folding stores a low-precision copy instead.

        >>> out, (h, c) = module_in_dtype(lstm, torch.bfloat16, x.bfloat16())
    """
    params = {n: (p.to(dtype) if p.is_floating_point() else p) for n, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args, kwargs)
