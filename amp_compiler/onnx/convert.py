"""``convert_onnx``: the compiler's pipeline on an existing ONNX file.

An fp32 ``.onnx`` file is loaded and described as the analyses' ``DataflowGraph``
(``amp_compiler.onnx.frontend``), classified and painted by the same ``classify`` /
``propagate`` passes as ``convert()`` with the CUDA policy, and rewritten by
``passes.onnx_rewrite`` (explicit ``Cast`` nodes, low-precision initializers).

Rules the ONNX pipeline adds to the plan (numbered as they appear in Decisions):

    O1  ``If`` / ``Loop`` / ``Scan`` nodes (anything with a subgraph) stay fp32 and their bodies
        are not converted: the analyses see one opaque node;
    O2  a node whose ONNX schema (at the model's opset) does not allow the low dtype for its
        compute type stays fp32; so does an op of a custom domain we have no slot table for;
    O3  with ``calibration`` data (fp16 only): a node whose output exceeded rule D1's
        ``data_max`` (``passes.ranges.THRESHOLDS``: 2**14 = 16384 for float16, about a quarter
        of its range, headroom for data beyond the calibration set) on that data stays fp32,
        and so does every node that reads such a value as a low input: D1 on ONNX Runtime's
        values.

    O4  a node that reads a floating initializer (or a lifted ``Constant``) in a slot that
        takes its precision, whose largest finite |value| exceeds the low dtype's largest finite
        value (65504 for float16), stays fp32 and the initializer keeps its values (ModelOpt
        AutoCast's ``init_max``); without it the initializer was clamped to that maximum.
        Infinities (``-inf`` masks) are representable and do not count.
    O5  with ``max_reduction_depth=N``: a MatMul, Gemm or Conv that sums more than N products
        per output value (MatMul/Gemm: the shared dimension K; Conv: input channels per group
        times the kernel's elements), known from shape inference, stays fp32 (ModelOpt
        AutoCast's ``max_depth_of_reduction``: for back ends that accumulate in the low dtype,
        such as TensorRT's fp16 tactics). Off by default: cuBLAS and ONNX Runtime's CUDA kernels
        accumulate fp16 products in fp32. A depth shape inference cannot tell is left alone.
    O6  an additive attention mask -- an initializer whose values beyond the low range are all
        negative (``finfo(float32).min`` fills) and that reaches only ``Softmax`` inputs, through
        ``Add`` / ``Where`` and movement ops -- is clamped to the low dtype's lowest value before
        O4 looks at it: ``Softmax`` weighs those entries ``exp(-65504 - max) = 0`` exactly as it
        weighs ``exp(-3.4e38 - max)``, and a fully masked row is uniform in both (the scores are
        absorbed), so the attention runs low with no Cast. The readers' Decisions say so.
    O7  the cube of the tanh GELU form (``Pow(x, 3)`` whose every path reaches a ``Tanh`` through
        ``Mul`` / ``Add``, GPT-2's ``NewGELUActivation``) runs low instead of R2's fp32: where
        ``x**3`` overflows, ``tanh`` of the sum is +-1 either way (the exact limit), so the
        chain needs no Cast pair (and ONNX Runtime fuses it into its ``FastGelu`` kernel).
    O8  embedding tables (``embedding_tables=``): a ``Gather`` copies rows, so a table stored in
        the low dtype changes each looked-up value by one rounding and no more; the rows are cast
        up where an fp32 op reads them. ``"shared"`` (default): a table that a low node also
        reads (GPT-2's tied input embedding and LM head) is stored once, low -- the low reader
        rounds it anyway -- instead of once per dtype; ``"low"``: every table (half the bytes,
        at one rounding of every embedding); ``"fp32"``: tables fp32, tied ones stored twice.
    O9  with ``islands="measure"``: an fp32 island (a region fp32 for its neighbours' sake: R3,
        R5, R7) goes low where ONNX Runtime measures that it removes Casts at an error within
        ``island_tolerance``; see ``amp_compiler.onnx.islands``.
    O10 a value computed from initializers and input shapes only (no input's values) by some
        arithmetic -- HF Llama's rotary ``cos``/``sin`` -- is a table the graph computes at run
        time (a weight only moved, ``Transpose(W)``, is not: W4 stores W low): it is computed
        fp32 and cast once per dtype its readers need, like a weight, and
        its readers do not stay fp32 for it (R3). Only where one run on a generated sample finds
        it within a quarter of the low dtype's range; beyond, it stays an fp32 value.
    O11 a LayerNorm written out (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add;
        exporters before opset 17) is fused into one ``LayerNormalization`` at opset >= 17
        (``passes.onnx_layer_norm``, rules L1-L7), which computes in fp32 inside: it runs low
        with no Cast instead of an fp32 island around its ``Pow``.
    O12 with ``fp64="fp32"``: float64 initializers, casts and dtype attributes become float32,
        float64 inputs and outputs keep their type at the border (``passes.onnx_fp64``, D1-D3).

    >>> model, plan = convert_onnx("model_fp32.onnx", dtype="float16", return_plan=True)
    >>> plan["node_softmax"].rule
    'R5:fp32-acc-low'
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch
from onnx import numpy_helper, version_converter

from amp_compiler.errors import ConfigError, OnnxError
from amp_compiler.onnx.frontend import (ONNX_OPS, OnnxDataflow, build_onnx_dataflow, check_source,
                                        drop_lifted_key, load_model, prepare)
from amp_compiler.onnx.io import check_destination, save_model
from amp_compiler.onnx.islands import ISLAND_MODES, generated_samples, trade
from amp_compiler.onnx.rules import (EMBEDDING_TABLES, clamp_masks, constant_tables, gelu_cubes,
                                     mask_decisions, table_decisions, table_note, value_ranges)
from amp_compiler.onnx.session import ort_providers
from amp_compiler.passes.classify import classify, override_entries
from amp_compiler.passes.dtypes import dtype_name, resolve_dtype
from amp_compiler.passes.infra import PassManager
from amp_compiler.passes.onnx_fp64 import fp64_to_fp32
from amp_compiler.passes.onnx_graph import FLOAT_TYPES, TORCH_TO_ONNX, opset_of, value_types
from amp_compiler.passes.onnx_layer_norm import FUSED_NOTE, fuse_layer_norms
from amp_compiler.passes.onnx_rewrite import rewrite_onnx
from amp_compiler.passes.plan import Decision, PrecisionPlan
from amp_compiler.passes.policy import policy_for
from amp_compiler.passes.propagate import propagate
from amp_compiler.passes.ranges import THRESHOLDS
from amp_compiler.passes.rules import Rule

log = logging.getLogger("amp_compiler")


# -- calibration (O3) -----------------------------------------------------------------------------

def _feeds(model: onnx.ModelProto, sample) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if isinstance(sample, Mapping):
        items = dict(sample)
        unknown = sorted(set(map(str, items)) - set(names))
        missing = [n for n in names if n not in items]
        if unknown or missing:
            what = (f"names {', '.join(map(repr, unknown))}, which the model does not take"
                    if unknown else f"no value for {', '.join(map(repr, missing))}")
            raise ConfigError(f"a calibration sample has {what}; the model's inputs are "
                              f"{', '.join(map(repr, names))}")
    else:
        sample = sample if isinstance(sample, (tuple, list)) else (sample,)
        values = [a for a in sample if a is not None]
        if len(values) != len(names):
            raise ConfigError(f"a calibration sample has {len(values)} inputs, the model takes "
                              f"{len(names)} ({', '.join(names)})")
        items = dict(zip(names, values))
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in items.items()}


def calibration_ranges(model: onnx.ModelProto, calibration: Iterable) -> dict[str, float]:
    """max|x| of every float value of the fp32 model over the calibration samples (ORT CPU)."""
    types = value_types(model.graph)
    values = list(dict.fromkeys(o for n in model.graph.node for o in n.output
                                if o and types.get(o) in FLOAT_TYPES))

    def failed(i: int, feeds: dict, exc: Exception) -> ConfigError:
        first = " ".join(str(exc).split())[:300]
        return ConfigError(f"calibration sample {i}: ONNX Runtime cannot run the fp32 model on "
                           f"it ({', '.join(f'{k}: {v.dtype}{list(v.shape)}' for k, v in feeds.items())}): "
                           f"{first}")

    return value_ranges(model, values, [_feeds(model, s) for s in calibration], failed=failed)


def _range_pins(df: OnnxDataflow, model: onnx.ModelProto, ranges: Mapping[str, float],
                low: torch.dtype) -> dict[str, tuple[str, str]]:
    """Rule O3: D1's overflow limit on the values ONNX Runtime computed."""
    limit = THRESHOLDS[low].data_max
    pins: dict[str, tuple[str, str]] = {}
    for idx, node in enumerate(model.graph.node):
        big = [(o, ranges[o]) for o in node.output if ranges.get(o, 0.0) > limit]
        if big:
            pins[df.vertex_of[idx]] = (Rule.O3_RANGE, f"calibration saw max|{big[0][0]}| = {big[0][1]:.4g} "
                                                   f"> {limit:g} (D1's data_max for {dtype_name(low)}): stays fp32")
        reads = [v for i, v in enumerate(node.input) if v and df.slots[idx].inputs[i] == "follow"
                 and ranges.get(v, 0.0) > limit]
        if reads and df.vertex_of[idx] not in pins:
            pins[df.vertex_of[idx]] = (Rule.O3_RANGE, f"reads '{reads[0]}' (calibration max|x| = "
                                                   f"{ranges[reads[0]]:.4g} > {limit:g}): stays fp32")
    return pins


