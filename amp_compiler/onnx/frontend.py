"""ONNX front end: an ONNX file loaded, prepared and described as the analyses' DataflowGraph.

An fp32 ``.onnx`` file (a path, bytes or a ``ModelProto``; ``load_model``, checked by
``check_source``) is prepared (``prepare``: unique node names, float ``Constant`` nodes lifted to
initializers, types inferred) and described as the same IR-neutral ``DataflowGraph`` the FX
front end builds (``build_onnx_dataflow``): op types mapped to the same canonical kinds by
``ONNX_OPS``, slot roles from each node's schema (``node_slots``), module paths from the torch
exporters' metadata. It also pins rules O1 (subgraphs) and O2 (no low form in the schema); the
pipeline that paints and rewrites it is ``amp_compiler.onnx.convert``.

Edges (``cast`` flag) come from the operator schema: an input is cast to its consumer's
precision only when it shares the type variable of the node's first floating input
(``follow``); fixed-type and second-type-variable inputs (Resize scales/roi, Reshape/Expand/Slice
shapes, BatchNormalization statistics, ``com.microsoft`` GroupNorm gamma/beta) and integer inputs
are never cast.

    >>> model = prepare(load_model("model_fp32.onnx"))
    >>> df = build_onnx_dataflow(model, low=torch.float16)
    >>> df.graph.vertex(df.vertex_of[0]).kind   # a Gemm
    'linear'
"""

from __future__ import annotations

import ast
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from amp_compiler.errors import ConfigError, OnnxError
from amp_compiler.passes.dtypes import dtype_name
from amp_compiler.passes.graph import DataflowGraph
from amp_compiler.passes.onnx_graph import (FLOAT_TYPES, ONNX_TO_TORCH, TORCH_TO_ONNX, TYPE_STR,
                                            opset_of, outer_references, slot_type_vars, value_types)
from amp_compiler.passes.onnx_rewrite import NodeSlots
from amp_compiler.passes.rules import Rule

