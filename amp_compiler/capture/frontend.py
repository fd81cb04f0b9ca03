"""Front end: capture an nn.Module as an FX GraphModule, then describe it as a DataflowGraph.

Two capture paths:

- no ``example_inputs``: ``torch.fx`` symbolic tracing that traces *through* every module
  (parameters become ``get_attr`` nodes, so their casts are visible), except recurrent modules,
  whose forward branches on input properties and which stay one ``rnn`` node;
- with ``example_inputs``: ``torch.export.export(strict=False)`` with the batch dimension
  dynamic (``Dim.AUTO``; ``dynamic_shapes`` shaped like forward's signature, ``*args``
  included), then the exported program's module. Dtypes and shapes come from the fake tensors
  export records.

Both graphs are then functionalized (``amp_compiler.capture.functionalize``): in-place and ``out=`` calls become
their out-of-place forms, because a cast inserted in front of an in-place op would hand it a
copy to write into; writes into model inputs and buffers are written back with ``copy_``.

Complex values (``view_as_complex``, ``torch.fft``) are marked ``is_complex`` and never
``is_float``: export records their dtype; on the fx path the op's kind says it
(``passes.kinds.MAKES_COMPLEX`` / ``COMPLEX_TO_REAL``, otherwise an op with a complex input is
complex), and tensor attributes fx records as ``getattr`` (``z.real``, ``w.T``) get their kind
(``TENSOR_ATTRIBUTES``) instead of being read as metadata.

Both paths keep a custom ``torch.autograd.Function`` as ONE node that calls ``Fn.apply``
(``amp_compiler.capture.functions.FunctionCall``), so training runs the Function's own backward; the op is named after the
Function and, being in no policy table, stays fp32 unless the user overrides it.

    >>> gm, source = capture(model)                         # fx
    >>> gm, source = capture(model, (torch.randn(2, 784),)) # torch.export
    >>> graph = build_dataflow(gm)
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import io
import logging
import os
import sys
import operator
import traceback
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from amp_compiler.errors import ConfigError, TraceError, UnsupportedModelError
from amp_compiler.capture.functions import (_PENDING, _export_apply, _function_apply_as, _fx_apply,
                                    _keep_function_calls)
from amp_compiler.passes.graph import DataflowGraph
from amp_compiler.passes.fused_patterns import fuse_patterns
from amp_compiler.passes.hygiene import clean_graph
from amp_compiler.passes.sdpa_masks import fold_sdpa_masks
from amp_compiler.passes.kinds import (COMPLEX_TO_REAL, LEAF_MODULE_KINDS, MAKES_COMPLEX, target_name,
                                       TENSOR_ATTRIBUTES, torch_kind)
from amp_compiler.passes.policy import CAST_ONLY_ARGS, NON_FLOAT

log = logging.getLogger("amp_compiler")

# Arguments that carry integers or booleans by the op's definition (torch-level positions and
# keyword names). Only needed where tracing recorded no dtypes (the fx path): such inputs are
# never cast. Source: the torch.nn.functional / torch signatures.
NON_FLOAT_ARGS: dict[str, tuple] = {
    "embedding": (0, "input"),
    "masked_fill": (1, "mask"),
    "where": (0, "condition"),
    "cross_entropy": (1, "target"),
    "nll_loss": (1, "target"),
    "gather": (2, "index"),
    "scatter": (2, "index"),
    "index_put": (1, "indices"),
    "getitem": (1,),
}

# Consumers that read a value without computing on its floating-point data: they never cause a
# cast and do not count as low/fp32 neighbours.
_NO_CAST_KINDS = NON_FLOAT | {"cast", "getitem", "output"}


def _fqn(mod: type) -> str:
    return f"{mod.__module__}.{mod.__qualname__}"


def leaf_kind(m: nn.Module) -> str | None:
    """Kind of a leaf module class, subclasses included (resnet's BatchNorm2d is one)."""
    for cls in type(m).__mro__:
        kind = LEAF_MODULE_KINDS.get(_fqn(cls))
        if kind is not None:
            return kind
    return None


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


def _user_frame(tb) -> str:
    """The innermost traceback frame outside torch: the model line that broke tracing."""
    own = {os.path.dirname(os.path.abspath(__file__)),
           os.path.dirname(os.path.abspath(DataflowGraph.__module__ and sys.modules[DataflowGraph.__module__].__file__))}
    # our own pipeline files are skipped, the bundled reference models (a sub-folder) are not
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
            f"model is not symbolically traceable at `{where or '<root>'}` ({_user_frame(exc.__traceback__)}: "
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
    from amp_compiler.capture.functionalize import functionalize  # it reads node kinds defined here

    functionalize(gm)
    return gm


def export_capture(model: nn.Module, example_inputs: tuple, *, example_kwargs: dict | None = None,
                   dynamic_shapes: Any = "auto") -> fx.GraphModule:
    """torch.export (non-strict) with every dimension dynamic unless the model fixes it
    (``amp_compiler.capture.shapes``); returns the exported module, which takes the same positional
    and keyword inputs as ``model``. ``dynamic_shapes``: "auto" (that default), None (every
    dimension static) or torch.export's own spec, passed through."""
    from torch.export import export

    from amp_compiler.capture.libraries import prepare_for_export
    from amp_compiler.capture.shapes import default_dynamic_shapes, widen_batch

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
        from amp_compiler.capture.functionalize import functionalize

        functionalize(gm)
    except (UnsupportedModelError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001
        ours = _cause_of_type(exc, UnsupportedModelError)  # raised inside torch's tracing
        if ours is not None:
            raise ours from exc
        raise TraceError(f"torch.export could not capture the model ({_user_frame(exc.__traceback__)}: "
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


def capture(model: nn.Module, example_inputs: tuple | None = None, *,
            example_kwargs: dict | None = None,
            dynamic_shapes: Any = "auto") -> tuple[fx.GraphModule, str]:
    """Capture ``model``: ("fx" | "export"), see the module docstring; then ``tidy_captured``
    (metadata asserts, inert dropout, empty concatenations, dead code, dead writes, whole
    slices: rules H1-H7; SDPA mask folding S1-S3; fused formulas, GELU and RMSNorm, P1-P3),
    its remarks in ``gm.meta["amp_rewrites"]``."""
    if example_inputs is None and example_kwargs is None:
        gm, source = symbolic_capture(model), "fx"
    else:
        if example_inputs is None:
            example_inputs = ()
        elif not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        gm, source = export_capture(model, example_inputs, example_kwargs=example_kwargs,
                                    dynamic_shapes=dynamic_shapes), "export"
    gm.meta["amp_rewrites"] = tidy_captured(gm)
    return gm, source


def tidy_captured(gm: fx.GraphModule) -> list:
    """What every front end runs on a graph it captured, before the plan: hygiene (H1-H7), SDPA
    mask folding (S1-S3), fused formulas (P1-P3); their remarks in order."""
    return clean_graph(gm) + fold_sdpa_masks(gm) + fuse_patterns(gm)


# -- FX -> DataflowGraph ------------------------------------------------------------------------

def node_kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """Canonical kind of an FX node."""
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "param"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if node.target == "_guards_fn" or type(mod).__name__.endswith("GuardsFn"):
            return "guards"
        return leaf_kind(mod) or f"module:{type(mod).__name__}"
    if node.op == "call_function" and node.target is builtins.getattr:
        # ``z.real``, ``x.mT`` are tensors; ``x.shape``, ``x.dtype`` metadata
        attr = node.args[1] if len(node.args) > 1 else None
        return TENSOR_ATTRIBUTES.get(attr, "shape") if isinstance(attr, str) else "shape"
    if node.op == "call_function" and node.target is operator.getitem:
        return "getitem"
    return torch_kind(target_name(node))


def _meta_dtype(node: fx.Node):
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if isinstance(val, torch.Tensor):
        return val.dtype, tuple(val.shape), True
    if val is not None and hasattr(val, "dtype") and hasattr(val, "shape"):  # TensorMetadata
        return val.dtype, tuple(val.shape), True
    if isinstance(val, (tuple, list)):
        return None, None, True  # a tuple of tensors: known, but not one dtype
    return None, None, val is not None


def _holds_sizes(node: fx.Node) -> bool:
    """The recorded value is integers only: a SymInt, an int, or a tuple/Size of them (dynamo
    and export record size arithmetic such as ``b * (h // 4)`` as nodes)."""
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, (torch.SymInt, int, torch.SymBool, bool)) and not isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (tuple, list, torch.Size)) and val:
        return all(isinstance(v, (torch.SymInt, int)) and not isinstance(v, bool) for v in val)
    return False


# Submodule names torch.export invents (guard checks, metadata hooks): no module of the user's,
# so their nodes belong to the root in reports and overrides.
_EXPORT_INTERNAL_PATHS = frozenset({"_guards_fn", "_empty_nn_module_stack_from_metadata_hook"})


def _module_info(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str | None]:
    path, mtype = _raw_module_info(node, gm)
    if path.split(".")[0] in _EXPORT_INTERNAL_PATHS:
        return "", None
    return path, mtype


def _raw_module_info(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str | None]:
    if node.op == "get_attr":
        path = str(node.target).rpartition(".")[0]
        try:
            return path, _fqn(type(gm.get_submodule(path))) if path else None
        except AttributeError:
            return path, None
    if node.op == "call_module":
        return str(node.target), _fqn(type(gm.get_submodule(node.target)))
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    path, mtype = list(stack.values())[-1]
    if not isinstance(mtype, str):
        mtype = _fqn(mtype)
    path = path if isinstance(path, str) else str(path)
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path, mtype


def _castable(kind: str, position, key: str | None, has_meta: bool) -> bool:
    only = CAST_ONLY_ARGS.get(kind)
    if only is not None and position not in only and not (key == "input" and 0 in only):
        return False
    if not has_meta:
        nonfloat = NON_FLOAT_ARGS.get(kind, ())
        if position in nonfloat or (key is not None and key in nonfloat):
            return False
    return True


def _input_slots(node: fx.Node):
    """Yield (input node, top-level position or None, keyword or None) for every use."""
    def walk(a, position, key):
        if isinstance(a, fx.Node):
            yield a, position, key
        elif isinstance(a, (list, tuple)):
            for x in a:
                yield from walk(x, position, key)
        elif isinstance(a, dict):
            for x in a.values():
                yield from walk(x, position, key)
    for i, a in enumerate(node.args):
        yield from walk(a, i, None)
    for k, a in node.kwargs.items():
        yield from walk(a, None, k)


def _uncast_slots(node: fx.Node, gm: fx.GraphModule) -> set[tuple[int | None, str | None]]:
    """(position, keyword) slots of a write that must never be cast: the source of a ``copy_``
    (it converts to the destination's dtype itself; a cast would round a stored state), and
    the destination of any write into a model input or buffer, which a cast would replace by a
    copy that nobody reads."""
    if node.op not in ("call_method", "call_function"):
        return set()
    slots: set = set()
    from amp_compiler.capture.functionalize import _alias_root, _inplace_form, _is_source

    if target_name(node) == "copy_":
        slots |= {(1, None), (None, "src")}
    form = _inplace_form(node)
    if form is not None and _is_source(_alias_root(form[0], gm)):
        slots |= {(None, "out")} if node.kwargs.get("out") is form[0] else {(0, None), (None, "self")}
    return slots


def build_dataflow(gm: fx.GraphModule, *, roles: dict[str, str] | None = None) -> DataflowGraph:
    """One vertex per FX node, one edge per use, with kinds, dtypes and module paths.

    ``roles``: placeholders that are really parameters ("param") or buffers ("const"), as in
    dynamo graphs, which pass the module's tensors as inputs."""
    roles = roles or {}
    graph = DataflowGraph()
    params = {id(p) for p in gm.parameters()}
    is_float: dict[str, bool | None] = {}
    is_complex: dict[str, bool] = {}
    for node in gm.graph.nodes:
        kind = node_kind(node, gm)
        dtype, shape, has_meta = _meta_dtype(node)
        role = {"placeholder": "input", "output": "output"}.get(node.op, "compute")
        if node.op == "get_attr":
            value = _fetch_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                dtype, shape = value.dtype, tuple(value.shape)
                role = "param" if id(value) in params else "const"
                kind = role
            else:
                role, kind = "const", "const"
        elif node.name in roles:
            role = kind = roles[node.name]
        fl = dtype.is_floating_point if dtype is not None else None
        cx = dtype.is_complex if dtype is not None else (
            not has_meta and _guess_complex(node, kind, is_complex))
        if kind in NON_FLOAT or _holds_sizes(node) or cx:
            # shapes (SymInt, torch.Size: a window size computed from x.shape), comparisons,
            # indices: never a floating value, never cast; nor are complex values
            fl = False
        if fl is None and not has_meta:
            fl = _guess_float(node, kind, is_float, is_complex)
        is_float[node.name], is_complex[node.name] = fl, cx
        path, mtype = _module_info(node, gm)
        graph.add_vertex(node.name, role=role, kind=kind, dtype=dtype, is_float=fl, shape=shape,
                         module_path=path, module_type=mtype, target=target_name(node),
                         is_complex=cx)
        uncast = _uncast_slots(node, gm)
        for src, position, key in _input_slots(node):
            cast = (kind not in _NO_CAST_KINDS and role != "output" and (position, key) not in uncast
                    and _castable(kind, position, key, has_meta))
            graph.add_use(src.name, node.name, cast=cast)
    return graph


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_DTYPE_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                  "double": torch.float64, "long": torch.int64, "int": torch.int32, "bool": torch.bool}


