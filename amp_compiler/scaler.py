"""Dynamic loss scaling for fp16 training, drop-in compatible with ``torch.amp.GradScaler``.

:class:`LossScaler` is a subclass of ``torch.amp.GradScaler``: same constructor arguments, methods
and ``state_dict`` keys, so training code and checkpoints move freely between the two. It adds
what a compiled mixed-precision graph needs:

* a floor and a ceiling on the scale (``min_scale`` / ``max_scale``);
* :attr:`LossScaler.last_overflow`, the names of the parameters whose gradients overflowed at the
  last skipped step;
* :meth:`LossScaler.scale_tensor`, the one scale tensor a graph can hold on to, together with
  :func:`scale_loss_grad`, which multiplies the loss gradient by it inside the graph's backward
  (so the forward returns the true loss and no ``scaler.scale(loss)`` call is needed);
* a typed error when the model's trainable parameters are fp16/bf16 instead of fp32 masters;
* agreement between ranks under ``torch.distributed``: every rank skips the same steps.

bf16 needs no loss scaling; callers simply do not create a scaler for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from amp_compiler.errors import ConfigError, LossScalerError
from amp_compiler.passes.runtime import scale_loss_grad, unscale_grads

_READY = torch.amp.grad_scaler.OptState.READY

__all__ = ["LossScaler", "new_scaler", "scale_loss_grad", "unscale_grads"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class LossScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` with a scale floor/ceiling, overflow diagnostics and in-graph scaling.

    Arguments, defaults, methods and ``state_dict`` are GradScaler's (a LossScaler checkpoint loads
    into a GradScaler and back), except that ``device`` defaults to ``"cuda"`` only when CUDA is
    available. Extra keyword-only arguments:

    Args:
        min_scale: the scale never goes below this after :meth:`update` (default 1.0).
        max_scale: the scale never goes above this (default 2**24).

    Example::

        scaler = LossScaler().track(model.named_parameters())
        for x, y in data:
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scaler.last_overflow:  # with a fused optimizer on GPU, reading this syncs
                print("skipped step, non-finite gradients in", scaler.last_overflow)

    With a graph that scales its own loss gradient (``scale_loss_grad(loss, scaler.scale_tensor())``
    inside the model), call ``loss.backward()`` directly and keep ``step()`` / ``update()``.

    Under ``torch.distributed`` the found-inf flags are all-reduced (MAX) once per optimizer unscale
    over :attr:`process_group` (None: the default group), so all ranks skip the same steps.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # GradScaler compares self._device with Tensor.device.type, so it must stay a bare type
        # string; an explicit index is remembered for where scale_tensor() creates the scale.
        self._home_device = torch.device(device)
        if not min_scale > 0.0:
            raise LossScalerError(f"min_scale must be > 0, got {min_scale}")
        if min_scale > max_scale:
            raise LossScalerError(
                f"min_scale ({min_scale}) must not exceed max_scale ({max_scale})"
            )
        self._min_scale = float(min_scale)
        self._max_scale = float(max_scale)
        super().__init__(
            self._home_device.type,
            init_scale=self._clamp(init_scale),
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            enabled=enabled,
        )
        self.process_group: Any = None
        # True once a graph divides its gradients by the scale in backward (unscale_grads):
        # .grad then holds true values, and unscale_/step only look for infs and NaNs
        self.unscaled_in_backward = False
        self._param_names: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._unit_scale: torch.Tensor | None = None
        self._reset_overflow_state()

    def _reset_overflow_state(self) -> None:
        # Found-inf flags of the current iteration, by optimizer; filled by _unscale_grads_.
        self._found_by_optimizer: dict[int, dict[torch.device, torch.Tensor]] = {}
        self._overflow_names: list[str] = []
        # Fused-optimizer steps whose skip decision is still on the device: (optimizer, flags).
        self._overflow_pending: list[tuple[torch.optim.Optimizer, list[torch.Tensor]]] = []
        self._iteration_open = False

    # ------------------------------------------------------------------ public additions

    @property
    def min_scale(self) -> float:
        """Floor of the scale."""
        return self._min_scale

    @property
    def max_scale(self) -> float:
        """Ceiling of the scale."""
        return self._max_scale

    def track(
        self, named_parameters: Iterable[tuple[str, torch.Tensor]] | nn.Module
    ) -> LossScaler:
        """Name parameters for :attr:`last_overflow` and error messages; returns ``self``.

        Accepts ``model.named_parameters()`` (or the module itself). Calls accumulate, so several
        models can be tracked. Untracked parameters are named ``param[i]`` after their position
        in their optimizer's param groups.
        """
        if isinstance(named_parameters, nn.Module):
            named_parameters = named_parameters.named_parameters()
        for name, param in named_parameters:
            self._param_names[param] = name
        return self

    @property
    def last_overflow(self) -> list[str]:
        """Names of the parameters whose gradients were non-finite at the last skipped step.

        Empty after a clean step. Names are local to this rank: under ``torch.distributed`` a rank
        may skip because another rank overflowed, and then lists nothing. With a fused optimizer
        on an accelerator the skip decision stays on the device until this property is read; read
        it before ``zero_grad()`` releases the gradients it inspects.
        """
        if self._overflow_pending:
            self._resolve_pending()
        return list(self._overflow_names)

    def scale_tensor(self, device: str | torch.device | None = None) -> torch.Tensor:
        """Return the scale tensor itself, creating it on ``device`` if it does not exist yet.

        The same object is returned on every call for the scaler's lifetime: :meth:`update` and
        :meth:`load_state_dict` modify it in place, so a compiled graph that captured it always
        multiplies by the current scale. When the scaler is disabled, a constant 1.0 tensor is
        returned instead (scaling is then a pass-through, like GradScaler's disabled mode).
        """
        want = self._home_device if device is None else torch.device(device)
        if not self._enabled:
            if self._unit_scale is None:
                self._unit_scale = torch.ones((), dtype=torch.float32, device=want)
            return self._unit_scale
        if self._scale is None:
            self._lazy_init_scale_growth_tracker(want)
        scale = self._scale
        assert scale is not None
        if device is not None and not _same_device(scale.device, want):
            raise LossScalerError(
                f"scale_tensor(device={want}) but the scale already lives on {scale.device}; "
                "a scaler has exactly one scale tensor, create the scaler's graph on one device"
            )
        return scale

    # ------------------------------------------------------------------ GradScaler overrides

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self._enabled:
            self._require_scale("unscale_")
        super().unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if not self._enabled:
            return super().step(optimizer, *args, **kwargs)
        self._require_scale("step")
        if not self._iteration_open:
            # First step since update(): last_overflow now describes this iteration.
            self._overflow_names = []
            self._overflow_pending = []
            self._iteration_open = True

        if self.unscaled_in_backward and self._per_optimizer_states[id(optimizer)]["stage"] is _READY:
            # the gradients are true already: look for infs now, so that a fused optimizer is
            # handed no grad_scale to divide by (GradScaler passes one while READY)
            self.unscale_(optimizer)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused optimizers skip on the device from the found_inf tensor GradScaler hands them;
            # asking whether they skipped would cost a host sync, so defer it to last_overflow.
            retval = super().step(optimizer, *args, **kwargs)
            flags = list(self._found_by_optimizer.get(id(optimizer), {}).values())
            if flags:
                self._overflow_pending.append((optimizer, flags))
            return retval

        # GradScaler skips optimizer.step() exactly when it found infs (after its own host sync);
        # a step pre-hook tells us which way it went without reading the flags a second time.
        if not hasattr(optimizer, "register_step_pre_hook"):
            retval = super().step(optimizer, *args, **kwargs)
            flags = list(self._found_by_optimizer.get(id(optimizer), {}).values())
            if any(float(f.item()) for f in flags):
                self._add_overflow_names(optimizer)
            return retval
        stepped: list[bool] = []

        def note_step(*_: Any) -> None:
            stepped.append(True)

        handle = optimizer.register_step_pre_hook(note_step)
        try:
            retval = super().step(optimizer, *args, **kwargs)
        finally:
            handle.remove()
        if not stepped:
            self._add_overflow_names(optimizer)
        return retval

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        if not self._enabled:
            return
        self._require_scale("update")
        if isinstance(new_scale, int):
            new_scale = float(new_scale)  # GradScaler only accepts float or Tensor
        super().update(new_scale)
        scale = self._scale
        assert scale is not None
        # In place and on the device: no sync, and graphs holding the tensor see the result.
        scale.clamp_(self._min_scale, self._max_scale)
        self._found_by_optimizer = {}
        self._iteration_open = False
        if self._overflow_pending and all(
            f.device.type == "cpu" for _, flags in self._overflow_pending for f in flags
        ):
            # Reading CPU flags costs nothing, and now is before zero_grad() drops the grads.
            self._resolve_pending()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if not self._enabled:
            return
        self._init_scale = self._clamp(self._init_scale)
        if self._scale is not None:
            self._scale.clamp_(self._min_scale, self._max_scale)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # Parameter identities, optimizers and device flags do not survive pickling.
        state["_param_names"] = None
        state["_found_by_optimizer"] = {}
        state["_overflow_pending"] = []
        state["_unit_scale"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._param_names = WeakIdKeyDictionary()

    def _unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool,
    ) -> dict[torch.device, torch.Tensor]:
        # Every unscale path (unscale_, step, the fused optimizers' _check_inf_per_device) funnels
        # through here exactly once per optimizer and iteration, which makes it the place for the
        # master-weight check and the one cross-rank flag reduction.
        self._check_master_weights(optimizer)
        if self.unscaled_in_backward:
            # the graph divided the gradients by the scale in backward (unscale_grads): only
            # look for non-finite values (multiplying by one leaves them exact)
            inv_scale = torch.ones_like(inv_scale)
        found = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        self._all_reduce_found_inf(found, inv_scale.device)
        self._found_by_optimizer[id(optimizer)] = found
        return found

    # ------------------------------------------------------------------ helpers

    def _clamp(self, value: float) -> float:
        return min(max(float(value), self._min_scale), self._max_scale)

    def _require_scale(self, funcname: str) -> None:
        if self._scale is None:
            raise LossScalerError(
                f"{funcname}() called before any loss was scaled: call scaler.scale(loss).backward(), "
                "or create the scale with scaler.scale_tensor() for a graph that scales its own "
                "loss gradient (scale_loss_grad)"
            )

    def _name_of(self, param: torch.Tensor, index: int) -> str:
        name = self._param_names.get(param)
        return name if name is not None else f"param[{index}]"

    def _check_master_weights(self, optimizer: torch.optim.Optimizer) -> None:
        index = 0
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad and param.dtype in _LOW_PRECISION:
                    dtype = str(param.dtype).removeprefix("torch.")
                    raise LossScalerError(
                        f"parameter '{self._name_of(param, index)}' is {dtype}: mixed-precision "
                        "training keeps fp32 master weights; convert the model with "
                        "amp_compiler.convert(model) instead of model.half()"
                    )
                index += 1

    def _all_reduce_found_inf(
        self, found: dict[torch.device, torch.Tensor], anchor: torch.device
    ) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        # MAX keeps the flags 0/1: fused optimizers skip only when found_inf == 1, which a SUM over
        # ranks would break. Exactly one collective per call keeps the ranks' calls matched.
        op = torch.distributed.ReduceOp.MAX
        if len(found) == 1:
            (flag,) = found.values()
            torch.distributed.all_reduce(flag, op=op, group=self.process_group)
            return
        if not found:
            # No local gradients: still take part, and honour the other ranks' verdict.
            found[anchor] = torch.zeros((), dtype=torch.float32, device=anchor)
            torch.distributed.all_reduce(found[anchor], op=op, group=self.process_group)
            return
        combined = torch.stack([f.to(anchor, non_blocking=True) for f in found.values()]).amax()
        torch.distributed.all_reduce(combined, op=op, group=self.process_group)
        for flag in found.values():
            flag.copy_(combined, non_blocking=True)

    def _add_overflow_names(self, optimizer: torch.optim.Optimizer) -> None:
        for name in _nonfinite_params(optimizer, self._name_of):
            if name not in self._overflow_names:
                self._overflow_names.append(name)

    def _resolve_pending(self) -> None:
        pending, self._overflow_pending = self._overflow_pending, []
        for optimizer, flags in pending:
            anchor = flags[0].device
            if torch.stack([f.to(anchor, torch.float32) for f in flags]).sum().item() > 0:
                self._add_overflow_names(optimizer)


def _nonfinite_params(optimizer: torch.optim.Optimizer, name_of: Any) -> list[str]:
    """Names of the optimizer's parameters whose gradient holds an inf or NaN (one host sync)."""
    indexed: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            grad = param.grad
            if hasattr(grad, "to_local"):  # FSDP2 DTensor: each rank names its own shard
                grad = grad.to_local()
            if grad is not None:
                indexed.append((index, param, grad._values() if grad.is_sparse else grad))
            index += 1
    if not indexed:
        return []
    anchor = indexed[0][2].device
    with torch.no_grad():
        finite = torch.stack(
            [torch.isfinite(g).all().to(anchor) for _, _, g in indexed]
        ).tolist()
    return [name_of(p, i) for (i, p, _), ok in zip(indexed, finite) if not ok]


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    # "cuda" (no index) matches whichever CUDA device the tensor is on.
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


def new_scaler(device_type: str, loss_scale):
    """A LossScaler for ``loss_scale`` ("dynamic" or a positive number: static scaling)."""
    if loss_scale == "dynamic":
        return LossScaler(device_type)
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and loss_scale > 0:
        # static scaling: the floor and ceiling pin the scale; overflowing steps are still skipped
        return LossScaler(device_type, init_scale=float(loss_scale), min_scale=float(loss_scale),
                          max_scale=float(loss_scale))
    raise ConfigError(f"loss_scale={loss_scale!r}: use 'dynamic', a positive number, or None")
