"""Range recording (analysis): run the fp32 captured graph on calibration batches and record,
per floating value, what it looked like (``ValueRange``).

An ``fx.Interpreter`` runs the un-rewritten graph and records max|x| (overall and per batch), the
fraction of non-zero values below each low dtype's smallest normal, and for reductions (linear,
matmul, conv, sum, mean) the reduced length and the largest accumulator any sign pattern of its
terms can give (max of sum|terms|, computed by running the op on |inputs|). It also runs every
compute node once more per low dtype, on its inputs rounded to that dtype where insert_casts
would cast them (``run_in_dtype``, shared with the tolerance search), and keeps the node's local
relative error. ``passes.ranges`` turns these facts into fp32 pins (rules D1-D4).

    >>> ranges = collect_ranges(gm, [(x1,), (x2,)], graph=build_dataflow(gm))
    >>> ranges["linear"].max_abs, ranges["linear"].reduce_len
    (3.91, 784)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.fx as fx

from amp_compiler.errors import ConfigError

from .graph import DataflowGraph
from .kinds import LEAF_PARAMS_FOLLOW, leaf_kind, target_name
from .metrics import float_tensors, rel_error
from .plan import dtype_name
from .runtime import module_in_dtype
from .slots import castable

LOW_DTYPES = (torch.float16, torch.bfloat16)

# Ops that sum over a reduced axis, and how long that axis is (from the fp32 inputs). The
# bound runs the op itself on |inputs|: sum|terms| for products and sums; ``mean`` divides by
# the length, so its bound is multiplied back (its kernel sums first).
REDUCTION_KINDS = frozenset({"linear", "matmul", "conv", "sum", "mean"})
# aten / torch names whose first tensor argument is an added bias, not the left factor
_BIAS_FIRST = frozenset({"addmm", "addmv", "baddbmm", "addbmm"})
# compute kinds never re-run in low precision: they do not compute on floating values
_NO_LOW_RUN = frozenset({"cast", "factory", "shape", "assert", "guards", "getitem", "output"})


@dataclass(frozen=True)
class ValueRange:
    """What one floating value looked like on the calibration batches.

    ``below_normal`` and ``low_error`` are keyed by dtype name ("float16", "bfloat16").
    ``reduce_len`` and ``acc_bound`` are set for reductions only. ``low_error`` is set for compute
    nodes that could be re-run in that dtype.
    """

    max_abs: float
    batch_max: tuple[float, ...]
    nonzero: int
    below_normal: Mapping[str, float]
    reduce_len: int | None = None
    acc_bound: float | None = None
    low_error: Mapping[str, float] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        return len(self.batch_max)


# -- calibration data ---------------------------------------------------------------------------

def check_calibration(calibration: Iterable) -> list[tuple]:
    """Calibration batches as a list of input tuples; ConfigError on NaN/inf or an empty set."""
    batches: list[tuple] = []
    for i, batch in enumerate(calibration):
        batch = batch if isinstance(batch, (tuple, list)) else (batch,)
        for j, x in enumerate(batch):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                bad = "NaN" if torch.isnan(x).any() else "inf" if torch.isinf(x).any() else None
                if bad:
                    raise ConfigError(f"calibration batch {i} contains {bad} at input {j}: range "
                                      f"analysis needs finite data; drop or clean that batch")
        batches.append(tuple(batch))
    if not batches:
        raise ConfigError("calibration is empty: pass an iterable of input tuples, e.g. "
                          "[(x1,), (x2,)], drawn from the data the model will see")
    return batches


# -- the recording interpreter ------------------------------------------------------------------

def _map_inputs(node: fx.Node, args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """Apply ``fn(producer_node, position, key, value)`` to every value fed by an fx.Node."""
    def walk(a_node, a_val, position, key):
        if isinstance(a_node, fx.Node):
            return fn(a_node, position, key, a_val)
        if isinstance(a_node, (list, tuple)) and isinstance(a_val, (list, tuple)) and len(a_node) == len(a_val):
            return type(a_val)(walk(n, v, position, key) for n, v in zip(a_node, a_val))
        return a_val
    new_args = tuple(walk(n, v, i, None) for i, (n, v) in enumerate(zip(node.args, args)))
    new_kwargs = {k: walk(node.kwargs[k], v, None, k) if k in node.kwargs else v for k, v in kwargs.items()}
    return new_args, new_kwargs


def run_target(interp: fx.Interpreter, node: fx.Node, args: tuple, kwargs: dict, dtype=None):
    """Run ``node``'s op on ``args``; with ``dtype``, leaf modules whose parameters must follow
    the compute dtype (``nn.LSTM``) run with their parameters cast, as insert_casts arranges."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if node.op == "call_module":
        module = interp.fetch_attr(node.target)
        if dtype is not None and dtype != torch.float32 and leaf_kind(module) in LEAF_PARAMS_FOLLOW:
            return module_in_dtype(module, dtype, *args, **kwargs)
        return module(*args, **kwargs)
    raise ValueError(f"cannot re-run node {node.name} ({node.op})")