def _cast_target(node: fx.Node) -> torch.dtype | None:
    """The dtype a cast node names (``x.half()``, ``x.to(torch.float16)``), if written literally."""
    name = target_name(node)
    if name in _DTYPE_METHODS:
        return _DTYPE_METHODS[name]
    return next((a for a in list(node.args[1:]) + list(node.kwargs.values())
                 if isinstance(a, torch.dtype)), None)


def _guess_complex(node: fx.Node, kind: str, known: dict[str, bool]) -> bool:
    """Complex-ness without recorded dtypes (fx path): from the op's kind (``passes.kinds``),
    a literal dtype, or a complex input."""
    if node.op not in ("call_function", "call_method") or kind in NON_FLOAT or kind in COMPLEX_TO_REAL:
        return False
    if kind in MAKES_COMPLEX:
        return True
    if kind in ("cast", "factory"):
        dt = _cast_target(node) if kind == "cast" else node.kwargs.get("dtype")
        return isinstance(dt, torch.dtype) and dt.is_complex
    return any(known.get(a.name, False) for a in node.all_input_nodes)


def _guess_float(node: fx.Node, kind: str, known: dict[str, bool | None],
                 known_complex: dict[str, bool]) -> bool | None:
    """Float-ness without recorded dtypes (fx path): from the op's semantics and its inputs."""
    if node.op == "placeholder":
        return None
    if kind in NON_FLOAT or kind in ("guards", "shape"):
        return False
    if kind == "cast":
        dt = _cast_target(node)
        return None if dt is None else dt.is_floating_point
    if kind == "factory":
        dt = node.kwargs.get("dtype")
        if isinstance(dt, torch.dtype):
            return dt.is_floating_point
        name = target_name(node)
        if name.endswith("_like") or name.startswith("new_"):
            # ones_like(ids) has the dtype of its argument
            src = node.args[0] if node.args else None
            return known.get(src.name) if isinstance(src, fx.Node) else None
        if target_name(node) == "arange":
            return any(isinstance(a, float) for a in node.args)
        return True
    if kind in COMPLEX_TO_REAL and any(known_complex.get(a.name) for a in node.all_input_nodes):
        return True  # |z|, z.real, irfft(z): real values computed from complex ones
    inputs = [known.get(a.name) for a in node.all_input_nodes]
    if kind == "getitem":
        return known.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
    if kind.startswith("module:") or kind in ("rnn",):
        return None if kind == "rnn" else True
    if True in inputs:
        return True
    if inputs and all(i is False for i in inputs):
        return False
    return None
