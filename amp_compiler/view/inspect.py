"""Pictures of a precision plan: the dataflow graph coloured by precision, as DOT, SVG, HTML or Mermaid.

One ``GraphView`` is built from a converted model (``amp.plan``, ``amp.casts`` and the dataflow
graph) and every format is drawn from it, so all pictures agree:

    low-precision node   green fill            fp32 node        orange fill
    fp32-accumulating    thick blue outline    unknown op       red dashed outline
    cast                 purple hexagon; the edges into and out of it are purple
    non-float value      grey                  input / output   white, rounded

Graphs over ``AUTO_COLLAPSE_NODES`` nodes (or ``collapse=N``) are collapsed by module path,
each box counting what it holds ("transformer.h.0.attn: 12 bfloat16 / 2 fp32 / 3 casts").

    >>> view = graph_view(amp)                        # or graph_view(amp, collapse=3)
    >>> open("gpt.html", "w").write(to_html(view))    # offline page, hover for each Decision
    >>> print(to_mermaid(view))
    flowchart TD
    ...

``plan_table(plan)`` renders a saved PrecisionPlan (no model needed) as a rich table.
"""

from __future__ import annotations

import html as _html
import json
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch
from rich import box
from rich.table import Table

from amp_compiler.errors import ConfigError
from amp_compiler.passes.kinds import NON_TENSOR_KINDS
from amp_compiler.passes.plan import PrecisionPlan, dtype_name
from amp_compiler.view.report import literal

__all__ = ["GraphView", "ViewNode", "ViewEdge", "graph_view", "to_dot", "to_svg", "to_html",
           "to_mermaid", "render", "plan_table", "derive_casts", "FORMATS", "AUTO_COLLAPSE_NODES"]

FORMATS = ("svg", "html", "dot", "mermaid")
# Beyond this many boxes a flat picture stops being readable on one screen (measured on the gpt
# reference model: 2 layers draw ~80 boxes, 12 layers ~450).
AUTO_COLLAPSE_NODES = 150

# Look of each node class: fill, outline, text colour. One table, used by every format.
STYLES: dict[str, dict[str, str]] = {
    "low": {"fill": "#8fd694", "stroke": "#2e7d32", "text": "#0b2e0f"},
    "fp32": {"fill": "#f7b267", "stroke": "#c46a00", "text": "#3b1f00"},
    "cast": {"fill": "#c9a6e4", "stroke": "#6a1b9a", "text": "#2a0840"},
    "nonfloat": {"fill": "#e2e2e2", "stroke": "#8a8a8a", "text": "#333333"},
    "io": {"fill": "#ffffff", "stroke": "#444444", "text": "#111111"},
    "param": {"fill": "#dce6f2", "stroke": "#6b7f99", "text": "#1d2a3a"},
}
ACC_STROKE = "#1f4e9c"       # outline of fp32_acc nodes (layer_norm, softmax, ...)
UNKNOWN_STROKE = "#d32f2f"   # outline of ops no policy table knows
CAST_EDGE = "#8e24aa"
PLAIN_EDGE = "#8c8c8c"

_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


@dataclass
class ViewNode:
    """One box of the picture: a graph node, a cast, or (collapsed) a module's nodes."""

    id: str
    label: str
    sublabel: str
    style: str                      # a key of STYLES
    fp32_acc: bool = False
    unknown: bool = False
    group: bool = False
    info: dict[str, str] = field(default_factory=dict)   # tooltip fields, in order
    counts: dict[str, int] = field(default_factory=dict)  # group: low / fp32 / casts / other
    order: int = 0


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
        s = self.summary
        line = (f"{s['low']} nodes {s['dtype']}, {s['fp32']} fp32, {s['unknown']} unknown ops; "
                f"{s['casts']} casts in the graph ({s['param_casts']} of parameters)")
        return line + ("; weights folded" if s.get("folded") else "")


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
            sub = f"{sub} · {_SHORT.get(dtype_name(d.precision), dtype_name(d.precision))}".strip(" ·")
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
        short = _SHORT.get(dtype_name(c.dtype), dtype_name(c.dtype))
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

    present = amp.casts
    counts = plan.counts()
    summary = {**counts, "casts": len(present), "param_casts": sum(c.is_param for c in present),
               "dtype": dtype_name(low), "folded": bool(getattr(amp, "folded", False))}
    view = GraphView(nodes, edge_list, title or "precision plan", dtype_name(low), summary)

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
    low = _SHORT.get(view.low_dtype, view.low_dtype)

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


