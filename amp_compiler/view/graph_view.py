"""The picture's model: one ``GraphView`` (boxes and edges) built from a converted model's plan,
casts and dataflow graph, which every format then draws, so all pictures agree.

Graphs over ``AUTO_COLLAPSE_NODES`` nodes (or ``collapse=N``) are collapsed by module path,
each box counting what it holds ("transformer.h.0.attn: 12 bfloat16 / 2 fp32 / 3 casts").

    >>> view = graph_view(amp, collapse=3)           # or collapse="none" / "auto"
    >>> [n.label for n in view.nodes.values() if n.group][:1]
    ['transformer.h.0']
    >>> view.nx                                       # the same as a networkx DiGraph
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch

from amp_compiler.errors import ConfigError
from amp_compiler.passes.dtypes import dtype_name, label
from amp_compiler.passes.kinds import NON_TENSOR_KINDS
from amp_compiler.passes.plan import PrecisionPlan
from amp_compiler.view import report

__all__ = ["GraphView", "ViewNode", "ViewEdge", "graph_view", "AUTO_COLLAPSE_NODES"]

# Beyond this many boxes a flat picture stops being readable on one screen (measured on the gpt
# reference model: 2 layers draw ~80 boxes, 12 layers ~450).
AUTO_COLLAPSE_NODES = 150


@dataclass
class ViewNode:
    """One box of the picture: a graph node, a cast, or (collapsed) a module's nodes."""

    id: str
    label: str
    sublabel: str
    style: str                      # a key of style.STYLES
    fp32_acc: bool = False
    unknown: bool = False
    group: bool = False
    info: dict[str, str] = field(default_factory=dict)   # tooltip fields, in order
    counts: dict[str, int] = field(default_factory=dict)  # group: low / fp32 / casts / other
    order: int = 0

    def tooltip(self) -> str:
        """The hover text: one "field: value" line per ``info`` entry."""
        return "\n".join(f"{k}: {v}" for k, v in self.info.items())


@dataclass(frozen=True)
class ViewEdge:
    src: str
    dst: str
    cast: str | None = None   # short dtype name when the edge carries a cast ("bf16")
    count: int = 1            # underlying edges (collapsed views)


@dataclass
class GraphView:
    """Nodes and edges to draw, plus the plan's totals; ``nx`` gives it as a networkx graph."""

    nodes: dict[str, ViewNode]
    edges: list[ViewEdge]
    title: str
    low_dtype: str
    summary: dict[str, object]
    collapsed_depth: int | None = None

    @property
    def nx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        for e in self.edges:
            g.add_edge(e.src, e.dst, cast=e.cast, count=e.count)
        return g

    def summary_line(self) -> str:
        return report.summary_line(self.summary)


# -- building the view ---------------------------------------------------------------------------

def _style_of(decision, role: str, low: torch.dtype) -> str:
    if role in ("input", "output"):
        return "io"
    if role in ("param", "const"):
        return "param"
    if decision.precision is None:
        return "nonfloat"
    return "low" if decision.precision == low else "fp32"


def _dataflow_of(amp):
    df = getattr(amp, "_dataflow", None) or getattr(amp, "dataflow", None)
    if df is None:
        raise ConfigError(f"{type(amp).__name__} carries no dataflow graph to draw; pass the "
                          f"AmpModule returned by amp_compiler.convert()")
    return df


