"""Graph views of a plan (amp_compiler.view): structure of the view, each format
well-formed (DOT, SVG, HTML, Mermaid), collapsing by module path, the bare-plan table, and one
headless-Chromium rendering of the HTML page (skipped without Debian's ``chromium``)."""

from __future__ import annotations

import functools
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch

import amp_compiler as ac
from amp_compiler.models import build
from amp_compiler.passes.plan import PrecisionPlan
from amp_compiler.view import graph_view as graph_view_module
from amp_compiler.view.graph_view import graph_view
from amp_compiler.view.page import to_html
from amp_compiler.view.report import plan_table
from amp_compiler.view.style import ACC_STROKE, CAST_EDGE, STYLES
from amp_compiler.view.svg import to_svg
from amp_compiler.view.text import to_dot, to_mermaid


@functools.lru_cache(maxsize=None)
def converted(name: str, dtype: torch.dtype):
    """(model, inputs, amp), converted once per session in eval mode."""
    model, inputs = build(name, "tiny")
    model.eval()
    return model, inputs, ac.convert(model, inputs, dtype=dtype)


@pytest.fixture(scope="module")
def gpt():
    return converted("gpt", torch.bfloat16)[2]


@pytest.fixture(scope="module")
def gpt_view(gpt):
    return graph_view(gpt, collapse="none", title="gpt tiny")


def _low_nodes(amp) -> set[str]:
    return {n for n, d in amp.plan.items() if d.precision == amp.low_dtype}


# -- the view ------------------------------------------------------------------------------------

def test_view_colours_every_node_by_its_plan_precision(gpt, gpt_view):
    plan, df = gpt.plan, gpt._dataflow
    for name, node in gpt_view.nodes.items():
        if node.style == "cast":
            continue
        d = plan[name]
        expected = ("io" if df.vertex(name).role in ("input", "output") else
                    "nonfloat" if d.precision is None else
                    "low" if d.precision == gpt.low_dtype else "fp32")
        assert node.style == expected, (name, d)
        assert node.fp32_acc == (d.category == "fp32_acc")
        assert node.info["reason"] == d.reason and node.info["rule"] == d.rule
    # every low-precision compute node is drawn (parameters and shape plumbing are hidden)
    assert _low_nodes(gpt) <= set(gpt_view.nodes)
    assert not any(df.vertex(n).role == "param" for n in gpt_view.nodes if n in df)
    assert any(n.fp32_acc and n.style == "low" for n in gpt_view.nodes.values())   # softmax
    assert any(n.fp32_acc and n.style == "fp32" for n in gpt_view.nodes.values())  # layer_norm


def test_view_draws_each_cast_between_its_value_and_consumers(gpt, gpt_view):
    edges = {(e.src, e.dst): e.cast for e in gpt_view.edges}
    casts = [c for c in gpt.casts if not c.is_param]
    assert casts and len([n for n in gpt_view.nodes.values() if n.style == "cast"]) == len(casts)
    for c in casts:
        short = {torch.float32: "fp32", torch.bfloat16: "bf16"}[c.dtype]
        assert edges[(c.source, c.node)] == short
        for consumer in c.consumers:
            assert edges[(c.node, consumer)] == short
            assert (c.source, consumer) not in edges  # the value reaches it only through the cast
        # drawn where it runs: right before its first consumer
        order = list(gpt_view.nodes)
        assert order.index(c.node) < min(order.index(x) for x in c.consumers)
    plain = [e for e in gpt_view.edges if e.cast is None]
    assert plain and all(gpt_view.nodes[e.src].style != "cast" for e in plain)
    assert nx_is_dag(gpt_view)


def nx_is_dag(view) -> bool:
    import networkx as nx

    return nx.is_directed_acyclic_graph(view.nx)


