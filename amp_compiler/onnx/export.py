"""ONNX export of a converted model: explicit Casts, low-precision initializers, one file.

``export_onnx(amp, example_inputs, "model.onnx")`` writes the AmpModule's inference graph with
the dynamo exporter (``torch.onnx.export(..., dynamo=True)``). What we do around the exporter,
and why:

1. The graph exported is the inference graph with weight casts folded (low-precision copies
   stored once). The user's AmpModule is not changed: a training-mode AmpModule is switched to
   eval for the duration (``amp.eval()`` builds its eval graph once and caches it, as it would
   anyway) and switched back before returning, even on error; an unfolded graph is deep-copied
   and folded in the copy (this briefly holds a second copy of the weights).
2. The exporter runs with ``optimize=False`` and we run its optimizer (onnxscript: constant
   folding, identity/transposes/casts clean-up, CSE, initializer de-duplication) ourselves after,
   because one of its rewrites fuses BatchNormalization into a Conv whose weights are float16
   and stores the fused weights as float32 (an invalid model). ``_match_initializer_types``
   puts such initializers back in their consumer's dtype (fused in fp32, rounded once). The
   optimizer keeps our Cast nodes and float16 initializers otherwise (checked by the tests).
3. ``keep_io_types=False`` turns floating inputs/outputs into the low dtype, dropping the Casts
   that converted them (``passes.onnx_rewrite.set_io_dtype``).
4. Source locations the exporter records (stack traces, FX node text) are dropped from node
   metadata: they hold paths of the machine that exported; module scopes are kept (they give
   ``convert_onnx`` its module paths).
5. Legalisation (``amp_compiler.onnx.legalise``): a node whose schema has no kernel type for
   the low dtype it receives at the file's opset (bf16 Conv, MaxPool, ... before opset 22)
   computes in float32, cast up and back, with the reason in its metadata; logged.
6. Type promotion made explicit (``explicit_promotions``): rule I7 lets an fp32 elementwise op
   read a low-precision operand as it is (torch promotes inside the kernel). ONNX has no
   promotion, and the exporter's own promotion pass fails on some of these nodes (torch 2.11:
   ``Expected same OpOverload packet, got prim.device != aten.mul`` on ConvNeXt's fp32 layer
   scale times an fp16 branch), so before exporting, a copy of the graph gets an explicit
   ``.to()`` on every such operand: the Cast ONNX needs there anyway.
7. No ONNX Runtime crash (``passes.onnx_transposes`` rule W9, ``sink_transposes``): a
   ``Transpose`` moving axis 1 first on its way to a MatMul with a 2-D weight
   (``nn.MultiheadAttention(batch_first=True)`` transposes its input before the in-projection)
   makes ONNX Runtime 1.32's ``MatmulTransposeFusion`` leave an unresolved node that its
   ``NchwcTransformer`` dereferences: ``InferenceSession(path)`` dies with SIGSEGV at the
   default optimization level. The Transpose moves below the MatMul and its bias Add (the same
   values and Casts); a match that cannot move is logged with the session option that avoids
   the crash. Last before the checker: the io retyping and legalisation may add Casts.
8. ``onnx.checker.check_model(full_check=True)`` must pass; the file is written atomically
   (``amp_compiler.onnx.io``: temporary file in the same folder, then ``os.replace``), never
   over an existing file unless ``overwrite=True``, and no partial file is left on error.

    >>> amp = ac.convert(model.eval(), example_inputs)
    >>> path = export_onnx(amp, example_inputs, "model.onnx")
    >>> verify_onnx(path, model, example_inputs)["max_rel"] < 1e-2   # amp_compiler.onnx.session
    True
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import warnings
from typing import Any

import onnx
import torch
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp

from amp_compiler.capture.copy import copy_graph_module
from amp_compiler.errors import ConfigError, OnnxError
from amp_compiler.module import AmpModule
from amp_compiler.onnx.io import check_destination, save_model
from amp_compiler.onnx.legalise import legalise_types, type_name
from amp_compiler.passes.fold_weights import fold_weights
from amp_compiler.passes.insert_casts import PROMOTING
from amp_compiler.passes.kinds import node_kind
from amp_compiler.passes.onnx_graph import (FLOAT_TYPES, TORCH_TO_ONNX, convert_tensor, inferred_types,
                                            opset_of, refresh_value_info, slot_type_vars)
from amp_compiler.passes.onnx_rewrite import set_io_dtype
from amp_compiler.passes.onnx_transposes import hazard_message, sink_transposes

log = logging.getLogger("amp_compiler")

# Node metadata keys that carry source locations / code text of the exporting machine.
_PRIVATE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _inference_graph(amp) -> torch.fx.GraphModule:
    """The eval graph with weight casts folded, without changing ``amp`` (see module docstring)."""
    was_training = amp.training
    try:
        if was_training:
            amp.eval()
        gm = amp.graph_module
        if not amp.folded:
            gm = copy_graph_module(gm)
            fold_weights(gm, amp.casts)
        return gm
    finally:
        if was_training:
            amp.train(True)


def explicit_promotions(gm: torch.fx.GraphModule, example_inputs: tuple) -> torch.fx.GraphModule:
    """A copy of ``gm`` (never ``gm`` itself: the run records shapes in node metadata) where
    every promoting elementwise op (rule I7's ``add``, ``mul``...) whose float operands differ
    in dtype reads them cast to its result dtype. Dtypes come from one run on the inputs."""
    def dtype_of(n) -> torch.dtype | None:
        meta = n.meta.get("tensor_meta") if isinstance(n, torch.fx.Node) else None
        return getattr(meta, "dtype", None)

    gm = copy_graph_module(gm)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001 -- inputs the model does not accept
        raise OnnxError(f"the converted graph does not run on these example inputs "
                        f"({_root_cause(exc)}); torch.onnx.export needs inputs the model "
                        f"accepts") from exc
    changed = False
    for node in list(gm.graph.nodes):
        out = dtype_of(node)
        if node.op != "call_function" or out is None or not out.is_floating_point \
                or node_kind(node, gm) not in PROMOTING:
            continue
        for src in node.all_input_nodes:
            have = dtype_of(src)
            if have is None or not have.is_floating_point or have == out \
                    or not src.meta["tensor_meta"].shape:  # 0-dim: does not promote
                continue
            with gm.graph.inserting_before(node):
                cast = gm.graph.call_method("to", (src, out))
            node.replace_input_with(src, cast)
            changed = True
    if changed:
        gm.recompile()
    return gm


def _dynamic_shapes(example_inputs: tuple, dynamic_batch: bool):
    if not dynamic_batch:
        return None
    return tuple({0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None
                 for a in example_inputs)


# torch's exporter writes this opset and converts to others with the ONNX version converter,
# which always converts up and, for some ops only, down (measured with torch 2.13: resnet and
# gpt fall back to 18 from any lower opset, an MLP converts down to 14)
NATIVE_OPSET = 18


def max_opset() -> int:
    """The newest default-domain opset the installed onnx package knows."""
    return onnx.defs.onnx_opset_version()


def check_opset(opset) -> None:
    """``export_onnx(opset=...)``: None (the exporter's own) or an opset this onnx knows."""
    if opset is None:
        return
    if not isinstance(opset, int) or isinstance(opset, bool) or not 1 <= opset <= max_opset():
        raise ConfigError(f"opset={opset!r} is not an ONNX opset this install can write: use "
                          f"{NATIVE_OPSET}-{max_opset()} (always honoured), a lower one if the "
                          f"model converts down to it, or None for {NATIVE_OPSET}")


def _torch_export(gm: torch.nn.Module, example_inputs: tuple, opset: int | None, dynamic_batch: bool):
    supported = inspect.signature(torch.onnx.export).parameters
    kwargs: dict[str, Any] = {"dynamo": True, "verbose": False}
    if "optimize" in supported:
        kwargs["optimize"] = False  # run below, after which we repair what it breaks
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    shapes = _dynamic_shapes(example_inputs, dynamic_batch)
    if shapes is not None:
        kwargs["dynamic_shapes"] = shapes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm, example_inputs, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- any exporter failure becomes one typed error
        raise OnnxError(
            f"torch.onnx.export(dynamo=True) could not export the converted graph "
            f"({_root_cause(exc)}). Try dynamic_batch=False or another opset; or export the fp32 "
            f"model yourself and convert that file with convert_onnx()") from exc
    if program is None:
        raise OnnxError("torch.onnx.export returned no program; torch >= 2.6 with onnxscript is needed")
    try:
        program.optimize()
    except Exception as exc:  # noqa: BLE001 -- an unoptimized graph is still a correct one
        log.warning("ONNX optimizer failed (%s: %s); exporting the graph unoptimized",
                    type(exc).__name__, exc)
    return program.model_proto


def _root_cause(exc: BaseException) -> str:
    """'Type: first line' of the innermost exception: the exporter wraps the real error in
    several layers of advice text."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    return f"{type(exc).__name__}: {next((line for line in lines if line), '')}"[:500]


def _match_initializer_types(model: onnx.ModelProto) -> int:
    """Initializers whose float dtype differs from the computed inputs sharing their schema type
    variable take those inputs' dtype (a copy when other consumers still need the original).
    Returns how many were changed."""
    g = model.graph
    types = inferred_types(model)
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for v in node.input:
            if v in inits:
                uses[v] = uses.get(v, 0) + 1
    opset = opset_of(model)
    copies: dict[tuple[str, int], str] = {}
    changed = 0
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or opset is None:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except Exception:  # noqa: BLE001
            continue
        variables = {tc.type_param_str for tc in schema.type_constraints}
        groups: dict[str, list[int]] = {}
        for i, (v, t) in enumerate(zip(node.input, slot_type_vars(list(schema.inputs), len(node.input)))):
            if v and t in variables:
                groups.setdefault(t, []).append(i)
        for slots in groups.values():
            computed = {types.get(node.input[i]) for i in slots if node.input[i] not in inits}
            computed &= FLOAT_TYPES
            if len(computed) != 1:
                continue
            want = computed.pop()
            for i in slots:
                name = node.input[i]
                t = inits.get(name)
                if t is None or t.data_type not in FLOAT_TYPES or t.data_type == want:
                    continue
                if uses.get(name, 0) == 1:
                    t.CopyFrom(convert_tensor(t, want)[0])
                else:
                    if (name, want) not in copies:
                        fresh = f"{name}_as{want}"
                        new = convert_tensor(t, want, name=fresh)[0]
                        g.initializer.append(new)
                        copies[(name, want)] = fresh
                    node.input[i] = copies[(name, want)]
                changed += 1
    if changed:  # the recorded value types downstream came from the wrong dtypes
        refresh_value_info(model)
    return changed


def _strip_private_metadata(model: onnx.ModelProto) -> None:
    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            keep = [p for p in node.metadata_props if p.key not in _PRIVATE_METADATA]
            if len(keep) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)
    walk(model.graph)


def check(model: onnx.ModelProto, what: str) -> None:
    """``onnx.checker.check_model(full_check=True)`` as an OnnxError naming ``what``."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise OnnxError(f"{what} fails onnx.checker: {exc}") from exc


def export_onnx(amp, example_inputs, path: str | os.PathLike, *, opset: int | None = None,
                dynamic_batch: bool = True, keep_io_types: bool = True, overwrite: bool = False) -> str:
    """Export a converted model to ONNX with explicit Casts and low-precision initializers.

    Args:
        amp: the ``AmpModule`` returned by ``amp_compiler.convert``; it is not changed (see the
            module docstring for what happens to a training-mode one).
        example_inputs: a tuple of inputs (one tensor may be passed alone).
        path: the ``.onnx`` file to write.
        opset: ONNX opset; None lets the exporter choose (18). 18 up to the newest opset of
            the installed onnx are honoured; lower ones only when the model converts down to
            them (else ``OnnxError``); others raise ``ConfigError``.
        dynamic_batch: dimension 0 of every tensor input is dynamic.
        keep_io_types: True keeps inputs/outputs in their original dtype; False makes floating
            ones the low dtype.
        overwrite: replace an existing file (otherwise ``OnnxFileExistsError``).

    Returns:
        The absolute path written.

    Example:
        >>> amp = ac.convert(model.eval(), (x,))
        >>> ac.export_onnx(amp, (x,), "model.onnx")
        '/abs/path/model.onnx'
    """
    if not isinstance(amp, AmpModule):
        raise ConfigError(f"export_onnx() takes the AmpModule returned by convert(), got "
                          f"{type(amp).__name__}; to convert an existing ONNX file use convert_onnx()")
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    check_opset(opset)
    check_destination(path, overwrite)  # fail before the slow part
    gm = explicit_promotions(_inference_graph(amp), example_inputs)
    model = _torch_export(gm, example_inputs, opset, dynamic_batch)
    if opset is not None and opset_of(model) != opset:
        # the exporter falls back to its native opset, with only a log line, when the ONNX
        # version converter cannot reach the one asked for (no down-adapter for an op)
        raise OnnxError(f"torch.onnx.export could not write this model at opset {opset} (it wrote "
                        f"opset {opset_of(model)}: the ONNX version converter cannot take "
                        f"one of its ops there); opsets {NATIVE_OPSET}-{max_opset()} are always "
                        f"honoured")
    n = _match_initializer_types(model)
    if n:
        log.info("re-typed %d initializers the ONNX optimizer left in the wrong dtype", n)
    _strip_private_metadata(model)
    if not keep_io_types:
        set_io_dtype(model, TORCH_TO_ONNX[amp.low_dtype])
    # last before the checker: the io retyping above may hand a low input straight to a Conv
    legalised = legalise_types(model)
    if legalised:
        log.info("kept %d ONNX nodes out of %s (their schema has no such type at this opset): %s",
                 len(legalised), type_name(legalised[0].was),
                 "; ".join(f"{r.node} ({r.op_type})" for r in legalised))
    moved, hazards = sink_transposes(model).facts  # docstring, 7: a file ONNX Runtime loads without crashing
    if moved:
        log.info("moved %d Transposes below their MatMul (rule W9): %s", len(moved), ", ".join(moved))
    if hazards:
        log.warning(hazard_message(hazards))
    check(model, "the exported model")
    return save_model(model, path, overwrite=overwrite)