def graph_view(amp, *, collapse: str | int | None = "auto", show_params: bool = False,
               show_shapes: bool = False, title: str | None = None) -> GraphView:
    """The picture of ``amp``'s plan: one box per node and per cast, edges carrying casts marked.

    Args:
        amp: an AmpModule (anything with ``plan``, ``casts``, ``low_dtype`` and a dataflow graph).
        collapse: ``"auto"`` (collapse by module path past ``AUTO_COLLAPSE_NODES`` boxes),
            ``"none"`` / None, or an int N: group by the first N parts of each module path.
        show_params: draw parameters and constants (and their casts) as boxes of their own.
        show_shapes: draw non-tensor nodes (sizes, guards, asserts).

    Example:
        >>> view = graph_view(amp, collapse=3)
        >>> [n.label for n in view.nodes.values() if n.group][:1]
        ['transformer.h.0']
    """
    plan: PrecisionPlan = amp.plan
    df = _dataflow_of(amp)
    low = amp.low_dtype
    g = df.nx

    hidden: set[str] = set()
    for name in df:
        v = df.vertex(name)
        if (v.role in ("param", "const") and not show_params) or (
                v.kind in NON_TENSOR_KINDS and not show_shapes):
            hidden.add(name)

    casts = list(amp.casts)
    # casts of hidden values (parameters) are listed on their consumer instead of drawn
    hidden_casts: dict[str, list[str]] = {}
    nodes: dict[str, ViewNode] = {}
    order = 0
    for name in df:
        if name in hidden:
            continue
        v = df.vertex(name)
        d = plan[name]
        info = {"node": name, "kind": d.kind, "category": d.category,
                "precision": dtype_name(d.precision), "rule": d.rule, "reason": d.reason}
        if v.module_path:
            info["module"] = v.module_path
        if v.shape is not None:
            info["shape"] = "(" + ", ".join(str(s) for s in v.shape) + ")"
        sub = d.kind if d.kind != name else ""
        if d.precision is not None and v.role == "compute":
            sub = f"{sub} · {label(d.precision)}".strip(" ·")
        nodes[name] = ViewNode(name, name, sub, _style_of(d, v.role, low),
                               fp32_acc=d.category == "fp32_acc", unknown=d.category == "unknown",
                               info=info, order=order)
        order += 1

    edges: dict[tuple[str, str], str | None] = {}
    for u, w in g.edges:
        if u in nodes and w in nodes:
            edges[(u, w)] = None
    cast_of: dict[str, str] = {}
    for c in casts:
        short = label(c.dtype)
        if c.source in hidden:
            for consumer in c.consumers:
                hidden_casts.setdefault(consumer, []).append(f"{c.source} → {short}")
            continue
        consumers = [x for x in c.consumers if x in nodes]
        if c.source not in nodes or not consumers:
            continue
        first = min(nodes[x].order for x in consumers)
        nodes[c.node] = ViewNode(c.node, f"→ {short}", c.node, "cast",
                                 info={"node": c.node, "kind": "cast", "value": c.source,
                                       "to": dtype_name(c.dtype),
                                       "consumers": ", ".join(c.consumers),
                                       "reason": "one cast per (value, dtype), shared by its "
                                                 "consumers, placed before the first (I2, I4)"},
                                 order=first)  # drawn where it runs: before its first consumer
        cast_of[c.node] = short
        edges[(c.source, c.node)] = short
        for x in consumers:
            edges.pop((c.source, x), None)
            edges[(c.node, x)] = short
    for consumer, items in hidden_casts.items():
        if consumer in nodes:
            nodes[consumer].info["casts in"] = "; ".join(items)

    # the cast boxes take the order of their first consumer, just before it
    ordered = sorted(nodes.values(), key=lambda n: (n.order, n.style != "cast"))
    for i, n in enumerate(ordered):
        n.order = i
    nodes = {n.id: n for n in ordered}
    edge_list = [ViewEdge(u, w, cast) for (u, w), cast in edges.items()]

    view = GraphView(nodes, edge_list, title or "precision plan", dtype_name(low),
                     report.summary(amp))

    depth = _collapse_depth(view, df, collapse)
    return _collapse(view, df, depth) if depth else view


def _module_path(df, node: ViewNode, view: GraphView) -> str:
    if node.style == "cast":
        # a cast lives with its first consumer (that is where it runs, rule I4)
        first = min((view.nodes[e.dst] for e in view.edges if e.src == node.id),
                    key=lambda n: n.order, default=None)
        return _module_path(df, first, view) if first is not None else ""
    if node.id in df and node.style != "io":
        return df.vertex(node.id).module_path or ""
    return ""