def test_view_with_params_shows_parameter_casts_in_training():
    model, inputs = build("mlp", "tiny")
    amp = ac.convert(model, inputs, dtype="float16", training=True)  # weights cast per step
    view = graph_view(amp, collapse="none", show_params=True)
    param_casts = [c for c in amp.casts if c.is_param]
    assert param_casts
    for c in param_casts:
        assert view.nodes[c.node].style == "cast"
        assert view.nodes[c.source].style == "param"
    hidden = graph_view(amp, collapse="none")
    assert not any(c.node in hidden.nodes for c in param_casts)
    # hidden parameter casts are still listed on the node that receives them
    linear = next(n for n in hidden.nodes.values() if n.info.get("kind") == "linear")
    assert "→ fp16" in linear.info["casts in"]


# -- formats -------------------------------------------------------------------------------------

_DOT_NODE = re.compile(r'^  "((?:[^"\\]|\\.)+)" \[(.*)\];$')
_DOT_EDGE = re.compile(r'^  "((?:[^"\\]|\\.)+)" -> "((?:[^"\\]|\\.)+)" \[(.*)\];$')


def test_dot_is_well_formed(gpt_view):
    text = to_dot(gpt_view)
    lines = text.splitlines()
    assert lines[0] == "digraph amp_plan {" and lines[-1] == "}"
    nodes = [m for m in map(_DOT_NODE.match, lines) if m]
    edges = [m for m in map(_DOT_EDGE.match, lines) if m]
    assert len(nodes) == len(gpt_view.nodes) and len(edges) == len(gpt_view.edges)
    names = {m.group(1) for m in nodes}
    assert all(m.group(1) in names and m.group(2) in names for m in edges)
    cast_edges = [m for m in edges if CAST_EDGE in m.group(3)]
    assert len(cast_edges) == sum(e.cast is not None for e in gpt_view.edges)
    attrs = {m.group(1): m.group(2) for m in nodes}
    assert 'shape="hexagon"' in attrs["layer_norm_bf16"]
    assert f'color="{ACC_STROKE}"' in attrs["softmax"] and 'penwidth="3"' in attrs["softmax"]
    assert STYLES["low"]["fill"] in attrs["linear"] and STYLES["fp32"]["fill"] in attrs["layer_norm"]
    # every statement is one of: graph/node/edge defaults, a node, an edge
    body = [ln for ln in lines[1:-1] if not (_DOT_NODE.match(ln) or _DOT_EDGE.match(ln))]
    assert all(re.match(r"^  (graph|node|edge) \[.*\];$", ln) for ln in body), body


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed")
def test_dot_renders_with_graphviz(gpt_view):
    done = subprocess.run(["dot", "-Tsvg"], input=to_dot(gpt_view), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    root = ET.fromstring(done.stdout.encode())
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    assert {f"amp_n{i}" for i in range(len(gpt_view.nodes))} <= ids


def _svg_nodes(root) -> list:
    return [g for g in root.iter("{http://www.w3.org/2000/svg}g")
            if "node" in (g.get("class") or "").split()]


def test_builtin_svg_is_valid_xml_with_a_box_per_node(gpt_view):
    svg = to_svg(gpt_view, engine="builtin")
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    boxes = _svg_nodes(root)
    assert len(boxes) == len(gpt_view.nodes)
    by_name = {g.get("data-name"): g for g in boxes}
    assert set(by_name) == set(gpt_view.nodes)
    ns = "{http://www.w3.org/2000/svg}"
    for name, node in gpt_view.nodes.items():
        shape = by_name[name].find(f"{ns}polygon" if node.style == "cast" else f"{ns}rect")
        assert shape is not None and shape.get("fill") == STYLES[node.style]["fill"], name
    # boxes do not overlap within a row
    rects = [(float(r.get("x")), float(r.get("y")), float(r.get("width")))
             for g in boxes for r in g.findall(f"{ns}rect")[:1]]
    rows: dict[float, list] = {}
    for x, y, w in rects:
        rows.setdefault(y, []).append((x, x + w))
    for spans in rows.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:]))
    cast_paths = [g for g in root.iter(f"{ns}g") if g.get("class") == "edge cast"]
    assert len(cast_paths) == sum(e.cast is not None for e in gpt_view.edges)


