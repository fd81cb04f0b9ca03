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
5. Legalisation (``legalise_types``): before opset 22 many ONNX ops (Conv, ConvTranspose,
   MaxPool, AveragePool, InstanceNormalization, LSTM, Sin/Cos, ...) have no ``tensor(bfloat16)``
   in their schema's type constraints, so a bf16 plan that computes them low exports an invalid
   file. Every node whose schema rejects the low-precision float type it receives on an input
   computes in float32 instead (numerically safe; float16 only if the schema lacks float): its
   inputs of that type variable are cast up and its outputs of that variable cast back to the
   type they had, so the rest of the graph is unchanged. A value made by a Cast from float32
   (ours included) is read at its source, never cast twice; an initializer is converted in the
   file (in place when nothing else reads it, else as a copy), not cast at every run. Each such
   node gets the metadata entry ``amp_compiler.reason`` saying why, and the nodes are logged.
   A valid graph (fp16 at these opsets) is left untouched.
6. Type promotion made explicit (``explicit_promotions``): rule I7 lets an fp32 elementwise op
   read a low-precision operand as it is (torch promotes inside the kernel). ONNX has no
   promotion, and the exporter's own promotion pass fails on some of these nodes (torch 2.11:
   ``Expected same OpOverload packet, got prim.device != aten.mul`` on ConvNeXt's fp32 layer
   scale times an fp16 branch), so before exporting, a copy of the graph gets an explicit
   ``.to()`` on every such operand: the Cast ONNX needs there anyway.
7. No ONNX Runtime crash (``passes.onnx_rewrite`` rule W9, ``sink_transposes``): a
   ``Transpose`` moving axis 1 first on its way to a MatMul with a 2-D weight
   (``nn.MultiheadAttention(batch_first=True)`` transposes its input before the in-projection)
   makes ONNX Runtime 1.32's ``MatmulTransposeFusion`` leave an unresolved node that its
   ``NchwcTransformer`` dereferences: ``InferenceSession(path)`` dies with SIGSEGV at the
   default optimization level. The Transpose moves below the MatMul and its bias Add (the same
   values and Casts); a match that cannot move is logged with the session option that avoids
   the crash. Last before the checker: the io retyping and legalisation may add Casts.
8. ``onnx.checker.check_model(full_check=True)`` must pass; the file is written atomically
   (temporary file in the same folder, then ``os.replace``), never over an existing file unless
   ``overwrite=True``, and no partial file is left on error.

    >>> amp = ac.convert(model.eval(), example_inputs)
    >>> path = export_onnx(amp, example_inputs, "model.onnx")
    >>> verify_onnx(path, model, example_inputs)["max_rel"] < 1e-2
    True
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from amp_compiler.errors import ConfigError, OnnxError
from amp_compiler.passes.onnx_rewrite import (FLOAT_TYPES, ONNX_TO_TORCH, REASON_KEY, SHORT,
                                              TORCH_TO_ONNX, TYPE_STR, _Names, convert_tensor,
                                              hazard_message, outer_references, set_io_dtype,
                                              sink_transposes, slot_type_vars, value_types)
from amp_compiler.passes.plan import dtype_name

log = logging.getLogger("amp_compiler")

# Node metadata keys that carry source locations / code text of the exporting machine.
_PRIVATE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
# Protobuf files cannot exceed 2 GiB; above this the weights go to a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


class OnnxFileExistsError(OnnxError, FileExistsError):
    """The destination file exists and ``overwrite=True`` was not given."""


# -- files ------------------------------------------------------------------------------------------

