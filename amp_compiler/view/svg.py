"""The picture as a self-contained SVG: drawn by graphviz ``dot`` when it is installed, else by
the built-in layered layout (``layout.py``), with the same colours and a tooltip per box.

    >>> open("gpt.svg", "w").write(to_svg(graph_view(amp), engine="builtin"))
"""

from __future__ import annotations

import html
import shutil
import subprocess

from amp_compiler.errors import ConfigError
from amp_compiler.view.graph_view import GraphView
from amp_compiler.view.layout import MARGIN, edge_path, layout
from amp_compiler.view.style import ACC_STROKE, CAST_EDGE, PLAIN_EDGE, STYLES, UNKNOWN_STROKE
from amp_compiler.view.text import to_dot

__all__ = ["to_svg", "esc"]


def esc(s) -> str:
    """``s`` as XML / HTML text or attribute value: ``&``, ``<``, ``>`` and quotes escaped."""
    return html.escape(str(s), quote=True)


def _svg_builtin(view: GraphView) -> str:
    """The SVG drawn on the built-in layout: edges first, then one group per box (id amp_n<i>,
    its tooltip as a <title>), so the HTML page can find each box and edge by id."""
    boxes, routes, W, H = layout(view)
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
    out.append(f'<text x="{MARGIN}" y="{MARGIN + 8}" font-size="14" font-weight="bold">'
               f'{esc(view.title)}</text>')
    out.append(f'<text x="{MARGIN}" y="{MARGIN + 26}" font-size="11" fill="#444">'
               f'{esc(view.summary_line())}</text>')
    out.append('<g class="edges">')
    for j, e in enumerate(view.edges):
        x1, y1, _, h1 = boxes[e.src]
        x2, y2, _, h2 = boxes[e.dst]
        sy, ty = y1 + h1 / 2, y2 - h2 / 2
        if ty > sy:
            d = edge_path(boxes[e.src], boxes[e.dst], routes.get((e.src, e.dst), []))
        else:  # an edge against the flow (collapsed cycles): an arc on the right-hand side
            w1, w2 = boxes[e.src][2], boxes[e.dst][2]
            sx, ex = x1 + w1 / 2, x2 + w2 / 2
            off = right_edge + 30  # outside every box
            d = f"M{sx:.1f},{y1:.1f} C{off:.1f},{y1:.1f} {off:.1f},{y2:.1f} {ex:.1f},{y2:.1f}"
        colour, width = (CAST_EDGE, 2.0) if e.cast else (PLAIN_EDGE, 1.0)
        width = min(width + (e.count - 1) / 4, 4)
        marker = "amp-arrow-cast" if e.cast else "amp-arrow"
        title = f"<title>{esc(e.src)} → {esc(e.dst)}" + (
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
        parts = [f'<g id="amp_n{index[name]}" class="node {node.style}" data-name="{esc(name)}">',
                 f"<title>{esc(node.tooltip())}</title>"]
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
                     f'font-weight="bold" fill="{st["text"]}">{esc(node.label)}</text>')
        if node.sublabel:
            parts.append(f'<text x="{cx:.1f}" y="{cy + 10:.1f}" text-anchor="middle" '
                         f'font-size="9.5" fill="{st["text"]}">{esc(node.sublabel)}</text>')
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
