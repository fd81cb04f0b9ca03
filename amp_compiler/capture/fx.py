"""Capture by ``torch.fx`` symbolic tracing (no example inputs).

The tracer traces *through* every module (parameters become ``get_attr`` nodes, so their casts
are visible), except recurrent modules, whose forward branches on input properties and which
stay one ``rnn`` node. A custom ``torch.autograd.Function`` stays ONE node that calls
``Fn.apply`` (``capture.functions``), so training runs the Function's own backward. The graph
is then functionalized (``capture.functionalize``).

    >>> gm = symbolic_capture(model)
"""

from __future__ import annotations

import inspect
import os
import traceback

import torch
import torch.fx as fx
from torch import nn

from amp_compiler.capture.functionalize import functionalize
from amp_compiler.capture.functions import _function_apply_as, _fx_apply
from amp_compiler.errors import TraceError
from amp_compiler.passes import graph as passes_graph
from amp_compiler.passes.kinds import leaf_kind

class _ThroughTracer(fx.Tracer):
    """Traces through every module except recurrent ones; remembers where it was on failure."""

    def __init__(self) -> None:
        super().__init__()
        self.path_stack: list[str] = []
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return leaf_kind(m) is not None

    def call_module(self, m, forward, args, kwargs):
        self.path_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_at = self.failed_at or self.path_stack[-1]
            raise
        finally:
            self.path_stack.pop()


def _own_folders() -> set[str]:
    """The folders of our own pipeline files (the package, its rooms and passes/); the bundled
    reference models are the user's kind of code and stay visible."""
    roots = {os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # amp_compiler/
             os.path.dirname(os.path.abspath(passes_graph.__file__))}
    return {folder for root in roots for folder, _, _ in os.walk(root)
            if os.path.basename(folder) != "models"}


def user_frame(tb) -> str:
    """The innermost traceback frame outside torch and our own files: the model line that broke
    tracing."""
    own = _own_folders()
    frames = [f for f in traceback.extract_tb(tb)
              if "/torch/" not in f.filename.replace("\\", "/")
              and os.path.dirname(os.path.abspath(f.filename)) not in own]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} `{(f.line or '').strip()}`"


def symbolic_capture(model: nn.Module) -> fx.GraphModule:
    """fx.symbolic_trace through every submodule, then ``functionalize``; TraceError names the
    module path and line."""
    tracer = _ThroughTracer()
    # optional arguments (``targets=None``) take their defaults: fx cannot branch on them
    params = inspect.signature(model.forward).parameters.values()
    concrete = {p.name: None for p in params if p.default is None}
    # fx runs an in-place op whose operands are all real tensors (``self.buf.mul_(0.9)``) once,
    # at capture, instead of recording it: version counters show it, the copies undo it
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    versions = {name: t._version for name, t in tensors.items()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with _function_apply_as(_fx_apply):
            graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 -- any tracing failure becomes one typed error
        where = tracer.failed_at or "<root>"
        raise TraceError(
            f"model is not symbolically traceable at `{where or '<root>'}` ({user_frame(exc.__traceback__)}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass "
            f"example_inputs=(...) to convert() to use torch.export instead") from exc
    finally:
        written = [name for name, t in tensors.items() if t._version != versions[name]]
        with torch.no_grad():
            for name in written:
                if name in buffers:
                    tensors[name].copy_(buffers[name])
    if written:
        raise TraceError(
            f"forward writes into `{written[0]}` with an in-place op on stored tensors only (e.g. "
            f"`self.{written[0]}.mul_(0.9)`): fx tracing would run it once at capture instead of on "
            f"every call. Pass example_inputs=(...) to convert() to use torch.export, or write the "
            f"update out of place and assign it back")
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    functionalize(gm)
    return gm