def _group_key(path: str, depth: int) -> str:
    return ".".join(path.split(".")[:depth]) if path else ""


def _collapse_depth(view: GraphView, df, collapse) -> int | None:
    if collapse in (None, "none", 0, "0"):
        return None
    if collapse == "auto":
        if len(view.nodes) <= AUTO_COLLAPSE_NODES:
            return None
        paths = {n: _module_path(df, node, view) for n, node in view.nodes.items()}
        deepest = max((len(p.split(".")) for p in paths.values() if p), default=1)
        # the most detailed grouping that still fits; one level if nothing does
        for depth in range(deepest, 0, -1):
            if len({_group_key(p, depth) or n for n, p in paths.items()}) <= AUTO_COLLAPSE_NODES:
                return depth
        return 1
    try:
        depth = int(collapse)
    except (TypeError, ValueError):
        raise ConfigError(f"collapse={collapse!r}: use 'auto', 'none' or a module-path depth "
                          f"(an integer >= 1)") from None
    if depth < 1:
        raise ConfigError(f"collapse={depth}: the module-path depth must be >= 1")
    return depth


def _collapse(view: GraphView, df, depth: int) -> GraphView:
    """Group boxes by the first ``depth`` parts of their module path; groups of one stay as is."""
    key_of: dict[str, str] = {}
    for name, node in view.nodes.items():
        key = _group_key(_module_path(df, node, view), depth)
        key_of[name] = key if key else name
    members: dict[str, list[ViewNode]] = {}
    for name, node in view.nodes.items():
        members.setdefault(key_of[name], []).append(node)
    low = label(view.low_dtype)

    nodes: dict[str, ViewNode] = {}
    for key, group in members.items():
        if len(group) == 1:
            only = group[0]
            key_of[only.id] = only.id
            nodes[only.id] = only
            continue
        c = Counter(n.style for n in group)
        counts = {"low": c["low"], "fp32": c["fp32"], "casts": c["cast"],
                  "other": c["nonfloat"] + c["param"] + c["io"],
                  "fp32_acc": sum(n.fp32_acc for n in group),
                  "unknown": sum(n.unknown for n in group)}
        parts = [f"{counts['low']} {low}", f"{counts['fp32']} fp32"]
        if counts["casts"]:
            parts.append(f"{counts['casts']} casts")
        style = "low" if counts["low"] >= counts["fp32"] and counts["low"] else (
            "fp32" if counts["fp32"] else ("cast" if counts["casts"] else "nonfloat"))
        rules = Counter(n.info.get("rule", "cast") for n in group if n.style != "cast")
        info = {"group": key, "nodes": str(len(group)), low: str(counts["low"]),
                "fp32": str(counts["fp32"]), "casts": str(counts["casts"]),
                "fp32_acc nodes": str(counts["fp32_acc"]),
                "rules": ", ".join(f"{r} ×{k}" for r, k in rules.most_common()),
                "members": ", ".join(n.id for n in group[:40]) + (" …" if len(group) > 40 else "")}
        if counts["unknown"]:
            info["unknown ops"] = str(counts["unknown"])
        gid = f"group:{key}"
        for n in group:
            key_of[n.id] = gid
        nodes[gid] = ViewNode(gid, key, " / ".join(parts), style,
                              fp32_acc=counts["fp32_acc"] > 0, unknown=counts["unknown"] > 0,
                              group=True, info=info, counts=counts,
                              order=min(n.order for n in group))
    edges: dict[tuple[str, str], list] = {}
    for e in view.edges:
        u, w = key_of[e.src], key_of[e.dst]
        if u == w:
            continue
        cast, count = edges.get((u, w), (None, 0))
        edges[(u, w)] = (cast or e.cast, count + 1)
    ordered = sorted(nodes.values(), key=lambda n: n.order)
    return GraphView({n.id: n for n in ordered},
                     [ViewEdge(u, w, cast, count) for (u, w), (cast, count) in edges.items()],
                     view.title, view.low_dtype, view.summary, collapsed_depth=depth)