def check_destination(path: str | os.PathLike, overwrite: bool, *,
                      error: type[Exception] = OnnxError, example: str = "model.onnx") -> str:
    """The absolute destination path; raises if it exists (without overwrite) or has no folder
    (``error`` for a folder or a missing folder, the example file name in its message).

    A symbolic link counts as existing even when it dangles: writing "through" it would create
    or clobber a file elsewhere. With ``overwrite`` the link itself is replaced (``replacing``).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise error(f"'{path}' is a folder; pass a file path such as '{os.path.join(path, example)}'")
    if os.path.lexists(path) and not overwrite:
        raise OnnxFileExistsError(f"'{path}' already exists; pass overwrite=True to replace it")
    if not os.path.isdir(os.path.dirname(path)):
        raise error(f"the folder of '{path}' does not exist; create it first")
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a folder's entries) to disk; folders that refuse fsync are skipped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):  # a file that cannot reach the disk is an error
            raise
        # some file systems do not fsync folders
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """Write a file atomically: yields a temporary path in a fresh folder beside ``path``; when
    the block succeeds the file is flushed to disk and ``os.replace``d onto ``path`` (a link at
    ``path`` is replaced, never followed), so readers see the old file or the whole new one.
    On error nothing is left behind. Other files may be put in the yielded path's folder."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    tmpdir = tempfile.mkdtemp(prefix=".amp_tmp_", dir=folder)
    try:
        tmp = os.path.join(tmpdir, base)
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, os.path.join(folder, base))
        fsync_path(folder)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``model`` atomically: a temporary folder beside ``path``, then ``os.replace``.

    Models over ~1.8 GB keep their weights in ``<name>.data`` beside the file (moved first, so
    the model file never points at a missing one). On any error nothing is left behind.
    """
    path = check_destination(path, overwrite)
    folder, base = os.path.split(path)
    with replacing(path) as tmp:
        try:
            large = model.ByteSize() > _EXTERNAL_DATA_BYTES
        except ValueError:  # protobuf refuses to size messages over 2 GiB
            large = True
        if large:
            data = base + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data, size_threshold=1024)
            staged = os.path.join(os.path.dirname(tmp), data)
            fsync_path(staged)
            os.replace(staged, os.path.join(folder, data))
        else:
            onnx.save_model(model, tmp)
    return path


# -- export -----------------------------------------------------------------------------------------

def _inference_graph(amp) -> torch.fx.GraphModule:
    """The eval graph with weight casts folded, without changing ``amp`` (see module docstring)."""
    from amp_compiler.passes.fold_weights import fold_weights

    was_training = amp.training
    try:
        if was_training:
            amp.eval()
        gm = amp.graph_module
        if not amp.folded:
            from amp_compiler.module import copy_graph_module

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
    from torch.fx.passes.shape_prop import ShapeProp

    from amp_compiler.capture.frontend import node_kind
    from amp_compiler.module import copy_graph_module
    from amp_compiler.passes.insert_casts import PROMOTING

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
    from torch.export import Dim

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


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        return value_types(onnx.shape_inference.infer_shapes(model).graph)
    except Exception:  # noqa: BLE001 -- declared types are all we have then
        return value_types(model.graph)


def _refresh_value_info(model: onnx.ModelProto) -> None:
    """Recorded value types describe the graph before a retyping: drop them and infer again."""
    g = model.graph
    del g.value_info[:]
    try:
        g.value_info.extend(onnx.shape_inference.infer_shapes(model).graph.value_info)
    except Exception:  # noqa: BLE001 -- value_info is optional
        pass


def _match_initializer_types(model: onnx.ModelProto) -> int:
    """Initializers whose float dtype differs from the computed inputs sharing their schema type
    variable take those inputs' dtype (a copy when other consumers still need the original).
    Returns how many were changed."""
    g = model.graph
    types = _inferred_types(model)
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for v in node.input:
            if v in inits:
                uses[v] = uses.get(v, 0) + 1
    opset = _default_opset(model)
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
        _refresh_value_info(model)
    return changed


# -- legalisation: ops whose schema has no kernel type for the low dtype (module docstring, 5) ----

_LOW_TYPES = (TensorProto.BFLOAT16, TensorProto.FLOAT16)
# Safest first: float32 holds every float16/bfloat16 value exactly.
_FALLBACK_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)


def _type_name(elem_type: int) -> str:
    return dtype_name(ONNX_TO_TORCH[elem_type])


@dataclass(frozen=True)
class Legalised:
    """One node moved off a low dtype its ONNX schema does not allow at the file's opset."""

    node: str
    op_type: str
    was: int      # ONNX element type the plan gave it (TensorProto.BFLOAT16 ...)
    now: int      # ONNX element type it computes in now (TensorProto.FLOAT)
    reason: str


