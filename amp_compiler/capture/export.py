"""Capture by ``torch.export`` (non-strict), when example inputs are given.

Every dimension is dynamic unless the model fixes it (``capture.shapes``; a batch-1 example is
widened to 2 first so that its batch stays symbolic); the exported module takes the same
positional and keyword inputs as the model and holds the user's own Parameter objects. Custom
``torch.autograd.Function`` calls stay one node (``capture.functions``); the graph is then
functionalized. Failures become one ``TraceError`` that says what to do.

    >>> gm = export_capture(model, (torch.randn(2, 784),))
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

from torch import nn
import torch.fx as fx

from amp_compiler.capture.functionalize import functionalize
from amp_compiler.capture.functions import _PENDING, _export_apply, _function_apply_as, _keep_function_calls
from amp_compiler.capture.fx import user_frame
from amp_compiler.capture.libraries import prepare_for_export
from amp_compiler.capture.shapes import default_dynamic_shapes, widen_batch
from amp_compiler.errors import ConfigError, TraceError, UnsupportedModelError

log = logging.getLogger("amp_compiler")


def export_capture(model: nn.Module, example_inputs: tuple, *, example_kwargs: dict | None = None,
                   dynamic_shapes: Any = "auto") -> fx.GraphModule:
    """torch.export (non-strict) with every dimension dynamic unless the model fixes it
    (``amp_compiler.capture.shapes``); returns the exported module, which takes the same positional
    and keyword inputs as ``model``. ``dynamic_shapes``: "auto" (that default), None (every
    dimension static) or torch.export's own spec, passed through."""
    from torch.export import export  # torch.export loads its own machinery: only when used

    prepare_for_export(model)
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    attempts = [(args, kwargs, dynamic_shapes)]
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "auto":
            raise ConfigError(f"dynamic_shapes={dynamic_shapes!r}: use 'auto', None, or torch.export's "
                              f"dynamic_shapes spec")
        wide = widen_batch(args, kwargs)
        attempts = [(a, k, default_dynamic_shapes(model.forward, a, k))
                    for a, k in ([wide] if wide is not None else []) + [(args, kwargs)]]
    try:
        for i, (a, k, shapes) in enumerate(attempts):
            try:
                # torch prints the partial graph of a failed export to stderr: hundreds of lines
                # that our TraceError (or the dynamo fallback) replaces; kept at debug level
                with _function_apply_as(_export_apply), contextlib.redirect_stderr(io.StringIO()) as err:
                    try:
                        ep = export(model, a, kwargs=k or None, dynamic_shapes=shapes, strict=False)
                    finally:
                        if err.getvalue():
                            log.debug("torch.export said: %s", err.getvalue())
                break
            except Exception:  # noqa: BLE001 -- the widened example failed: try the one given
                _PENDING.clear()
                if i == len(attempts) - 1:
                    raise
                log.info("capture with the batch widened to 2 failed; capturing the example as "
                         "given (its batch of 1 is then fixed)")
        gm = ep.module()
        _keep_function_calls(gm)
        functionalize(gm)
    except (UnsupportedModelError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001
        ours = _cause_of_type(exc, UnsupportedModelError)  # raised inside torch's tracing
        if ours is not None:
            raise ours from exc
        raise TraceError(f"torch.export could not capture the model ({user_frame(exc.__traceback__)}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                         f"{_export_hint(exc)}") from exc
    finally:
        _PENDING.clear()
    _rebind_parameters(gm, model)
    return gm


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (torch wraps errors while tracing)."""
    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _cause_of_type(exc: BaseException, kind: type) -> BaseException | None:
    return next((e for e in _chain(exc) if isinstance(e, kind)), None)


def _export_hint(exc: BaseException) -> str:
    """What to do about a torch.export failure: control-flow advice only where it applies."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    chain = _chain(exc)
    if any(isinstance(e, GuardOnDataDependentSymNode) or "data-dependent" in str(e).lower()
           or "data dependent" in str(e).lower() for e in chain):
        return ("Data-dependent Python control flow cannot be captured: convert with "
                "capture='dynamo' (the branch runs eagerly between captured graphs), rewrite it "
                "with torch.where / torch.cond, or convert the submodules that are traceable")
    # an output (or input) class torch.export cannot flatten: torch >= 2.12 names pytree,
    # torch 2.11 fails on hashing the unregistered dataclass instead
    if any("pytree" in str(e).lower() or "unhashable type" in str(e) for e in chain):
        return ("forward takes or returns a class torch.export cannot flatten: register it as a "
                "pytree node (torch.utils._pytree.register_dataclass or register_pytree_node), "
                "or use tensors, tuples, lists and dicts")
    return ("Convert without example_inputs to use fx symbolic tracing instead, or see "
            "torch.export's troubleshooting guide for this error")


def _rebind_parameters(gm: nn.Module, model: nn.Module) -> None:
    """Make the exported module hold the user's own Parameter objects (fp32 master weights)."""
    originals = dict(model.named_parameters(remove_duplicate=False))
    for name, _ in list(gm.named_parameters(remove_duplicate=False)):
        if name in originals:
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if owner._parameters.get(leaf) is not originals[name]:
                owner._parameters[leaf] = originals[name]