def derive_casts(plan: PrecisionPlan, dataflow) -> list:
    """The casts a plan implies on a dataflow graph, for IRs whose rewrite keeps no cast list
    (ONNX): one per (value, dtype) where a castable use needs another dtype than the value has.

    Example:
        >>> [c.node for c in derive_casts(plan, graph)][:2]
        ['MatMul_0->bf16', 'Softmax_3->fp32']
    """
    from amp_compiler.passes.insert_casts import CastRecord

    casts: dict[tuple[str, torch.dtype], list[str]] = {}
    for name in dataflow:
        v = dataflow.vertex(name)
        d = plan.get(name)
        if d is None or v.is_float is False:
            continue
        # a node outputs its compute precision; sources keep their stored dtype
        has = d.precision if v.role == "compute" and d.precision is not None else v.dtype
        for consumer in dataflow.float_consumers(name):
            need = plan[consumer].precision if consumer in plan else None
            if has is not None and need is not None and need != has:
                casts.setdefault((name, need), []).append(consumer)
    out = []
    for (source, dtype), consumers in casts.items():
        short = _SHORT.get(dtype_name(dtype), dtype_name(dtype))
        is_param = dataflow.vertex(source).role in ("param", "const")
        out.append(CastRecord(f"{source}->{short}", source, dtype, tuple(consumers), is_param))
    return out


# -- DOT -----------------------------------------------------------------------------------------

def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tooltip(node: ViewNode) -> str:
    return "\n".join(f"{k}: {v}" for k, v in node.info.items())


def _dot_node_attrs(node: ViewNode, index: int) -> dict[str, str]:
    st = STYLES[node.style]
    label = node.label + (f"\n{node.sublabel}" if node.sublabel else "")
    attrs = {"id": f"amp_n{index}", "label": label, "tooltip": _tooltip(node),
             "fillcolor": st["fill"], "color": st["stroke"], "fontcolor": st["text"],
             "style": "rounded,filled", "shape": "box", "penwidth": "1"}
    if node.style == "cast":
        attrs.update(shape="hexagon", style="filled", fontsize="9")
    elif node.style == "io":
        attrs.update(shape="ellipse", style="filled")
    if node.group and node.counts.get("low") and node.counts.get("fp32"):
        # the fill shows the low / fp32 split of the group
        total = node.counts["low"] + node.counts["fp32"]
        share = node.counts["low"] / total
        attrs["style"] = "striped"
        attrs["fillcolor"] = (f"{STYLES['low']['fill']};{share:.2f}:"
                              f"{STYLES['fp32']['fill']};{1 - share:.2f}")
    if node.fp32_acc:
        attrs.update(color=ACC_STROKE, penwidth="3")
    if node.unknown:
        attrs.update(color=UNKNOWN_STROKE, penwidth="2", style=attrs["style"] + ",dashed")
    return attrs