def _illegal_variables(node: onnx.NodeProto, schema, types: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Type variables of ``node`` whose low float type the schema rejects: var -> (had, fallback)."""
    allowed = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
    bad: dict[str, tuple[int, int]] = {}
    for v, t in zip(node.input, slot_type_vars(list(schema.inputs), len(node.input))):
        et = types.get(v) if v else None
        if t is None or et not in _LOW_TYPES or t in bad:
            continue
        ok = allowed.get(t, {t})  # a fixed type_str allows exactly itself
        if TYPE_STR[et] in ok:
            continue
        fallback = next((f for f in _FALLBACK_TYPES if TYPE_STR[f] in ok), None)
        if fallback is not None and t in allowed:  # a fixed-type slot cannot be retyped by casting others
            bad[t] = (et, fallback)
    return bad


def legalise_types(model: onnx.ModelProto) -> list[Legalised]:
    """Make every top-level node read float types its schema allows (module docstring, 5).

    Changes ``model`` in place; returns one record per node moved to a wider float type.
    """
    opset = _default_opset(model)
    if opset is None:
        return []
    g = model.graph
    types = _inferred_types(model)
    found: list[tuple[onnx.NodeProto, dict[str, tuple[int, int]], object]] = []
    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except Exception:  # noqa: BLE001 -- not a standard op at this opset: nothing to check
            continue
        bad = _illegal_variables(node, schema, types)
        if bad:
            found.append((node, bad, schema))
    if not found:
        return []

    names = _Names(model)
    inits = {t.name: t for t in g.initializer}
    overridable = {i.name for i in g.input}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for v in list(n.input) + outer_references(n):
            readers[v] = readers.get(v, 0) + 1
    for o in g.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    before: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> casts placed right before it
    after: dict[int, list[onnx.NodeProto]] = {}
    cast_cache: dict[tuple[str, int], str] = {}
    init_uses: dict[tuple[str, int], list[tuple[onnx.NodeProto, int]]] = {}
    bypassed: set[int] = set()
    records: list[Legalised] = []

    def deliver(value: str, want: int, node: onnx.NodeProto, slot: int) -> None:
        if value in inits and value not in overridable:
            init_uses.setdefault((value, want), []).append((node, slot))
            return
        src = producer.get(value)
        if src is not None and src.op_type == "Cast" and types.get(src.input[0]) == want:
            node.input[slot] = src.input[0]  # Cast(fp32 -> bf16) then back: read the fp32 source
            readers[value] -= 1
            bypassed.add(id(src))
            return
        key = (value, want)
        if key not in cast_cache:
            out = names.fresh(f"{value}_{SHORT[want]}")
            before.setdefault(id(node), []).append(
                helper.make_node("Cast", [value], [out], to=want, name=names.fresh(f"amp_legal_{out}")))
            cast_cache[key] = out
        node.input[slot] = cast_cache[key]

    for node, bad, schema in found:
        in_vars = slot_type_vars(list(schema.inputs), len(node.input))
        out_vars = slot_type_vars(list(schema.outputs), len(node.output))
        for i, (v, t) in enumerate(zip(node.input, in_vars)):
            if v and t in bad and types.get(v) in FLOAT_TYPES and types.get(v) != bad[t][1]:
                deliver(v, bad[t][1], node, i)
        for k, (o, t) in enumerate(zip(node.output, out_vars)):
            if o and t in bad:
                inner = names.fresh(f"{o}_{SHORT[bad[t][1]]}")
                node.output[k] = inner
                back = helper.make_node("Cast", [inner], [o], to=types.get(o, bad[t][0]),
                                        name=names.fresh(f"amp_legal_{o}"))
                after.setdefault(id(node), []).append(back)
                # a legalised reader of ``o`` further down reads ``inner`` (deliver's bypass)
                producer[o] = back
                types[inner] = bad[t][1]
        had, now = next(iter(bad.values()))
        reason = (f"ONNX {node.op_type} (opset {opset}) has no {TYPE_STR[had]} in type constraint "
                  f"{', '.join(sorted(bad))}: computed in {_type_name(now)}, outputs cast back to "
                  f"{_type_name(had)}")
        node.metadata_props.add(key=REASON_KEY, value=reason)
        records.append(Legalised(node.name, node.op_type, had, now, reason))

    # initializers: converted in the file rather than cast at every run; renamed, since the
    # exported name says "_bf16"; in place when only legalised nodes read it, else a copy
    for (name, want), uses in init_uses.items():
        new_name = names.fresh(f"{re.sub(r'_b?f16$', '', name)}_{SHORT[want]}")
        tensor = convert_tensor(inits[name], want, name=new_name)[0]
        if readers.get(name, 0) == len(uses) and sum(1 for (n, _) in init_uses if n == name) == 1:
            inits[name].CopyFrom(tensor)
        else:
            g.initializer.append(tensor)
        for n, slot in uses:
            n.input[slot] = new_name

    def unread(n: onnx.NodeProto) -> bool:  # every reader now reads the Cast's source
        return id(n) in bypassed and readers.get(n.output[0], 0) == 0

    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if not unread(n):
            nodes.extend(before.get(id(n), ()))
            nodes.append(n)
        nodes.extend(c for c in after.get(id(n), ()) if not unread(c))
    del g.node[:]
    g.node.extend(nodes)
    _refresh_value_info(model)
    return records


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
    from amp_compiler.module import AmpModule

    if not isinstance(amp, AmpModule):
        raise ConfigError(f"export_onnx() takes the AmpModule returned by convert(), got "
                          f"{type(amp).__name__}; to convert an existing ONNX file use convert_onnx()")
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    check_opset(opset)
    check_destination(path, overwrite)  # fail before the slow part
    gm = explicit_promotions(_inference_graph(amp), example_inputs)
    model = _torch_export(gm, example_inputs, opset, dynamic_batch)
    if opset is not None and _default_opset(model) != opset:
        # the exporter falls back to its native opset, with only a log line, when the ONNX
        # version converter cannot reach the one asked for (no down-adapter for an op)
        raise OnnxError(f"torch.onnx.export could not write this model at opset {opset} (it wrote "
                        f"opset {_default_opset(model)}: the ONNX version converter cannot take "
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
                 len(legalised), _type_name(legalised[0].was),
                 "; ".join(f"{r.node} ({r.op_type})" for r in legalised))
    moved, hazards = sink_transposes(model)  # docstring, 7: a file ONNX Runtime loads without crashing
    if moved:
        log.info("moved %d Transposes below their MatMul (rule W9): %s", len(moved), ", ".join(moved))
    if hazards:
        log.warning(hazard_message(hazards))
    check(model, "the exported model")
    return save_model(model, path, overwrite=overwrite)


# -- running and checking -----------------------------------------------------------------------------

def ort_providers() -> list[str]:
    """ONNX Runtime's execution providers, after letting onnxruntime-gpu find the CUDA
    libraries torch's wheels installed (``preload_dlls``; without it a CUDA session fails to
    load them)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 -- libraries missing: the CUDA session says so itself
            pass
    return ort.get_available_providers()