# ONNX op type -> canonical kind (``passes.kinds``). Default-domain ops by name, other domains as
# "domain:Op". Source: the ONNX operator list (onnx/docs/Operators.md), each op mapped to the torch
# kind it computes; ops not listed are "unknown" (fp32, listed in the report).
ONNX_OPS: dict[str, str] = {
    # matrix units
    "Gemm": "linear", "MatMul": "matmul", "Einsum": "matmul", "Conv": "conv",
    "ConvTranspose": "conv", "LSTM": "rnn", "GRU": "rnn", "RNN": "rnn", "PRelu": "prelu",
    "Attention": "sdpa",
    # normalisation and softmax
    "Softmax": "softmax", "LogSoftmax": "log_softmax", "LayerNormalization": "layer_norm",
    "GroupNormalization": "group_norm", "BatchNormalization": "batch_norm",
    "InstanceNormalization": "instance_norm", "RMSNormalization": "rms_norm",
    "LpNormalization": "normalize",
    # reductions
    "ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "amax", "ReduceMin": "amin",
    "ReduceProd": "prod", "ReduceL1": "norm", "ReduceL2": "norm", "ReduceSumSquare": "sum",
    "ReduceLogSum": "log", "ReduceLogSumExp": "logsumexp", "CumSum": "cumsum",
    # fp32-required math
    "Exp": "exp", "Log": "log", "Pow": "pow", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
    "Softplus": "softplus", "Tan": "tan", "Asin": "asin", "Acos": "acos", "Sinh": "sinh",
    "Cosh": "cosh",
    "SoftmaxCrossEntropyLoss": "cross_entropy", "NegativeLogLikelihoodLoss": "nll_loss",
    # elementwise arithmetic
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Neg": "neg", "Abs": "abs",
    "Sum": "add", "Mean": "add", "Max": "maximum", "Min": "minimum", "Where": "where",
    "Gelu": "gelu", "Tanh": "tanh", "Sigmoid": "sigmoid", "HardSigmoid": "sigmoid",
    "HardSwish": "silu", "Mish": "silu", "Elu": "elu", "Selu": "selu", "Celu": "celu",
    "LeakyRelu": "leaky_relu", "Erf": "erf", "Sin": "sin", "Cos": "cos", "Sign": "sign",
    "Floor": "floor", "Ceil": "ceil", "Round": "round", "AveragePool": "avg_pool",
    "GlobalAveragePool": "avg_pool", "Pad": "pad", "Resize": "interpolate",
    "Upsample": "interpolate",
    # movement and selection
    "Relu": "relu", "ThresholdedRelu": "relu", "Clip": "clamp", "MaxPool": "max_pool",
    "GlobalMaxPool": "max_pool", "Reshape": "view", "Flatten": "view", "Squeeze": "view",
    "Unsqueeze": "view", "Transpose": "permute", "Expand": "expand", "Tile": "tile",
    "Concat": "cat", "Split": "split", "Slice": "select", "Gather": "gather",
    "GatherElements": "gather", "GatherND": "gather", "ScatterElements": "scatter",
    "ScatterND": "scatter", "Scatter": "scatter", "Identity": "identity", "Dropout": "dropout",
    "Trilu": "tril", "DepthToSpace": "pixel_shuffle", "SpaceToDepth": "pixel_shuffle",
    # bookkeeping, integers and booleans
    "Shape": "shape", "Size": "shape", "ConstantOfShape": "factory", "Range": "factory",
    "EyeLike": "factory", "RandomNormal": "factory", "RandomUniform": "factory",
    "RandomNormalLike": "factory", "RandomUniformLike": "factory", "Bernoulli": "factory",
    "Cast": "cast", "CastLike": "cast", "Equal": "compare", "Less": "compare",
    "LessOrEqual": "compare", "Greater": "compare", "GreaterOrEqual": "compare",
    "Not": "compare", "And": "compare", "Or": "compare", "Xor": "compare", "IsNaN": "compare",
    "IsInf": "compare", "ArgMax": "argmax", "ArgMin": "argmax", "TopK": "topk", "Mod": "mod",
    # control flow: opaque (O1)
    "If": "control_flow", "Loop": "control_flow", "Scan": "control_flow",
    # ONNX Runtime contrib ops
    "com.microsoft:GroupNorm": "group_norm", "com.microsoft:FastGelu": "gelu",
    "com.microsoft:BiasGelu": "gelu", "com.microsoft:Gelu": "gelu",
}

# Kinds refined by the node's inputs: a MatMul / Gather whose weight is an initializer is the
# ONNX form of torch's linear / embedding, so keep_fp32=("embedding",) means the same thing here.
_WITH_WEIGHT: dict[tuple[str, int], str] = {("matmul", 1): "linear", ("gather", 0): "embedding"}

# Slots of custom-domain ops (no schema in onnx.defs). Source: ONNX Runtime ContribOperators.md;
# GroupNorm's gamma/beta must stay float32 whatever the input's type.
CONTRIB_SLOTS: dict[str, NodeSlots] = {
    "com.microsoft:GroupNorm": NodeSlots(("follow", "keep", "keep"), ("follow",)),
    "com.microsoft:FastGelu": NodeSlots(("follow", "follow"), ("follow",)),
    "com.microsoft:BiasGelu": NodeSlots(("follow", "follow"), ("follow",)),
    "com.microsoft:Gelu": NodeSlots(("follow",), ("follow",)),
}

# Second type variables that must follow the first one (mixed dtypes there have no kernel).
_ALSO_FOLLOW: dict[str, frozenset[str]] = {"Attention": frozenset({"T2"})}

log = logging.getLogger("amp_compiler")


def _key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


# -- loading --------------------------------------------------------------------------------------

def load_model(model_or_path) -> onnx.ModelProto:
    """A private copy of the model: a path (external data loaded), bytes, or a ModelProto."""
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model
    if isinstance(model_or_path, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model_or_path))
    if isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.isfile(model_or_path):
            raise OnnxError(f"no ONNX file at '{os.fspath(model_or_path)}'; pass a path to an "
                            f"existing .onnx file or an onnx.ModelProto")
        try:
            return onnx.load(os.fspath(model_or_path))
        except Exception as exc:  # noqa: BLE001
            raise OnnxError(f"'{os.fspath(model_or_path)}' is not a readable ONNX file "
                            f"({type(exc).__name__}: {exc})") from exc
    raise ConfigError(f"convert_onnx() takes a path, bytes or an onnx.ModelProto, got "
                      f"{type(model_or_path).__name__}")