def to_dot(view: GraphView) -> str:
    """Graphviz DOT text (plain text; no graphviz package needed). ``dot -Tsvg`` draws it."""
    index = {name: i for i, name in enumerate(view.nodes)}
    lines = ["digraph amp_plan {",
             f"  graph [rankdir=TB, fontname=\"Helvetica\", labelloc=t, fontsize=14, "
             f"label={_dot_str(view.title + ' — ' + view.summary_line())}];",
             "  node [fontname=\"Helvetica\", fontsize=10, margin=\"0.12,0.04\"];",
             f"  edge [color=\"{PLAIN_EDGE}\", arrowsize=0.6];"]
    for name, node in view.nodes.items():
        attrs = _dot_node_attrs(node, index[name])
        lines.append(f"  {_dot_str(name)} [" + ", ".join(f"{k}={_dot_str(v)}" for k, v in attrs.items()) + "];")
    for j, e in enumerate(view.edges):
        attrs = {"id": f"amp_e{j}"}
        if e.cast:
            attrs.update(color=CAST_EDGE, penwidth="2", tooltip=f"carries a cast to {e.cast}")
        if e.count > 1:
            attrs["penwidth"] = str(min(1 + e.count / 4, 4))
        lines.append(f"  {_dot_str(e.src)} -> {_dot_str(e.dst)} ["
                     + ", ".join(f"{k}={_dot_str(v)}" for k, v in attrs.items()) + "];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- Mermaid -------------------------------------------------------------------------------------

def _mermaid_text(s: str) -> str:
    return s.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def to_mermaid(view: GraphView) -> str:
    """A Mermaid ``flowchart TD``: classes per precision, cast edges purple."""
    index = {name: i for i, name in enumerate(view.nodes)}
    lines = ["flowchart TD"]
    for name, node in view.nodes.items():
        text = _mermaid_text(node.label) + (f"<br/><small>{_mermaid_text(node.sublabel)}</small>"
                                            if node.sublabel else "")
        shape = {"cast": ('{{"', '"}}'), "io": ('(["', '"])')}.get(
            node.style, ('[["', '"]]') if node.group else ('["', '"]'))
        classes = [node.style] + (["acc"] if node.fp32_acc else []) + (["unknown"] if node.unknown else [])
        lines.append(f"  n{index[name]}{shape[0]}{text}{shape[1]}:::{classes[0]}")
        for extra in classes[1:]:
            lines.append(f"  class n{index[name]} {extra}")
    cast_links = []
    for j, e in enumerate(view.edges):
        lines.append(f"  n{index[e.src]} --> n{index[e.dst]}")
        if e.cast:
            cast_links.append(str(j))
    for cls, st in STYLES.items():
        lines.append(f"  classDef {cls} fill:{st['fill']},stroke:{st['stroke']},color:{st['text']}")
    lines.append(f"  classDef acc stroke:{ACC_STROKE},stroke-width:3px")
    lines.append(f"  classDef unknown stroke:{UNKNOWN_STROKE},stroke-dasharray:4 3")
    if cast_links:
        lines.append(f"  linkStyle {','.join(cast_links)} stroke:{CAST_EDGE},stroke-width:2px")
    return "\n".join(lines) + "\n"


# -- SVG -----------------------------------------------------------------------------------------

_CHAR_W, _NODE_H, _GROUP_H, _HGAP, _VGAP, _MARGIN = 6.6, 38, 44, 22, 34, 24


def _layers(view: GraphView) -> dict[str, int]:
    """Longest-path layers on the forward edges (order of first appearance breaks cycles that
    collapsing can create); values computed from no input sit just above their first use."""
    order = {n: node.order for n, node in view.nodes.items()}
    dag = nx.DiGraph()
    dag.add_nodes_from(view.nodes)
    dag.add_edges_from((e.src, e.dst) for e in view.edges if order[e.src] < order[e.dst])
    layer = {}
    for i, gen in enumerate(nx.topological_generations(dag)):
        for n in gen:
            layer[n] = i
    # values computed from no input at all (factories, constant masks) are drawn as late as
    # possible, next to their use, rather than in a row of their own at the top
    topo = sorted(view.nodes, key=lambda n: order[n])
    floating: set[str] = set()
    for n in topo:
        if view.nodes[n].style != "io" and all(p in floating for p in dag.predecessors(n)):
            floating.add(n)
    for n in reversed(topo):
        succ = [layer[s] for s in dag.successors(n)]
        if n in floating and succ:
            layer[n] = min(succ) - 1
    used = sorted(set(layer.values()))
    compact = {v: i for i, v in enumerate(used)}
    return {n: compact[v] for n, v in layer.items()}


def _width(node: ViewNode) -> float:
    return max(len(node.label), len(node.sublabel) * 0.9, 4) * _CHAR_W + 20


_LANE_W = 2.0  # width of the invisible box a long edge occupies in each row it crosses


def _layout(view: GraphView):
    """Layered (Sugiyama-style) layout. Rows from ``_layers``; an edge spanning several rows gets
    a waypoint in each row it crosses, so it has its own lane instead of running under boxes;
    order in a row by barycentre sweeps; x pulled towards the mean of each box's neighbours
    without overlapping.

    Returns (boxes: name -> (cx, cy, w, h), routes: (src, dst) -> waypoints [(x, y_top,
    y_bottom)], width, height)."""
    layer = _layers(view)
    order = {n: node.order for n, node in view.nodes.items()}
    g = nx.DiGraph()
    g.add_nodes_from(view.nodes)
    width = {n: _width(view.nodes[n]) for n in view.nodes}
    height = {n: (_GROUP_H if view.nodes[n].group else _NODE_H) for n in view.nodes}
    chains: dict[tuple[str, str], list[str]] = {}
    for e in view.edges:
        a, b = layer[e.src], layer[e.dst]
        if b - a > 1:
            chain = [f"\0{e.src}\0{e.dst}\0{k}" for k in range(a + 1, b)]
            for k, d in zip(range(a + 1, b), chain):
                layer[d], width[d], height[d] = k, _LANE_W, 0
                order[d] = order[e.src]
            nx.add_path(g, [e.src, *chain, e.dst])
            chains[(e.src, e.dst)] = chain
        else:
            g.add_edge(e.src, e.dst)
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for n in sorted(layer, key=lambda n: (layer[n], order[n])):
        rows[layer[n]].append(n)
    x: dict[str, float] = {}

    def pack(row: list[str], want: dict[str, float]) -> None:
        # place in order, each as close to its wanted x as the previous box allows, then shift
        # the whole row so that the mean displacement is zero
        pos, right = [], -1e18
        for n in row:
            gap = _HGAP if width[n] > _LANE_W else _HGAP / 2
            left = max(want[n] - width[n] / 2, right + gap)
            pos.append(left + width[n] / 2)
            right = left + width[n]
        shift = sum(want[n] - p for n, p in zip(row, pos)) / len(row)
        for n, p in zip(row, pos):
            x[n] = p + shift

    for row in rows:
        pack(row, {n: 0.0 for n in row})
    for sweep in range(8):
        down = sweep % 2 == 0
        for row in (rows[1:] if down else rows[-2::-1]):
            neigh = {n: [x[m] for m in (g.predecessors(n) if down else g.successors(n)) if m in x]
                     for n in row}
            want = {n: (sum(v) / len(v) if v else x[n]) for n, v in neigh.items()}
            row.sort(key=lambda n: want[n])
            pack(row, want)
    min_x = min((x[n] - width[n] / 2 for n in x), default=0)
    boxes, points, y = {}, {}, _MARGIN + 34
    for row in rows:
        h = max((height[n] for n in row), default=0) or _NODE_H
        for n in row:
            cx = x[n] - min_x + _MARGIN
            if n in view.nodes:
                boxes[n] = (cx, y + h / 2, width[n], height[n])
            else:
                points[n] = (cx, y, y + h)
        y += h + _VGAP
    routes = {k: [points[d] for d in chain] for k, chain in chains.items()}
    total_w = max((b[0] + b[2] / 2 for b in boxes.values()), default=0) + _MARGIN
    total_w = max(total_w, len(view.summary_line()) * 6.2 + 2 * _MARGIN)  # room for the caption
    return boxes, routes, total_w, y + _MARGIN


def _edge_path(src: tuple, dst: tuple, waypoints: list) -> str:
    """Vertical-tangent curves from box to box through each crossed row's lane."""
    x1, y1, _, h1 = src
    x2, y2, _, h2 = dst
    pts = [(x1, y1 + h1 / 2)]
    for wx, top, bottom in waypoints:
        pts += [(wx, top), (wx, bottom)]
    pts.append((x2, y2 - h2 / 2))
    d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
    for i in range(1, len(pts)):
        (ax, ay), (bx, by) = pts[i - 1], pts[i]
        if i % 2 == 0 and ax == bx:  # straight down through a row
            d += f" L{bx:.1f},{by:.1f}"
            continue
        dy = max((by - ay) / 2, 12)
        d += f" C{ax:.1f},{ay + dy:.1f} {bx:.1f},{by - dy:.1f} {bx:.1f},{by:.1f}"
    return d


def _esc(s: str) -> str:
    return _html.escape(str(s), quote=True)


def _svg_builtin(view: GraphView) -> str:
    boxes, routes, W, H = _layout(view)
    right_edge = max((b[0] + b[2] / 2 for b in boxes.values()), default=0)
    if any(boxes[e.dst][1] <= boxes[e.src][1] for e in view.edges):
        W = max(W, right_edge + 60)  # room for the arcs of edges against the flow
    index = {name: i for i, name in enumerate(view.nodes)}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="amp-graph" width="{W:.0f}" '
           f'height="{H:.0f}" viewBox="0 0 {W:.0f} {H:.0f}" font-family="Helvetica, Arial, sans-serif">',
           "<defs>"]
    for name, colour in (("amp-arrow", PLAIN_EDGE), ("amp-arrow-cast", CAST_EDGE)):
        out.append(f'<marker id="{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" '
                   f'markerHeight="8" markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
                   f'fill="{colour}"/></marker>')
    out.append("</defs>")
    out.append(f'<text x="{_MARGIN}" y="{_MARGIN + 8}" font-size="14" font-weight="bold">'
               f'{_esc(view.title)}</text>')
    out.append(f'<text x="{_MARGIN}" y="{_MARGIN + 26}" font-size="11" fill="#444">'
               f'{_esc(view.summary_line())}</text>')
    out.append('<g class="edges">')
    for j, e in enumerate(view.edges):
        x1, y1, _, h1 = boxes[e.src]
        x2, y2, _, h2 = boxes[e.dst]
        sy, ty = y1 + h1 / 2, y2 - h2 / 2
        if ty > sy:
            d = _edge_path(boxes[e.src], boxes[e.dst], routes.get((e.src, e.dst), []))
        else:  # an edge against the flow (collapsed cycles): an arc on the right-hand side
            w1, w2 = boxes[e.src][2], boxes[e.dst][2]
            sx, ex = x1 + w1 / 2, x2 + w2 / 2
            off = right_edge + 30  # outside every box
            d = f"M{sx:.1f},{y1:.1f} C{off:.1f},{y1:.1f} {off:.1f},{y2:.1f} {ex:.1f},{y2:.1f}"
        colour, width = (CAST_EDGE, 2.0) if e.cast else (PLAIN_EDGE, 1.0)
        width = min(width + (e.count - 1) / 4, 4)
        marker = "amp-arrow-cast" if e.cast else "amp-arrow"
        title = f"<title>{_esc(e.src)} → {_esc(e.dst)}" + (
            f" (cast to {e.cast})" if e.cast else "") + "</title>"
        out.append(f'<g id="amp_e{j}" class="edge{" cast" if e.cast else ""}">{title}'
                   f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="{width:.1f}" '
                   f'marker-end="url(#{marker})"/></g>')
    out.append("</g>")
    out.append('<g class="nodes">')
    for name, node in view.nodes.items():
        cx, cy, w, h = boxes[name]
        st = STYLES[node.style]
        stroke, sw, dash = st["stroke"], 1.2, ""
        if node.fp32_acc:
            stroke, sw = ACC_STROKE, 3.2
        if node.unknown:
            stroke, sw, dash = UNKNOWN_STROKE, 2.2, ' stroke-dasharray="5 3"'
        x0, y0 = cx - w / 2, cy - h / 2
        common = f'stroke="{stroke}" stroke-width="{sw}"{dash}'
        parts = [f'<g id="amp_n{index[name]}" class="node {node.style}" data-name="{_esc(name)}">',
                 f"<title>{_esc(_tooltip(node))}</title>"]
        if node.style == "cast":
            k = 10
            pts = (f"{x0:.1f},{cy:.1f} {x0 + k:.1f},{y0:.1f} {x0 + w - k:.1f},{y0:.1f} "
                   f"{x0 + w:.1f},{cy:.1f} {x0 + w - k:.1f},{y0 + h:.1f} {x0 + k:.1f},{y0 + h:.1f}")
            parts.append(f'<polygon points="{pts}" fill="{st["fill"]}" {common}/>')
        else:
            rx = h / 2 if node.style == "io" else 6
            parts.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{h:.1f}" '
                         f'rx="{rx:.1f}" fill="{st["fill"]}" {common}/>')
            if node.group and node.counts.get("low") and node.counts.get("fp32"):
                # a bar along the bottom showing the group's low / fp32 split
                total = node.counts["low"] + node.counts["fp32"]
                lw = (w - 12) * node.counts["low"] / total
                parts.append(f'<rect x="{x0 + 6:.1f}" y="{y0 + h - 8:.1f}" width="{lw:.1f}" '
                             f'height="4" fill="{STYLES["low"]["stroke"]}"/>')
                parts.append(f'<rect x="{x0 + 6 + lw:.1f}" y="{y0 + h - 8:.1f}" '
                             f'width="{w - 12 - lw:.1f}" height="4" fill="{STYLES["fp32"]["stroke"]}"/>')
        ty = cy - (5 if node.sublabel else -4)
        parts.append(f'<text x="{cx:.1f}" y="{ty:.1f}" text-anchor="middle" font-size="11" '
                     f'font-weight="bold" fill="{st["text"]}">{_esc(node.label)}</text>')
        if node.sublabel:
            parts.append(f'<text x="{cx:.1f}" y="{cy + 10:.1f}" text-anchor="middle" '
                         f'font-size="9.5" fill="{st["text"]}">{_esc(node.sublabel)}</text>')
        parts.append("</g>")
        out.append("".join(parts))
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def _svg_graphviz(view: GraphView) -> str | None:
    exe = shutil.which("dot")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-Tsvg"], input=to_dot(view), capture_output=True, text=True,
                              timeout=120, check=True)
    except (subprocess.SubprocessError, OSError):
        return None  # a broken graphviz install: fall back to our own layout
    return done.stdout