def onnx_session(path, providers: list[str] | None = None, *, quiet: bool = False):
    """An ``onnxruntime.InferenceSession``: CUDAExecutionProvider when ORT has it, else CPU.

    ``path`` may also be an ``onnx.ModelProto`` or serialized bytes. The session is built in this
    process: a file that crashes ONNX Runtime takes the process with it
    (``amp_compiler.onnx.check.probe_onnx`` opens a file in a child process first). ``quiet``:
    errors only in ONNX Runtime's log (not the CUDA provider's "nodes placed on the CPU" notes).

        >>> onnx_session("model.onnx").get_providers()[0]
        'CPUExecutionProvider'
    """
    import onnxruntime as ort

    if providers is None:
        available = ort_providers()
        providers = [p for p in ("CUDAExecutionProvider",) if p in available] + ["CPUExecutionProvider"]
    source = path.SerializeToString() if isinstance(path, onnx.ModelProto) else (
        path if isinstance(path, (bytes, bytearray)) else os.fspath(path))
    options = ort.SessionOptions()
    if quiet:
        options.log_severity_level = 3
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # noqa: BLE001
        raise OnnxError(f"ONNX Runtime cannot load the model ({type(exc).__name__}: {exc})") from exc


_ORT_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _leaves(x) -> list:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(x) if t is not None]


def verify_onnx(path, reference: torch.nn.Module, example_inputs, *, session=None) -> dict:
    """Run the ONNX file and ``reference`` on the same inputs; errors of each output.

    ``reference`` is any torch module (the fp32 model, or an AmpModule); one in training mode is
    run in eval mode and switched back. Floating inputs are given to ONNX Runtime in the dtype
    the file declares (float16 files made with ``keep_io_types=False`` included).

    Returns ``{"outputs": [{"name", "max_abs", "max_rel"}], "max_abs", "max_rel", "provider"}``,
    with relative error max|onnx - ref| / max|ref| (infinite when ONNX gives inf/nan where the
    reference is finite).

        >>> verify_onnx("model.onnx", model, (x,))["max_rel"]
        0.00031
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    session = session or onnx_session(path)
    metas = session.get_inputs()
    arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
              for t in _leaves(example_inputs)]
    if len(arrays) != len(metas):
        raise OnnxError(f"the ONNX model takes {len(metas)} inputs, {len(arrays)} were given")
    feeds = {}
    for meta, a in zip(metas, arrays):
        want = _ORT_NUMPY.get(meta.type)
        feeds[meta.name] = a.astype(want) if want is not None and a.dtype.kind == "f" else a
    outputs = session.run(None, feeds)

    was_training = reference.training
    try:
        if was_training:
            reference.eval()
        with torch.no_grad():
            ref = _leaves(reference(*example_inputs))
    finally:
        if was_training:
            reference.train(True)
    if len(ref) != len(outputs):
        raise OnnxError(f"the ONNX model gives {len(outputs)} outputs, the reference {len(ref)}")
    rows = []
    for meta, got, want in zip(session.get_outputs(), outputs, ref):
        a = np.asarray(got, dtype=np.float64)
        b = want.detach().cpu().double().numpy()
        diff = np.abs(a - b)
        if diff.size == 0:
            max_abs = 0.0
        elif not np.all(np.isfinite(diff)[np.isfinite(b)]):
            max_abs = float("inf")
        else:
            max_abs = float(np.nanmax(diff))
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        rows.append({"name": meta.name, "max_abs": max_abs,
                     "max_rel": max_abs / scale if scale > 0 else max_abs})
    return {"outputs": rows, "max_abs": max(r["max_abs"] for r in rows),
            "max_rel": max(r["max_rel"] for r in rows), "provider": session.get_providers()[0]}