def check_source(model_or_path, model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """Blame the file, not the conversion: a model that fails ``onnx.checker`` as given (IR
    version, initializers, node order, unknown ops; with ``full_check`` also strict shape
    inference) raises an OnnxError saying so, with the checker's message."""
    is_path = isinstance(model_or_path, (str, os.PathLike))
    try:
        # a path is checked as a path: the checker then reads external data and > 2 GB models
        onnx.checker.check_model(os.fspath(model_or_path) if is_path else model,
                                 full_check=full_check)
    except Exception as exc:  # noqa: BLE001 -- ValidationError, or shape inference's errors
        what = f"'{os.fspath(model_or_path)}'" if is_path else "the model given"
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise OnnxError(f"{what} is not a valid ONNX model: onnx.checker says "
                        f"{' '.join(lines)[:500]!r}. The file itself is invalid (nothing was "
                        f"converted): fix or re-export it, then convert again") from exc


_LIFTED_KEY = "amp_compiler.lifted_constants"


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name every node uniquely, read ``Identity(initializer)`` as the initializer, lift float
    ``Constant`` nodes to initializers (their names recorded in the metadata entry
    ``amp_compiler.lifted_constants``, which ``convert_onnx`` removes again), infer types."""
    g = model.graph
    sources = {i.name for i in g.input} | {i.name for i in g.initializer}
    taken = sources | {o.name for o in g.output}
    for node in g.node:
        taken |= set(node.output)
    seen: set[str] = set()
    for i, node in enumerate(g.node):
        # plan keys are node names, in one namespace with inputs and initializers
        name = node.name if node.name and node.name not in sources else f"{node.name or node.op_type}_{i}"
        while name in seen or (name != node.name and name in taken):
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    kept, lifted = [], []
    inits = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    alias: dict[str, str] = {}
    for node in g.node:
        for i, v in enumerate(node.input):
            node.input[i] = alias.get(v, v)
        value = _constant_value(node)
        if value is not None and value.data_type in FLOAT_TYPES:
            value.name = node.output[0]
            lifted.append(value)
        elif (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in inits
              and node.output[0] not in outputs):
            # the TorchScript exporter shares tied/equal weights through Identity nodes: the
            # consumers read the initializer itself, so the analyses see a parameter, not an op
            alias[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    if alias:
        for node in kept:  # names used inside subgraphs
            for sub in (a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
                for n in sub.node:
                    for i, v in enumerate(n.input):
                        n.input[i] = alias.get(v, v)
    if lifted or alias:
        del g.node[:]
        g.node.extend(kept)
        g.initializer.extend(lifted)
    if lifted:
        model.metadata_props.add(key=_LIFTED_KEY, value="\n".join(t.name for t in lifted))
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # noqa: BLE001 -- types we cannot infer stay unknown (never cast)
        log.warning("ONNX shape inference failed (%s); values without a declared type stay "
                    "as they are", exc)
    return model


def drop_lifted_key(model: onnx.ModelProto) -> None:
    """Remove the metadata entry ``prepare`` records its lifted constants in."""
    keep = [p for p in model.metadata_props if p.key != _LIFTED_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            t = TensorProto()
            t.CopyFrom(a.t)
            return t
        if a.name == "value_float":
            return helper.make_tensor(node.output[0], TensorProto.FLOAT, [], [a.f])
        if a.name == "value_floats":
            return helper.make_tensor(node.output[0], TensorProto.FLOAT, [len(a.floats)], list(a.floats))
    return None


# -- schema slots ------------------------------------------------------------------------------------

def node_slots(node: onnx.NodeProto, opset: int | None, types: Mapping[str, int],
               low: torch.dtype) -> tuple[NodeSlots, bool]:
    """Slot roles of ``node`` from its schema, and whether its compute type may be ``low`` (O2)."""
    key = _key(node)
    schema = None
    if node.domain in ("", "ai.onnx") and opset is not None:
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except Exception:  # noqa: BLE001 -- not a standard op at this opset
            schema = None
    if schema is None:
        if key in CONTRIB_SLOTS:
            s = CONTRIB_SLOTS[key]
            return NodeSlots(s.inputs[:len(node.input)] + ("keep",) * max(0, len(node.input) - len(s.inputs)),
                             s.outputs[:len(node.output)] + ("keep",) * max(0, len(node.output) - len(s.outputs))), True
        return NodeSlots(("keep",) * len(node.input), ("keep",) * len(node.output)), False

    allowed = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
    in_vars = slot_type_vars(list(schema.inputs), len(node.input))
    out_vars = slot_type_vars(list(schema.outputs), len(node.output))
    follow = next((t for t, v in zip(in_vars, node.input)
                   if v and t in allowed and types.get(v) in FLOAT_TYPES), None)
    following = {follow} | set(_ALSO_FOLLOW.get(node.op_type, ())) if follow else set()
    uses = Counter(t for t, v in zip(in_vars, node.input) if v)
    inputs = []
    for t, v in zip(in_vars, node.input):
        if v and t in following:
            inputs.append("follow")
        elif v and t in allowed and uses[t] == 1 and t not in out_vars:
            inputs.append("any")
        else:
            inputs.append("keep")
    outputs: list[str | int] = []
    for t in out_vars:
        if t in following:
            outputs.append("follow")
        elif t in allowed and t in in_vars:
            outputs.append(in_vars.index(t))
        else:
            outputs.append("keep")
    low_ok = follow is None or TYPE_STR[TORCH_TO_ONNX[low]] in allowed.get(follow, set())
    return NodeSlots(tuple(inputs), tuple(outputs)), low_ok


# -- ONNX -> DataflowGraph ---------------------------------------------------------------------------

@dataclass
class OnnxDataflow:
    """The dataflow graph of one ONNX model plus what the rewrite needs to apply a plan to it."""

    graph: DataflowGraph
    slots: dict[int, NodeSlots]
    vertex_of: dict[int, str]
    source_types: dict[str, int]
    pins: dict[str, tuple[str, str]] = field(default_factory=dict)  # vertex -> (rule, reason)
    producer: dict[str, str] = field(default_factory=dict)          # value -> vertex


def _torch_dtype(et: int | None) -> torch.dtype | None:
    return ONNX_TO_TORCH.get(et) if et is not None else None


def _module_info(node: onnx.NodeProto) -> tuple[str, str | None]:
    """Module path and class from the torch exporters' node metadata or scoped node names."""
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        if "pkg.torch.onnx.name_scopes" in meta:
            scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
            path = scopes[-2] if len(scopes) >= 2 else ""
            mtype = classes[-2] if len(classes) >= 2 else None
            return path, mtype
    except (ValueError, SyntaxError):
        pass
    if node.name.startswith("/"):  # TorchScript exporter: "/blocks.0/attn/MatMul"
        return ".".join(p for p in node.name.split("/")[1:-1] if p), None
    return "", None


def build_onnx_dataflow(model: onnx.ModelProto, *, low: torch.dtype, keep_io_types: bool = True,
                        tables: Iterable[int] = ()) -> OnnxDataflow:
    """One vertex per graph input, initializer and node, one ``output:<name>`` per graph output,
    for a model ``prepare`` has seen (initializers it lifted from ``Constant`` nodes get the role
    "const", the others "param"; so do the nodes at the positions in ``tables``, O10)."""
    tables = set(tables)
    g = model.graph
    constants = {name for p in model.metadata_props if p.key == _LIFTED_KEY for name in p.value.split("\n")}
    types = value_types(g)
    opset = opset_of(model)
    graph = DataflowGraph()
    producer: dict[str, str] = {}
    inits = {t.name: t for t in g.initializer}
    low_et = TORCH_TO_ONNX[low]
    # float scalars are operands, not values: FX never sees them (``x * 0.125`` has one input),
    # so they do not count as fp32 inputs here either; the rewrite gives them their consumer's dtype
    scalars = {t.name for t in g.initializer if t.data_type in FLOAT_TYPES and int(np.prod(t.dims)) == 1}

    for vi in g.input:
        if vi.name in inits:
            continue
        et = types.get(vi.name)
        if not keep_io_types and et in FLOAT_TYPES:
            et = low_et  # the caller will pass low-precision inputs
        graph.add_vertex(vi.name, role="input", kind="input", dtype=_torch_dtype(et),
                         is_float=None if et is None else et in FLOAT_TYPES, target="input")
        producer[vi.name] = vi.name
    for t in g.initializer:
        role = "const" if t.name in constants else "param"
        graph.add_vertex(t.name, role=role, kind=role, dtype=_torch_dtype(t.data_type),
                         is_float=t.data_type in FLOAT_TYPES, shape=tuple(t.dims), target="initializer")
        producer[t.name] = t.name

    slots: dict[int, NodeSlots] = {}
    vertex_of: dict[int, str] = {}
    pins: dict[str, tuple[str, str]] = {}
    for idx, node in enumerate(g.node):
        name = node.name if node.name not in graph else f"{node.name}#{idx}"
        vertex_of[idx] = name
        s, low_ok = node_slots(node, opset, types, low)
        slots[idx] = s
        key = _key(node)
        kind = ONNX_OPS.get(key, "const" if node.op_type == "Constant" else f"onnx:{key}")
        for (k, pos), refined in _WITH_WEIGHT.items():
            if kind == k and len(node.input) > pos and node.input[pos] in inits:
                kind = refined
        first = next((o for o in node.output if o), None)
        et = types.get(first) if first else None
        is_float = None if et is None else (et in FLOAT_TYPES or any(types.get(o) in FLOAT_TYPES for o in node.output if o))
        path, mtype = _module_info(node)
        role = "const" if node.op_type == "Constant" or idx in tables else "compute"
        graph.add_vertex(name, role=role, kind=kind, dtype=_torch_dtype(et), is_float=is_float,
                         module_path=path, module_type=mtype, target=key)
        # a node made only from scalars (Expand(0.0, shape)) keeps them: it is a fill, and R4
        # lets it take its consumers' precision instead of casting its output; one that selects
        # between scalars by a boolean (Where(mask, 0, -65504), BERT's additive mask) drops
        # them like FX does: its value is exact in the low dtype (propagate's exact values)
        selects = node.op_type == "Where" and all(v in scalars for v in node.input[1:])
        operands = scalars if selects or any(v and v not in scalars and s.inputs[i] == "follow"
                                             and types.get(v) in FLOAT_TYPES
                                             for i, v in enumerate(node.input)) else set()
        for i, v in enumerate(node.input):
            if v and v in producer and not (v in operands and s.inputs[i] == "follow"):
                cast = s.inputs[i] == "follow" and types.get(v) in FLOAT_TYPES
                graph.add_use(producer[v], name, cast=cast)
        subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if subgraph:
            for v in outer_references(node):
                if v in producer:
                    graph.add_use(producer[v], name, cast=types.get(v) in FLOAT_TYPES)
            pins[name] = (Rule.O1_SUBGRAPH, f"{node.op_type} has subgraphs: left fp32 as written, "
                                         f"bodies not converted; outer values enter in their own dtype")
        elif not low_ok and role == "compute":
            pins[name] = (Rule.O2_SCHEMA, f"ONNX {key} (opset {opset}) has no {dtype_name(low)} "
                                       f"form for its compute type: stays fp32")
        for o in node.output:
            if o:
                producer[o] = name
    for vo in g.output:
        name = f"output:{vo.name}"
        graph.add_vertex(name, role="output", kind="output", target="output")
        if vo.name in producer:
            graph.add_use(producer[vo.name], name, cast=False)
    return OnnxDataflow(graph, slots, vertex_of, types, pins, producer)