def to_svg(view: GraphView, *, engine: str = "auto") -> str:
    """A self-contained SVG. ``engine``: "auto" (graphviz ``dot`` when installed, else the
    built-in layered layout), "dot", or "builtin"."""
    if engine not in ("auto", "dot", "builtin"):
        raise ConfigError(f"engine={engine!r}: use 'auto', 'dot' or 'builtin'")
    if engine != "builtin":
        svg = _svg_graphviz(view)
        if svg is not None:
            return svg
        if engine == "dot":
            raise ConfigError("the graphviz `dot` program is not installed (or failed); install "
                              "graphviz or use engine='builtin'")
    return _svg_builtin(view)


# -- HTML ----------------------------------------------------------------------------------------

_CSS = """
html,body{height:100%}
body{margin:0;font:13px/1.4 Helvetica,Arial,sans-serif;color:#222;background:#fafafa;
  display:flex;flex-direction:column}
header{padding:10px 16px;background:#fff;border-bottom:1px solid #ddd;flex:none}
h1{font-size:17px;margin:0 0 4px}
.summary{display:flex;gap:14px;flex-wrap:wrap;margin:4px 0}
.summary b{font-size:15px}
.legend{display:flex;gap:16px;flex-wrap:wrap;margin-top:6px;font-size:12px;align-items:center}
.sw{display:inline-block;width:22px;height:13px;vertical-align:middle;margin-right:5px;border:1.5px solid}
.controls{margin-top:6px;font-size:12px}
.controls button{font-size:12px;margin-right:4px}
#graph{padding:12px;overflow:auto;flex:1;min-height:0}
#graph svg{display:block;margin:0 auto}
g.node{cursor:pointer}
g.node.dim,g.edge.dim{opacity:.25}
g.node.hit{filter:drop-shadow(0 0 3px #000) drop-shadow(0 0 6px rgba(0,0,0,.45))}
#tip{position:fixed;display:none;max-width:460px;background:#fffef5;border:1px solid #999;
  border-radius:5px;padding:8px 10px;box-shadow:0 3px 12px rgba(0,0,0,.25);font-size:12px;z-index:5;pointer-events:none}
#tip table{border-collapse:collapse}#tip td{padding:1px 6px;vertical-align:top}
#tip td:first-child{color:#666;white-space:nowrap}
"""

