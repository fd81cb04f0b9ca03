"""FX -> DataflowGraph: the IR-neutral description the analyses read.

One vertex per FX node (kind from ``passes.kinds.node_kind``, dtype and shape from the values
tracing recorded, module path from ``nn_module_stack``), one edge per use, marked castable by the
slot rules of ``passes.slots``. Complex values (``view_as_complex``, ``torch.fft``) are marked
``is_complex`` and never ``is_float``: export records their dtype; on the fx path the op's kind
says it (``passes.kinds.MAKES_COMPLEX`` / ``COMPLEX_TO_REAL``, otherwise an op with a complex
input is complex), and tensor attributes fx records as ``getattr`` (``z.real``, ``w.T``) get their
kind (``TENSOR_ATTRIBUTES``) instead of being read as metadata.

    >>> graph = build_dataflow(gm)
    >>> graph.vertex("fc1").kind
    'linear'
"""

from __future__ import annotations

import torch
import torch.fx as fx

from amp_compiler.capture.functionalize import _alias_root, _inplace_form, _is_source
from amp_compiler.passes.graph import DataflowGraph, attribute
from amp_compiler.passes.kinds import COMPLEX_TO_REAL, MAKES_COMPLEX, fqn, node_kind, target_name
from amp_compiler.passes.policy import NON_FLOAT
from amp_compiler.passes.slots import castable, input_slots

# Consumers that read a value without computing on its floating-point data: they never cause a
# cast and do not count as low/fp32 neighbours.
_NO_CAST_KINDS = NON_FLOAT | {"cast", "getitem", "output"}


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
            return path, fqn(type(gm.get_submodule(path))) if path else None
        except AttributeError:
            return path, None
    if node.op == "call_module":
        return str(node.target), fqn(type(gm.get_submodule(node.target)))
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    path, mtype = list(stack.values())[-1]
    if not isinstance(mtype, str):
        mtype = fqn(mtype)
    path = path if isinstance(path, str) else str(path)
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path, mtype


def _uncast_slots(node: fx.Node, gm: fx.GraphModule) -> set[tuple[int | None, str | None]]:
    """(position, keyword) slots of a write that must never be cast: the source of a ``copy_``
    (it converts to the destination's dtype itself; a cast would round a stored state), and
    the destination of any write into a model input or buffer, which a cast would replace by a
    copy that nobody reads."""
    if node.op not in ("call_method", "call_function"):
        return set()
    slots: set = set()
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
            value = attribute(gm, str(node.target))
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
        for src, position, key in input_slots(node):
            cast = (kind not in _NO_CAST_KINDS and role != "output" and (position, key) not in uncast
                    and castable(kind, position, key, has_meta))
            graph.add_use(src.name, node.name, cast=cast)
    return graph


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