def test_svg_engine_choice(gpt_view):
    if shutil.which("dot"):
        ET.fromstring(to_svg(gpt_view, engine="dot").encode())
    else:
        with pytest.raises(ac.ConfigError, match="graphviz"):
            to_svg(gpt_view, engine="dot")
    with pytest.raises(ac.ConfigError):
        to_svg(gpt_view, engine="neato")


@pytest.mark.parametrize("engine", ["builtin", "auto"])
def test_html_is_one_offline_page(gpt, gpt_view, engine):
    page = to_html(gpt_view, engine=engine)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 1
    assert not re.search(r"https?://", page), "no external URL, not even a namespace"
    assert not re.search(r"<link\b|\bsrc\s*=|@import|url\((?!#)", page)
    # the tooltips' data: every node's decision, and the totals in the header
    for name in ("softmax", "layer_norm", "linear"):
        assert gpt.plan[name].reason.replace('"', '\\"') in page
    s = gpt_view.summary
    for number, text in ((s["low"], "nodes bfloat16"), (s["fp32"], "nodes fp32"), (s["casts"], "casts")):
        assert re.search(rf"<b>{number}</b> {text}", page)
    assert "computes in fp32" in page and "cast node" in page  # legend
    ids = set(re.findall(r'id="(amp_n\d+)"', page))
    assert ids == {f"amp_n{i}" for i in range(len(gpt_view.nodes))}


def test_mermaid_flowchart(gpt_view):
    text = to_mermaid(gpt_view)
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    node_lines = [ln for ln in lines if re.match(r"^  n\d+[\[\(\{]", ln)]
    edge_lines = [ln for ln in lines if re.match(r"^  n\d+ --> n\d+$", ln)]
    assert len(node_lines) == len(gpt_view.nodes) and len(edge_lines) == len(gpt_view.edges)
    casts = [i for i, e in enumerate(gpt_view.edges) if e.cast]
    link = next(ln for ln in lines if ln.strip().startswith("linkStyle"))
    assert [int(i) for i in link.split()[1].split(",")] == casts
    hexagons = [ln for ln in node_lines if "{{" in ln]
    assert len(hexagons) == sum(n.style == "cast" for n in gpt_view.nodes.values())
    assert '"' not in "".join(re.sub(r'\["|"\]|\{\{"|"\}\}|\(\["|"\]\)|\[\["|"\]\]', "", ln)
                              for ln in node_lines)


# -- collapsing ----------------------------------------------------------------------------------

def test_collapse_groups_by_module_path_with_counts(gpt, gpt_view):
    view = graph_view(gpt, collapse=3)
    groups = {n.label: n for n in view.nodes.values() if n.group}
    assert {"transformer.h.0", "transformer.h.1"} <= set(groups)
    assert len(view.nodes) < len(gpt_view.nodes) / 3
    # the counts add up to the flat view's boxes, group by group
    flat = Counter(n.style for n in gpt_view.nodes.values())
    for style, key in (("low", "low"), ("fp32", "fp32"), ("cast", "casts")):
        total = sum(g.counts[key] for g in groups.values())
        total += sum(1 for n in view.nodes.values() if not n.group and n.style == style)
        assert total == flat[style], style
    block = groups["transformer.h.0"]
    assert re.fullmatch(r"\d+ bf16 / \d+ fp32 / \d+ casts", block.sublabel)
    assert block.sublabel.startswith(f"{block.counts['low']} bf16 / {block.counts['fp32']} fp32")
    assert block.fp32_acc  # it holds layer norms and softmax
    # edges between groups keep the cast mark: layer_norm_4 -> (cast) -> lm_head's linear
    assert any(e.cast for e in view.edges if e.dst == "group:lm_head")
    assert to_mermaid(view).count("[[") == len(groups)
    ET.fromstring(to_svg(view, engine="builtin"))  # cycles between groups still lay out