_JS = """
(function(){
const NODES=JSON.parse(document.getElementById('amp_nodes').textContent);
const EDGES=JSON.parse(document.getElementById('amp_edges').textContent);
const tip=document.getElementById('tip');
const svg=document.querySelector('#graph svg');
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function show(i,x,y){const info=NODES[i].info;let rows='';
  for(const k in info){rows+='<tr><td>'+esc(k)+'</td><td>'+esc(info[k])+'</td></tr>';}
  tip.innerHTML='<table>'+rows+'</table>';tip.style.display='block';place(x,y);}
function place(x,y){const w=tip.offsetWidth,h=tip.offsetHeight;
  tip.style.left=Math.min(x+14,window.innerWidth-w-8)+'px';
  tip.style.top=Math.min(y+14,window.innerHeight-h-8)+'px';}
function hide(){tip.style.display='none';}
function mark(i,on,dim=true){const near=new Set([i]);on=on&&dim;
  EDGES.forEach((e,j)=>{const el=document.getElementById('amp_e'+j);if(!el)return;
    const hit=e[0]===i||e[1]===i;if(hit){near.add(e[0]);near.add(e[1]);}
    el.classList.toggle('dim',on&&!hit);});
  NODES.forEach((n,k)=>{const el=document.getElementById('amp_n'+k);if(!el)return;
    el.classList.toggle('dim',on&&!near.has(k));el.classList.toggle('hit',(on||!dim)&&k===i);});}
NODES.forEach((n,i)=>{const el=document.getElementById('amp_n'+i);if(!el)return;
  el.querySelectorAll('title').forEach(t=>t.remove());
  el.addEventListener('mouseenter',ev=>{show(i,ev.clientX,ev.clientY);mark(i,true);});
  el.addEventListener('mousemove',ev=>place(ev.clientX,ev.clientY));
  el.addEventListener('mouseleave',()=>{hide();mark(i,false);});});
const r0=svg.getBoundingClientRect(),W0=r0.width,H0=r0.height;let scale=1;
function zoom(s){scale=s;svg.style.width=(W0*s)+'px';svg.style.height=(H0*s)+'px';}
document.getElementById('zin').onclick=()=>zoom(scale*1.25);
document.getElementById('zout').onclick=()=>zoom(scale/1.25);
document.getElementById('zfit').onclick=()=>{const w=document.getElementById('graph').clientWidth-24;
  zoom(Math.min(1,w/W0));};
document.getElementById('z1').onclick=()=>zoom(1);
// #focus=<node name> pins that node's tooltip (for links from the report, and screenshots)
const m=/focus=([^&]+)/.exec(decodeURIComponent(location.hash));
if(m){const i=NODES.findIndex(n=>n.name===m[1]);const el=document.getElementById('amp_n'+i);
  if(i>=0&&el){const pane=document.getElementById('graph'),r=el.getBoundingClientRect(),
      p=pane.getBoundingClientRect();
    pane.scrollTop=Math.max(0,r.top-p.top+pane.scrollTop-pane.clientHeight/4);
    pane.scrollLeft=Math.max(0,r.left-p.left+pane.scrollLeft-pane.clientWidth/4);
    const r2=el.getBoundingClientRect();show(i,r2.right,r2.top);mark(i,true,false);
    document.body.dataset.focus=m[1];}}
document.body.dataset.ready='1';
})();
"""


