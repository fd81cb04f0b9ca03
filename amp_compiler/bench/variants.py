"""A variant: one timed configuration of a model (fp32, autocast, amp, half; eager, compiled or
replayed from CUDA graphs), and the pieces every suite builds its variants from: its own copy of
the master's weights, its optimizer, its loss scaler, and a training or inference step closure
that does no work beyond what the variant's recipe itself does.

A training step is forward (the model returns the loss) + backward + AdamW step (fused on CUDA)
+ loss-scaler step for fp16: ``torch.amp.GradScaler`` for autocast, ``amp.scaler`` for amp (its
graph scales the loss gradient itself) or, where a conversion has none, ``LossScaler`` driven
like GradScaler. An inference step is a forward under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import amp_compiler
from amp_compiler.passes.runtime import scale_loss_grad

__all__ = ["Variant", "autocast_ctx", "no_ctx", "copy_of", "make_optimizer", "loss_scaler",
           "train_step", "infer_step"]


@dataclass
class Variant:
    """One timed configuration and what was measured on it."""

    name: str
    kind: str
    compiled: bool
    module: Any                               # what the step calls (possibly compiled)
    forward: Callable[[tuple], torch.Tensor]  # one forward, as the step runs it
    step: Callable[[tuple], Any]              # one timed step; returns the loss when training
    inputs: tuple
    amp: Any = None                           # the AmpModule, for cast_count()
    optimizer: Any = None
    scaler: Any = None
    scaler_note: str | None = None
    setup_s: float = 0.0
    times_ms: list[float] = field(default_factory=list)
    state_bytes: int | None = None
    peak_bytes: int | None = None
    error: float | None = None
    error_nonfinite: bool = False
    casts: int | None = None
    profiled_to_copy: int | None = None


def autocast_ctx(cfg) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of ``torch.autocast`` contexts on ``cfg.device`` at ``cfg.dtype``."""
    return lambda: torch.autocast(cfg.device.type, dtype=cfg.dtype)


def no_ctx() -> contextlib.AbstractContextManager:
    """The context of a variant that needs none (fp32, amp, half)."""
    return contextlib.nullcontext()


def copy_of(master: nn.Module, cfg, *, train: bool) -> nn.Module:
    """A variant's own copy of the fp32 master, on ``cfg.device``, in train or eval mode."""
    return copy.deepcopy(master).to(cfg.device).train(train)


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """AdamW at ``cfg.lr``."""
    # fused AdamW is one kernel per step on CUDA and lets GradScaler skip steps without a sync
    if cfg.cuda:
        return torch.optim.AdamW(params, lr=cfg.lr, fused=True)
    return torch.optim.AdamW(params, lr=cfg.lr, foreach=True)


def _scales_in_graph(amp) -> bool:
    """True when the converted graph multiplies its loss gradient itself (loss_scaling pass)."""
    return any(n.op == "call_function" and n.target is scale_loss_grad
               for n in amp.graph_module.graph.nodes)


def loss_scaler(kind: str, amp, cfg) -> tuple[Any, bool, str | None]:
    """(scaler, whether the graph scales the loss gradient itself, note) for a training variant.

    fp16 only: ``torch.amp.GradScaler`` for autocast; for amp its own ``amp.scaler`` (which the
    graph drives when the loss_scaling pass found a scalar loss) or, where the conversion has
    none, a ``LossScaler`` driven like GradScaler. ``cfg`` needs only ``dtype`` and ``device``.
    """
    if cfg.dtype != torch.float16 or kind not in ("autocast", "amp"):
        return None, False, None
    if kind == "autocast":
        return torch.amp.GradScaler(cfg.device.type), False, "GradScaler"
    if amp.scaler is not None:
        in_graph = _scales_in_graph(amp)
        return (amp.scaler, in_graph,
                "amp.scaler, in graph" if in_graph else "amp.scaler, scale(loss)")
    # no in-graph scaler yet: the same dynamic scaling, driven from outside
    return amp_compiler.LossScaler(cfg.device.type), False, "LossScaler, scale(loss)"


def train_step(module, ctx, opt, scaler, scale_in_graph: bool) -> Callable[[tuple], Any]:
    """A training step closure with no work beyond what the variant's recipe itself does."""
    if scaler is None:
        def step(inputs):
            with ctx():
                loss = module(*inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    elif scale_in_graph:
        def step(inputs):
            with ctx():
                loss = module(*inputs)
            loss.backward()  # the graph's backward already multiplies by the scale
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        def step(inputs):
            with ctx():
                loss = module(*inputs)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return loss
    return step


def infer_step(module, ctx) -> Callable[[tuple], Any]:
    """An inference step closure: one forward under ``no_grad``."""
    def step(inputs):
        with torch.no_grad(), ctx():
            module(*inputs)
    return step