def _init_range_pins(df: OnnxDataflow, model: onnx.ModelProto,
                     low: torch.dtype) -> dict[str, tuple[str, str]]:
    """Rule O4: nodes reading an initializer beyond ``low``'s finite range stay fp32."""
    limit = float(torch.finfo(low).max)
    big: dict[str, float] = {}
    for t in model.graph.initializer:
        if t.data_type in FLOAT_TYPES and t.data_type != TORCH_TO_ONNX[low]:
            a = numpy_helper.to_array(t)
            finite = np.abs(a[np.isfinite(a)]) if a.size else a
            m = float(finite.max()) if finite.size else 0.0
            if m > limit:
                big[t.name] = m
    pins: dict[str, tuple[str, str]] = {}
    if not big:
        return pins
    for idx, node in enumerate(model.graph.node):
        reads = [v for i, v in enumerate(node.input) if v in big and df.slots[idx].inputs[i] == "follow"]
        if reads:
            pins[df.vertex_of[idx]] = (Rule.O4_INIT_RANGE, f"reads initializer '{reads[0]}' with "
                                       f"max|x| = {big[reads[0]]:.4g} > {limit:g} ({dtype_name(low)}'s "
                                       f"largest value): stays fp32, the initializer unclamped")
    return pins


def _reduction_depth_pins(model: onnx.ModelProto, vertex_of: list[str],
                          limit: int) -> dict[str, tuple[str, str]]:
    """Rule O5: matrix ops that sum more than ``limit`` products per output stay fp32."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    pins: dict[str, tuple[str, str]] = {}
    for idx, node in enumerate(model.graph.node):
        depth = _reduction_depth(node, shapes)
        if depth is not None and depth > limit:
            pins[vertex_of[idx]] = (Rule.O5_REDUCTION_DEPTH, f"{node.op_type} sums {depth} products "
                                    f"per output value > max_reduction_depth={limit}: stays fp32")
    return pins


def _reduction_depth(node: onnx.NodeProto, shapes: dict) -> int | None:
    """Products summed per output value of a MatMul / Gemm / Conv, None where not known."""
    a = shapes.get(node.input[0]) if node.input else None
    if node.op_type == "MatMul" and a:
        return a[-1]
    if node.op_type == "Gemm" and a and len(a) == 2:
        trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
        return a[0] if trans_a else a[1]
    if node.op_type == "Conv" and len(node.input) > 1:
        w = shapes.get(node.input[1])
        if w and all(isinstance(d, int) and d > 0 for d in w[1:]):
            return int(np.prod(w[1:]))  # (C_in / group) x kernel elements
    return None


# -- the pipeline -------------------------------------------------------------------------------------

def convert_onnx(model_or_path, *, dtype="float16", keep_fp32: Iterable = (), force_low: Iterable = (),
                 calibration: Iterable | None = None, keep_io_types: bool = True,
                 out: str | os.PathLike | None = None, overwrite: bool = False,
                 return_plan: bool = False, opset: int | None = None,
                 max_reduction_depth: int | None = None, embedding_tables: str = "shared",
                 islands: str = "keep", island_tolerance: float = 0.05, fp64: str = "keep"):
    """Convert an fp32 ONNX model to mixed precision with the same analyses as ``convert()``.

    Args:
        model_or_path: a path to an ``.onnx`` file, its bytes, or an ``onnx.ModelProto`` (never
            modified).
        dtype: ``"float16"`` | ``"bfloat16"`` (also torch dtypes).
        keep_fp32 / force_low: op kinds (``"softmax"``), module-path globs (from the torch
            exporters' metadata or ``/scoped/node/names``), node names (``"node:<name>"``) or
            node-name regexes (``"re:/attn/.*MatMul"``, ``re.search`` on the node names).
        calibration: iterable of input samples (tuples in graph-input order, or dicts name ->
            array); float16 only: nodes whose values leave float16's range stay fp32 (O3).
        keep_io_types: True keeps graph inputs/outputs in their source dtype; False makes floating
            ones the low dtype.
        out: also write the result there (atomically; an existing file needs ``overwrite=True``).
        return_plan: return ``(model, plan)`` instead of the model: the ``PrecisionPlan`` maps
            every vertex (node name, input, initializer, ``output:<name>``) to its Decision.
        opset: target default-domain opset: the source is converted to it first
            (``onnx.version_converter.convert_version``) and analysed at that opset, so the
            result imports it; ``None`` keeps the source's. A conversion the version converter
            cannot do (or one whose result fails ``onnx.checker``) is an ``OnnxError``.
        max_reduction_depth: MatMul / Gemm / Conv nodes summing more products than this per
            output value stay fp32 (rule O5, ModelOpt's ``max_depth_of_reduction``); None: off.
        embedding_tables: ``"shared"`` (a Gather table a low node also reads is stored once,
            low), ``"low"`` (every Gather table low: smallest file, one rounding per embedding)
            or ``"fp32"`` (rule O8).
        islands: ``"keep"`` (the plan's fp32 islands stay) or ``"measure"`` (rule O9: each is
            tried low in ONNX Runtime on ``calibration`` -- or generated -- samples, and goes
            low where that removes Casts and the error grows by at most ``island_tolerance``,
            relative; every island's Decisions say what was measured).
        fp64: ``"keep"`` (float64 ops stay as written) or ``"fp32"`` (rule O12: float64
            initializers, casts and dtype attributes become float32; float64 inputs and outputs
            keep their type, cast at the border -- ModelOpt's clean-up).

    Returns:
        The converted ``onnx.ModelProto`` (checked with ``onnx.checker.check_model(full_check=True)``),
        or ``(model, plan)`` with ``return_plan=True``.

    Example:
        >>> model, plan = convert_onnx("fp32.onnx", return_plan=True, out="fp16.onnx")
        >>> sum(n.op_type == "Cast" for n in model.graph.node), plan.counts()["low"]
    """
    low = resolve_dtype(dtype)
    keep_fp32, force_low = override_entries(keep_fp32), override_entries(force_low)
    depth_limit = None if max_reduction_depth is None else _depth_limit(max_reduction_depth)
    if fp64 not in ("keep", "fp32"):
        raise ConfigError(f"fp64 must be 'keep' or 'fp32', got {fp64!r}")
    if islands not in ISLAND_MODES:
        raise ConfigError(f"islands must be one of {', '.join(map(repr, ISLAND_MODES))}, got {islands!r}")
    if isinstance(island_tolerance, bool) or not isinstance(island_tolerance, (int, float)) \
            or not 0 <= island_tolerance < float("inf"):
        raise ConfigError(f"island_tolerance must be a finite number >= 0 (0.05: the error may "
                          f"grow by 5%), got {island_tolerance!r}")
    if islands == "measure" and low == torch.bfloat16 \
            and "CUDAExecutionProvider" not in ort_providers():
        raise ConfigError("islands='measure' with bfloat16 needs ONNX Runtime's "
                          "CUDAExecutionProvider (onnxruntime-gpu): its CPU provider has no "
                          "bfloat16 kernels to measure the trades on; use float16 or islands='keep'")
    if calibration is not None and islands == "measure":
        calibration = list(calibration)  # read twice: ranges (O3) and the trades (O9)
    if embedding_tables not in EMBEDDING_TABLES:
        raise ConfigError(f"embedding_tables must be one of {', '.join(map(repr, EMBEDDING_TABLES))}, "
                          f"got {embedding_tables!r}")
    if out is not None:
        check_destination(out, overwrite)  # fail before the work, not after
    source = load_model(model_or_path)
    check_source(model_or_path, source)
    if opset is not None:
        source = convert_opset(source, opset, model_or_path)
    model = prepare(source)
    if opset_of(model) is None:
        raise OnnxError("the model imports no default-domain opset; it is not a standard ONNX model")
    # the ONNX rewrites; the model they make is checked once, in full, at the end (step 5)
    passes = PassManager(check=None)
    if fp64 == "fp32":  # O12: float64 computed in float32 (ModelOpt's clean-up)
        widened = passes.run(fp64_to_fp32, model).facts
        if widened:
            log.info("O12: float64 -> float32 for %d values (%s...)", len(widened), ", ".join(widened[:3]))
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    fused_norms = passes.run(fuse_layer_norms, model).facts  # O11
    # 1. describe it IR-neutrally: the same DataflowGraph the FX front end builds
    masks = clamp_masks(model, low)  # O6, before O4 reads the initializers' ranges
    tables = constant_tables(model, low, ONNX_OPS)  # O10
    df = build_onnx_dataflow(model, low=low, keep_io_types=keep_io_types, tables=tables)
    # 2. initializers beyond the low dtype's range pin their readers fp32 (O4); optional range
    # analysis: values beyond float16's range pin their nodes fp32 (O3)
    df.pins.update(_init_range_pins(df, model, low))
    if depth_limit is not None:  # O5: deep sums kept fp32, for low-accumulating back ends
        df.pins.update(_reduction_depth_pins(model, df.vertex_of, depth_limit))
    if calibration is not None and low == torch.float16:
        df.pins.update(_range_pins(df, model, calibration_ranges(model, calibration), low))
    # 3. classify and paint with the same passes and the CUDA policy; pins ride on keep_fp32
    policy = policy_for("cuda", low)
    pinned = tuple(f"node:{n}" for n in df.pins)
    cubes = {n: why for n, why in gelu_cubes(model, df.vertex_of).items() if n not in df.pins}  # O7

    def paint(traded: tuple[str, ...] = (), kept: tuple[str, ...] = ()) -> PrecisionPlan:
        classes = classify(df.graph, policy,
                           keep_fp32=keep_fp32 + pinned + tuple(f"node:{n}" for n in kept),
                           force_low=force_low + tuple(f"node:{n}" for n in (*cubes, *traded)))
        plan = propagate(df.graph, classes, policy, type_promotion=False)
        return PrecisionPlan({**plan, **{n: _pinned(plan[n], *df.pins[n]) for n in df.pins},
                              **mask_decisions(plan, model, df.vertex_of, masks, low),
                              **{n: plan[n].with_(rule=Rule.O7_GELU_CUBE, reason=why) for n, why in cubes.items()
                                 if plan[n].rule == Rule.R6_FORCE_LOW},
                              **table_decisions(plan, model, df.vertex_of, df.slots, low, embedding_tables),
                              **{df.vertex_of[i]: table_note(plan[df.vertex_of[i]], m, low)
                                 for i, m in tables.items()},
                              **{n: plan[n].with_(reason=f"{plan[n].reason}; {FUSED_NOTE}")
                                 for n in fused_norms if n in plan}},
                             low_dtype=low, device_type="cuda",
                             meta={"source": "onnx", "opset": opset_of(model),
                                   "keep_io_types": keep_io_types, "fp64": fp64})

    # 4. rewrite the ONNX graph: Cast nodes, low-precision initializers, outputs restored
    def build(traded: tuple[str, ...] = (), kept: tuple[str, ...] = ()) -> tuple[PrecisionPlan, onnx.ModelProto]:
        plan = paint(traded, kept)
        converted = passes.run(rewrite_onnx, model, df.slots, df.vertex_of, plan, df.source_types,
                                       keep_io_types=keep_io_types).graph_module
        drop_lifted_key(converted)
        return plan, converted

    plan, converted = build()
    if islands == "measure":  # O9: each fp32 island measured against its Casts
        samples = ([_feeds(source, c) for c in calibration] if calibration is not None
                   else generated_samples(source))
        plan, converted = trade(source, plan, df.graph, build, samples, island_tolerance)
    # 5. a file ONNX Runtime will load: the full checker, strict shape inference included
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # noqa: BLE001
        # the same full check on the file as given: if it fails there too, the file is at fault
        check_source(model_or_path, source, full_check=True)
        raise OnnxError(f"the converted model fails onnx.checker: {exc}. Keep the op named there "
                        f"in fp32 (keep_fp32=['node:<name>']) and report the model") from exc
    if out is not None:
        save_model(converted, out, overwrite=overwrite)
    return (converted, plan) if return_plan else converted


def _depth_limit(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"max_reduction_depth must be a positive integer (products summed per "
                          f"output value, e.g. 4096) or None, got {value!r}")
    return int(value)


def convert_opset(model: onnx.ModelProto, opset, model_or_path=None) -> onnx.ModelProto:
    """``model`` at default-domain ``opset`` (itself when already there), by
    ``onnx.version_converter``; impossible conversions are an OnnxError saying so."""
    latest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not 1 <= opset <= latest:
        raise ConfigError(f"opset must be an integer from 1 to {latest} (the newest this onnx "
                          f"{onnx.__version__} knows), got {opset!r}")
    current = opset_of(model)
    if current == opset:
        return model
    what = (f"'{os.fspath(model_or_path)}'" if isinstance(model_or_path, (str, os.PathLike))
            else "the model")
    try:
        converted = version_converter.convert_version(model, int(opset))
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # noqa: BLE001 -- the converter's RuntimeError, or an invalid result
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise OnnxError(f"cannot convert {what} from opset {current} to opset {opset}: "
                        f"onnx.version_converter says {detail!r}. Convert to another opset, or "
                        f"leave the opset as it is") from exc
    if opset_of(converted) != opset:
        raise OnnxError(f"cannot convert {what} from opset {current} to opset {opset}: the "
                        f"version converter returned opset {opset_of(converted)}")
    return converted


def _pinned(d: Decision, rule: str, reason: str) -> Decision:
    if d.rule == Rule.R6_KEEP_FP32 or rule == Rule.O1_SUBGRAPH:
        return d.with_(rule=rule, reason=reason)
    return d