def _legend(view: GraphView) -> str:
    low = view.low_dtype
    items = [
        (STYLES["low"]["fill"], STYLES["low"]["stroke"], f"computes in {low}", ""),
        (STYLES["fp32"]["fill"], STYLES["fp32"]["stroke"], "computes in fp32", ""),
        ("#ffffff", ACC_STROKE, "fp32-accumulating kernel (norms, softmax, mean)", "border-width:3px"),
        (STYLES["cast"]["fill"], STYLES["cast"]["stroke"], "cast node (edges in purple)",
         "border-radius:0;clip-path:polygon(20% 0,80% 0,100% 50%,80% 100%,20% 100%,0 50%)"),
        (STYLES["nonfloat"]["fill"], STYLES["nonfloat"]["stroke"], "non-float value", ""),
        (STYLES["io"]["fill"], STYLES["io"]["stroke"], "input / output", "border-radius:7px"),
        ("#ffffff", UNKNOWN_STROKE, "unknown op (kept fp32)", "border-style:dashed"),
    ]
    if view.collapsed_depth:
        items.append((f"linear-gradient(90deg,{STYLES['low']['fill']} 60%,{STYLES['fp32']['fill']} 60%)",
                      "#555", f"module group (path depth {view.collapsed_depth}): counts inside", ""))
    spans = [f'<span><span class="sw" style="background:{f};border-color:{s};{extra}"></span>{_esc(t)}</span>'
             for f, s, t, extra in items]
    return '<div class="legend">' + "".join(spans) + "</div>"


