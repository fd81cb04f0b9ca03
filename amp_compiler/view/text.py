"""The picture as text: Graphviz DOT and a Mermaid flowchart, drawn from a ``GraphView``. Plain
strings; neither needs graphviz or Mermaid installed.

    >>> print(to_mermaid(graph_view(amp)))
    flowchart TD
    ...
    >>> open("gpt.dot", "w").write(to_dot(graph_view(amp)))   # dot -Tsvg gpt.dot draws it
"""

from __future__ import annotations

from amp_compiler.view.graph_view import GraphView, ViewNode
from amp_compiler.view.style import ACC_STROKE, CAST_EDGE, PLAIN_EDGE, STYLES, UNKNOWN_STROKE

__all__ = ["to_dot", "to_mermaid"]


# -- DOT -----------------------------------------------------------------------------------------

def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_node_attrs(node: ViewNode, index: int) -> dict[str, str]:
    st = STYLES[node.style]
    label = node.label + (f"\n{node.sublabel}" if node.sublabel else "")
    attrs = {"id": f"amp_n{index}", "label": label, "tooltip": node.tooltip(),
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