def test_collapse_auto_kicks_in_past_the_threshold(gpt, gpt_view, monkeypatch):
    assert graph_view(gpt).collapsed_depth is None  # 2-layer gpt: under the threshold
    sizes = {d: len(graph_view(gpt, collapse=d).nodes) for d in range(1, 7)}
    assert sizes[1] < sizes[3] < sizes[4] < len(gpt_view.nodes)
    monkeypatch.setattr(graph_view_module, "AUTO_COLLAPSE_NODES", sizes[3])
    view = graph_view(gpt)
    # the most detailed grouping that fits under the threshold
    assert view.collapsed_depth == 3 and len(view.nodes) == sizes[3]
    monkeypatch.setattr(graph_view_module, "AUTO_COLLAPSE_NODES", 2)  # nothing fits: one level
    assert graph_view(gpt).collapsed_depth == 1
    with pytest.raises(ac.ConfigError):
        graph_view(gpt, collapse="deep")


# -- a saved plan as a table ---------------------------------------------------------------------

def _rows(table) -> list[str]:
    return list(table.columns[0]._cells)


def test_plan_table_from_json(gpt):
    from amp_compiler.commands import plan_with_casts

    plan = PrecisionPlan.from_json(plan_with_casts(gpt).to_json(indent=1))
    fp32 = set(_rows(plan_table(plan, only="fp32")))
    assert fp32 == {n for n in gpt.plan.fp32_nodes()
                    if gpt.plan[n].category not in ("non_float",)}
    assert set(_rows(plan_table(plan, only="low"))) == _low_nodes(gpt)
    assert _rows(plan_table(plan, only="casts")) == [c.node for c in gpt.casts]
    why = plan_table(plan, why="softmax")
    assert gpt.plan["softmax"].reason in list(why.columns[1]._cells)
    with pytest.raises(ac.ConfigError, match="no node named"):
        plan_table(plan, why="nope")
    bare = PrecisionPlan.from_json(gpt.plan.to_json())
    with pytest.raises(ac.ConfigError, match="lists no casts"):
        plan_table(bare, only="casts")


# -- headless Chromium ---------------------------------------------------------------------------

def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'profile'}", "--window-size=1400,900", *extra, url],
        capture_output=True, text=True, timeout=120)


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of raw RGB(A) bytes) of an 8-bit non-interlaced PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i:i + 3]) for r in rows for i in range(0, stride, bpp)]


@pytest.mark.chromium
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_renders_in_headless_chromium(gpt_view, tmp_path):
    page = tmp_path / "gpt.html"
    page.write_text(to_html(gpt_view, engine="builtin"), encoding="utf-8")
    url = f"{page.as_uri()}#focus=softmax"
    shot = tmp_path / "shot.png"
    done = _chromium(url, tmp_path, f"--screenshot={shot}")
    assert shot.exists(), done.stderr[-2000:]
    width, height, pixels = _png_pixels(shot)
    assert (width, height) == (1400, 900)
    colours = Counter(pixels)
    assert len(colours) > 200, "a blank or near-blank screenshot"
    near = lambda hexcol: sum(n for px, n in colours.items()  # noqa: E731
                              if sum(abs(px[i] - int(hexcol[1 + 2 * i:3 + 2 * i], 16)) for i in range(3)) < 12)
    assert near(STYLES["low"]["fill"]) > 2000  # green boxes are on screen
    # the script ran: the page is marked ready and the focused node's decision is in the tooltip
    dom = _chromium(url, tmp_path, "--dump-dom").stdout
    assert 'data-ready="1"' in dom and 'data-focus="softmax"' in dom
    tip = re.search(r'<div id="tip"[^>]*>(.*?)</div>', dom, re.S).group(1)
    assert "R5:fp32-acc-low" in tip and "fp32_acc" in tip