def to_html(view: GraphView, *, engine: str = "auto") -> str:
    """One offline page: the SVG inline, a legend, the totals, and a tooltip per node showing its
    Decision (kind, category, precision, rule, reason). No external resources."""
    svg = to_svg(view, engine=engine)
    # inline SVG needs neither the XML prolog, the DTD nor namespace declarations
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    s = view.summary
    facts = [(s["low"], f"nodes {s['dtype']}"), (s["fp32"], "nodes fp32"),
             (s["unknown"], "unknown ops"), (s["casts"], f"casts ({s['param_casts']} of parameters)")]
    summary = "".join(f"<span><b>{v}</b> {_esc(t)}</span>" for v, t in facts)
    if s.get("folded"):
        summary += "<span>weights folded to low precision</span>"
    if view.collapsed_depth:
        summary += f"<span>collapsed by module path (depth {view.collapsed_depth})</span>"
    nodes_json = [{"name": n.id, "info": n.info} for n in view.nodes.values()]
    index = {name: i for i, name in enumerate(view.nodes)}
    edges_json = [[index[e.src], index[e.dst], e.cast] for e in view.edges]

    def script_json(obj) -> str:
        return json.dumps(obj).replace("</", "<\\/")

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_esc(view.title)}</title><style>{_CSS}</style></head><body>\n"
        f"<header><h1>{_esc(view.title)}</h1><div class=\"summary\">{summary}</div>"
        f"{_legend(view)}<div class=\"controls\"><button id=\"zout\">−</button>"
        "<button id=\"zin\">+</button><button id=\"zfit\">fit width</button>"
        "<button id=\"z1\">100%</button> hover a box for its decision</div></header>\n"
        f"<div id=\"graph\">{svg}</div><div id=\"tip\"></div>\n"
        f"<script type=\"application/json\" id=\"amp_nodes\">{script_json(nodes_json)}</script>\n"
        f"<script type=\"application/json\" id=\"amp_edges\">{script_json(edges_json)}</script>\n"
        f"<script>{_JS}</script>\n</body></html>\n")


