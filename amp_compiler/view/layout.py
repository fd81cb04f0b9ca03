"""The built-in layered layout: where each box of a ``GraphView`` goes and how each edge runs,
for drawing an SVG without graphviz (Sugiyama-style: rows by longest path, long edges in lanes
of their own, rows ordered by barycentre sweeps).

    >>> boxes, routes, width, height = layout(graph_view(amp))       # the mlp reference model
    >>> boxes["linear"]                               # centre x, centre y, width, height
    (72.61, 221.0, 59.599999999999994, 38)
"""

from __future__ import annotations

import networkx as nx

from amp_compiler.view.graph_view import GraphView, ViewNode

__all__ = ["layout", "edge_path", "MARGIN"]

_CHAR_W, _NODE_H, _GROUP_H, _HGAP, _VGAP, MARGIN = 6.6, 38, 44, 22, 34, 24


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


def layout(view: GraphView):
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
    boxes, points, y = {}, {}, MARGIN + 34
    for row in rows:
        h = max((height[n] for n in row), default=0) or _NODE_H
        for n in row:
            cx = x[n] - min_x + MARGIN
            if n in view.nodes:
                boxes[n] = (cx, y + h / 2, width[n], height[n])
            else:
                points[n] = (cx, y, y + h)
        y += h + _VGAP
    routes = {k: [points[d] for d in chain] for k, chain in chains.items()}
    total_w = max((b[0] + b[2] / 2 for b in boxes.values()), default=0) + MARGIN
    total_w = max(total_w, len(view.summary_line()) * 6.2 + 2 * MARGIN)  # room for the caption
    return boxes, routes, total_w, y + MARGIN


def edge_path(src: tuple, dst: tuple, waypoints: list) -> str:
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
