"""compare(): the per-node debugger. Runs the fp32 model's captured graph and the converted graph
on the same inputs, node by node, and says where they part ways.

Nodes are matched by name: the converted graph keeps the original node names, and the casts it
adds (``node.meta["amp_cast"]``) are compared with the value they cast. For each node the
report gives the relative error against fp32 (max|amp - fp32| / max|fp32|, computed where fp32
is finite), both magnitudes, and how many values went non-finite in the converted graph while
fp32 stayed finite. ``first_nonfinite`` is the first such node in execution order: the overflow
locator, usable on a model whose mixed-precision training went NaN (call it with the batch that
produced the NaN).

    >>> report = compare(model, amp, (x,))
    >>> report.first_nonfinite
    'linear_1'
    >>> report.print(top_k=10)   # the 10 worst nodes, in graph order

Both graphs keep every node's value until the end of the run (the fp32 one must, to be compared
against): use it on one batch, not a data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

from amp_compiler.capture import capture
from amp_compiler.errors import ConfigError
from amp_compiler.passes.plan import dtype_name
from amp_compiler.passes.metrics import float_tensors, rel_error


@dataclass(frozen=True)
class CompareRow:
    """One node of the converted graph against the same node of the fp32 graph."""

    node: str
    kind: str
    precision: str          # dtype the converted graph produced there ("float16", "float32", ...)
    rel_error: float        # vs fp32; inf when it went non-finite where fp32 is finite
    max_abs_fp32: float
    max_abs_amp: float
    nonfinite: int          # values non-finite in the converted graph, finite in fp32
    cast_of: str | None = None  # for casts the converter inserted: the value they cast


@dataclass
class CompareReport:
    """``rows`` in graph order; ``first_nonfinite``: the first node (or cast) whose value went
    inf/NaN where fp32 stayed finite; ``first_nan_fp32``: the first node where fp32 itself is NaN."""

    rows: list[CompareRow]
    first_nonfinite: str | None
    first_nan_fp32: str | None = None
    low_dtype: torch.dtype | None = None
    _by_name: dict[str, CompareRow] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {r.node: r for r in self.rows}

    def __getitem__(self, node: str) -> CompareRow:
        return self._by_name[node]

    def top(self, k: int) -> list[CompareRow]:
        """The ``k`` rows with the largest error, kept in graph order."""
        ranked = sorted(self.rows, key=lambda r: -r.rel_error if not math.isnan(r.rel_error) else 0.0)[:k]
        keep = {r.node for r in ranked}
        return [r for r in self.rows if r.node in keep]

    def overflow_message(self) -> str:
        if self.first_nonfinite is None:
            return "no value went inf/NaN in the converted graph where fp32 stayed finite"
        r = self[self.first_nonfinite]
        what = f"the cast of '{r.cast_of}' to {r.precision}" if r.cast_of else f"'{r.node}' ({r.kind}, {r.precision})"
        return (f"first inf/NaN: {what}: {r.nonfinite} values non-finite, fp32 max|x| there is "
                f"{r.max_abs_fp32:.3g}; pin it with keep_fp32=('node:{r.cast_of or r.node}',) or "
                f"convert with calibration data so range analysis does")

    def print(self, top_k: int | None = None, *, console=None) -> None:
        """A rich table in graph order (only the ``top_k`` worst nodes if given) and the
        overflow locator's verdict."""
        console = console or Console()
        rows = self.top(top_k) if top_k else self.rows
        title = "per-node error vs fp32" + (f" (top {top_k})" if top_k else "")
        table = Table(title=title, box=box.SIMPLE_HEAD)
        for col in ("node", "kind", "precision", "rel error", "max|fp32|", "max|amp|", "non-finite"):
            table.add_column(col, justify="right" if col.startswith(("rel", "max", "non")) else "left",
                             overflow="fold")
        for r in rows:
            style = "red" if r.node == self.first_nonfinite else ("yellow" if r.precision in ("float16", "bfloat16") else None)
            table.add_row(r.node, r.kind if not r.cast_of else f"cast of {r.cast_of}", r.precision,
                          f"{r.rel_error:.3g}", f"{r.max_abs_fp32:.3g}", f"{r.max_abs_amp:.3g}",
                          str(r.nonfinite) if r.nonfinite else "", style=style)
        console.print(table)
        console.print(self.overflow_message())
        if self.first_nan_fp32:
            console.print(f"note: the fp32 graph itself is NaN from '{self.first_nan_fp32}' on")


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps a detached copy of every node's floating value (copies: in-place
    ops later in the graph must not change what was recorded)."""

    def __init__(self, gm: fx.GraphModule, on_value=None) -> None:
        super().__init__(gm)
        self.values: dict[str, object] = {}
        self.on_value = on_value

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op not in ("placeholder", "get_attr", "output") and float_tensors(out):
            if self.on_value is not None:
                self.on_value(n, out)
            else:
                self.values[n.name] = _detached_copy(out)
        return out


def _detached_copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return [_detached_copy(v) for v in value]
    return value


def _max_abs(value) -> float:
    m = 0.0
    for t in float_tensors(value):
        a = t.detach().abs()
        a = a[torch.isfinite(a)]
        if a.numel():
            m = max(m, a.max().item())
    return m


def _nonfinite(out, ref) -> int:
    """Values non-finite in ``out`` at positions where ``ref`` is finite."""
    count = 0
    for o, r in zip(float_tensors(out), float_tensors(ref)):
        if o.shape == r.shape:
            count += int((~torch.isfinite(o) & torch.isfinite(r)).sum())
    return count


def _has_nan(value) -> bool:
    return any(bool(torch.isnan(t).any()) for t in float_tensors(value))


def _fp32_graph(model: nn.Module, amp: nn.Module, inputs: tuple) -> fx.GraphModule:
    """The model captured the way ``amp`` was (same front end, same mode), so names match."""
    if isinstance(model, fx.GraphModule):
        return model
    source = getattr(amp, "source", "fx")
    gm, _ = capture(model, inputs if source == "export" else None,
                    mode=bool(getattr(amp, "training", False)))
    return gm


def compare(model: nn.Module, amp: nn.Module, inputs, *, seed: int = 0) -> CompareReport:
    """Run fp32 ``model`` and converted ``amp`` on ``inputs`` node by node; see the module docstring.

    ``model`` is the original fp32 module (or its captured GraphModule), ``amp`` an AmpModule
    converted from it. Both runs start from the same RNG seed, so dropout draws the same masks
    when shapes agree (compare in eval mode for exact numbers).

        >>> report = compare(model, amp, (x,))
        >>> report["linear_1"].rel_error, report.first_nonfinite
        (inf, 'linear_1')
    """
    gm_amp = getattr(amp, "graph_module", None)
    if not isinstance(gm_amp, fx.GraphModule):
        raise ConfigError(f"compare() takes an AmpModule from amp_compiler.convert() as `amp`, got "
                          f"{type(amp).__name__}")
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    gm_ref = _fp32_graph(model, amp, inputs)
    plan = getattr(amp, "plan", {})

    ref_rec = _Recorder(gm_ref)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref_rec.run(*inputs)
    ref = ref_rec.values
    ref_names = {x.name for x in gm_ref.graph.nodes}
    missing = [x.name for x in gm_amp.graph.nodes if x.name in plan and x.name not in ref_names
               and plan[x.name].category not in ("input", "param", "const", "output")]
    if missing:
        raise ConfigError(f"the converted graph has nodes the fp32 capture lacks ({missing[:3]}): "
                          f"pass the model `amp` was converted from, unchanged")

    rows: list[CompareRow] = []
    first_nan_fp32 = next((n.name for n in gm_ref.graph.nodes if n.name in ref and _has_nan(ref[n.name])), None)

    def on_value(n: fx.Node, out) -> None:
        cast = n.meta.get("amp_cast")
        source = cast["source"] if cast else n.name
        if source not in ref:
            return
        r = ref[source]
        precisions = {dtype_name(t.dtype) for t in float_tensors(out)}
        kind = "cast" if cast else (plan[n.name].kind if n.name in plan else n.op)
        rows.append(CompareRow(n.name, kind, "/".join(sorted(precisions)), rel_error(out, r),
                               _max_abs(r), _max_abs(out), _nonfinite(out, r), source if cast else None))

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _Recorder(gm_amp, on_value).run(*inputs)
    first = next((r.node for r in rows if r.nonfinite), None)
    return CompareReport(rows, first, first_nan_fp32, getattr(amp, "low_dtype", None))