def render(amp, fmt: str, *, collapse: str | int | None = "auto", title: str | None = None,
           engine: str = "auto", **view_options) -> str:
    """``graph_view`` then one format: "svg" | "html" | "dot" | "mermaid".

    Example:
        >>> text = render(amp, "mermaid", collapse="none")
        >>> text.splitlines()[0]
        'flowchart TD'
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    view = graph_view(amp, collapse=collapse, title=title, **view_options)
    if fmt == "dot":
        return to_dot(view)
    if fmt == "mermaid":
        return to_mermaid(view)
    if fmt == "svg":
        return to_svg(view, engine=engine)
    return to_html(view, engine=engine)


# -- a saved plan as a table ---------------------------------------------------------------------

_PRECISION_STYLE = {"float16": "green", "bfloat16": "green", "float32": "yellow", "float64": "magenta"}
_ONLY = ("fp32", "low", "casts", "unknown")


def plan_table(plan: PrecisionPlan, *, only: str | None = None, why: str | None = None) -> Table:
    """A rich table of a PrecisionPlan read back from JSON (no model needed).

    ``only``: "fp32" | "low" | "unknown" | "casts" (casts need the list ``amp-compiler convert``
    stores in ``plan.meta["casts"]``); ``why``: one node's whole decision.

    Example:
        >>> plan = PrecisionPlan.from_json(open("out/plan.json").read())
        >>> rich.print(plan_table(plan, only="fp32"))
    """
    if only is not None and only not in _ONLY:
        raise ConfigError(f"only={only!r}: use one of {', '.join(_ONLY)}")
    casts = list(plan.meta.get("casts", ()))
    low = dtype_name(plan.low_dtype)
    if why is not None:
        if why not in plan:
            close = [n for n in plan if why in n][:5]
            raise ConfigError(f"no node named {why!r} in the plan"
                              + (f" (did you mean {', '.join(close)}?)" if close else
                                 "; `amp-compiler report PLAN.json` lists the names"))
        d = plan[why]
        table = Table(title=f"why {literal(why)}", box=box.SIMPLE, show_header=False)
        for name in ("kind", "category", "precision", "rule", "reason"):
            value = getattr(d, name)
            table.add_row(name, dtype_name(value) if name == "precision" else literal(value))
        for c in casts:
            if c.get("source") == why:
                table.add_row("cast", literal(f"{c['node']} -> {c['dtype']} for "
                                              f"{', '.join(c['consumers'])}"))
    elif only == "casts":
        if "casts" not in plan.meta:
            raise ConfigError("this plan file lists no casts (it was not written by "
                              "`amp-compiler convert`); run `amp-compiler report TARGET --only "
                              "casts` on the model instead")
        table = Table(title="casts", box=box.SIMPLE_HEAD)
        for col in ("cast node", "value", "to", "consumers"):
            table.add_column(col)
        for c in casts:
            table.add_row(literal(c["node"]), literal(c["source"]), literal(c["dtype"]),
                          literal(", ".join(c["consumers"])))
    else:
        table = Table(title=f"precision plan ({low})", box=box.SIMPLE_HEAD)
        for col in ("node", "kind", "precision", "rule", "reason"):
            table.add_column(col, overflow="fold")
        for name, d in plan.items():
            if d.category in ("input", "param", "const", "output", "non_float"):
                continue
            p = dtype_name(d.precision)
            if only == "fp32" and (d.precision is None or d.precision.itemsize < 4):
                continue
            if only == "low" and d.precision != plan.low_dtype:
                continue
            if only == "unknown" and d.category != "unknown":
                continue
            table.add_row(literal(name), literal(d.kind), f"[{_PRECISION_STYLE.get(p, 'white')}]{p}[/]",
                          literal(d.rule), literal(d.reason))
    c = plan.counts()
    caption = f"{c['low']} nodes {low}, {c['fp32']} fp32, {c['unknown']} unknown ops"
    if "casts" in plan.meta:
        caption += (f"; {len(casts)} casts in the graph "
                    f"({sum(bool(x.get('is_param')) for x in casts)} of parameters)")
    table.caption = caption
    return table