def run_in_dtype(interp: fx.Interpreter, node: fx.Node, args: tuple, kwargs: dict,
                 graph: DataflowGraph, dtype: torch.dtype):
    """The node's output when it alone computes in ``dtype`` on its (fp32) inputs rounded to
    ``dtype``, exactly where insert_casts would cast them; returned as float32 (None if the op
    has no kernel for that dtype)."""
    float_inputs = set(graph.float_inputs(node.name))
    has_meta = "val" in node.meta
    kind = graph.vertex(node.name).kind

    def cast(src: fx.Node, position, key, value):
        if (src.name in float_inputs and isinstance(value, torch.Tensor) and value.is_floating_point()
                and value.dtype != torch.float64 and castable(kind, position, key, has_meta)):
            return value.detach().to(dtype)
        return value.detach() if isinstance(value, torch.Tensor) else value

    low_args, low_kwargs = _map_inputs(node, args, kwargs, cast)
    try:
        with torch.no_grad():
            out = run_target(interp, node, low_args, low_kwargs, dtype)
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # no kernel for this dtype on this device: nothing to measure
    return _to_float32(out)


def _to_float32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value) if not hasattr(value, "_fields") else \
            type(value)(*(_to_float32(v) for v in value))
    return value


def _reduce_len(node: fx.Node, kind: str, tensors: list[torch.Tensor], out: torch.Tensor) -> int | None:
    if not tensors:
        return None
    if kind in ("sum", "mean"):
        return max(1, tensors[0].numel() // max(1, out.numel()))
    if kind == "conv" and len(tensors) > 1:
        w = tensors[1]
        return int(w.shape[1] * math.prod(w.shape[2:]))
    left = tensors[1] if target_name(node) in _BIAS_FIRST and len(tensors) > 1 else tensors[0]
    return int(left.shape[-1]) if left.dim() else None


class _RangeRecorder(fx.Interpreter):
    """Runs the fp32 graph and accumulates per-node statistics (see ``ValueRange``)."""

    def __init__(self, gm: fx.GraphModule, graph: DataflowGraph, low_dtypes) -> None:
        super().__init__(gm)
        self.dataflow = graph
        self.low_dtypes = tuple(low_dtypes)
        self.stats: dict[str, dict] = {}

    def run_node(self, n: fx.Node):
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        v = self.dataflow.vertex(n.name) if n.name in self.dataflow else None
        compute = v is not None and v.role == "compute" and n.op.startswith("call") \
            and v.kind not in _NO_LOW_RUN and v.is_float is not False
        # measured before the op runs: an in-place op would change its own inputs
        low = {d: run_in_dtype(self, n, args, kwargs, self.dataflow, d) for d in self.low_dtypes} if compute else {}
        acc = None
        if compute and v.kind in REDUCTION_KINDS:
            acc = self._accumulator(n, args, kwargs)
        out = super().run_node(n)
        self._record(n, v, out, low, acc, args)
        return out

    def _accumulator(self, n, args, kwargs):
        def absolute(src, position, key, value):
            return value.detach().abs() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        abs_args, abs_kwargs = _map_inputs(n, args, kwargs, absolute)
        try:
            with torch.no_grad():
                return run_target(self, n, abs_args, abs_kwargs)
        except (RuntimeError, TypeError):
            return None

    def _record(self, n, v, out, low, acc, args) -> None:
        tensors = [t.detach() for t in float_tensors(out)]
        if not tensors:
            return
        s = self.stats.setdefault(n.name, {"batch_max": [], "nonzero": 0,
                                           "below": {dtype_name(d): 0 for d in LOW_DTYPES},
                                           "reduce_len": None, "acc": None, "low_error": {}})
        m, nonzero = 0.0, 0
        below = dict.fromkeys(s["below"], 0)
        for t in tensors:
            a = t.abs().float()
            finite = a[torch.isfinite(a)]
            m = max(m, finite.max().item() if finite.numel() else 0.0)
            nz = a[a > 0]
            nonzero += nz.numel()
            for d in LOW_DTYPES:
                below[dtype_name(d)] += int((nz < torch.finfo(d).smallest_normal).sum())
        s["batch_max"].append(m)
        s["nonzero"] += nonzero
        for k, c in below.items():
            s["below"][k] += c
        for d, low_out in low.items():
            if low_out is not None:
                e = rel_error(low_out, out)
                s["low_error"][dtype_name(d)] = max(s["low_error"].get(dtype_name(d), 0.0), e)
        if acc is not None and tensors and isinstance(out, torch.Tensor):
            ins = float_tensors(list(args))
            length = _reduce_len(n, v.kind, ins, out)
            bound = acc.abs().max().item() if isinstance(acc, torch.Tensor) and acc.numel() else 0.0
            if v.kind == "mean" and length:
                bound *= length  # mean's kernel sums before it divides
            s["reduce_len"] = length
            s["acc"] = max(s["acc"] or 0.0, bound)

    def ranges(self) -> dict[str, ValueRange]:
        out = {}
        for name, s in self.stats.items():
            nz = s["nonzero"]
            out[name] = ValueRange(
                max_abs=max(s["batch_max"]), batch_max=tuple(s["batch_max"]), nonzero=nz,
                below_normal={k: (c / nz if nz else 0.0) for k, c in s["below"].items()},
                reduce_len=s["reduce_len"], acc_bound=s["acc"], low_error=dict(s["low_error"]))
        return out


def collect_ranges(gm: fx.GraphModule, calibration: Iterable[tuple], *,
                   graph: DataflowGraph,
                   low_dtypes: Iterable[torch.dtype] = LOW_DTYPES) -> dict[str, ValueRange]:
    """Run the fp32 captured graph ``gm`` on every calibration batch; ValueRange per float value.

    ``gm`` must be the un-rewritten capture (no casts). Raises ConfigError when a batch holds
    NaN/inf ("calibration batch 2 contains NaN at input 0").

        >>> gm, _ = capture(model)
        >>> r = collect_ranges(gm, [(torch.randn(8, 784),)], graph=build_dataflow(gm))
        >>> r["linear"].max_abs, r["linear"].reduce_len
        (3.91, 784)
    """
    batches = check_calibration(calibration)
    recorder = _RangeRecorder(gm, graph, low_dtypes)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            _check_batch_shapes(gm, i, batch)
            try:
                recorder.run(*batch)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 -- the graph ran on the example inputs
                raise ConfigError(f"calibration batch {i} does not run through the model "
                                  f"({_first_line(exc)}); each batch must be an input tuple the "
                                  f"model accepts, like example_inputs "
                                  f"({_shapes(batch)} given)") from exc
    return recorder.ranges()


def _first_line(exc: BaseException) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line}"[:300]


def _shapes(batch: tuple) -> str:
    return ", ".join(f"{tuple(x.shape)} {dtype_name(x.dtype)}" if isinstance(x, torch.Tensor)
                     else type(x).__name__ for x in batch) or "no inputs"


def _check_batch_shapes(gm: fx.GraphModule, i: int, batch: tuple) -> None:
    """Against the shapes torch.export recorded for each input: fixed sizes must match (symbolic
    ones, such as the batch dimension, may differ). fx graphs record none; running them says."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(batch) > len(placeholders):  # the graph would silently ignore the rest
        raise ConfigError(f"calibration batch {i} has {len(batch)} inputs; the captured model "
                          f"takes {len(placeholders)} "
                          f"({', '.join(n.name for n in placeholders) or 'none'}), like "
                          f"example_inputs")
    for j, (node, x) in enumerate(zip(placeholders, batch)):
        want = node.meta.get("val")
        if not isinstance(want, torch.Tensor):
            continue
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"calibration batch {i}, input {j} ({node.name}) is a "
                              f"{type(x).__name__}; the model takes a tensor there, like "
                              f"example_inputs")
        fixed = [d if isinstance(d, int) else None for d in want.shape]
        if x.dim() != len(fixed) or any(f is not None and f != n for f, n in zip(fixed, x.shape)):
            spec = "(" + ", ".join("*" if f is None else str(f) for f in fixed) + ")"
            raise ConfigError(f"calibration batch {i}, input {j} ({node.name}) has shape "
                              f"{tuple(x.shape)}; the captured model takes {spec} (* may vary): "
                              f"give batches shaped like example_inputs")


# -- rules D1-D4 --------------------------------------------------------------------------------
