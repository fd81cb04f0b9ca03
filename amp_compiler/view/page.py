"""The picture as one offline HTML page: the SVG inline, a legend, the plan's totals, zoom
buttons and a tooltip per box showing its Decision. No external resources.

    >>> open("gpt.html", "w").write(to_html(graph_view(amp)))   # hover a box for its decision
    >>> # gpt.html#focus=softmax opens with that node's tooltip pinned
"""

from __future__ import annotations

import json
import re

from amp_compiler.view.graph_view import GraphView
from amp_compiler.view.style import ACC_STROKE, STYLES, UNKNOWN_STROKE
from amp_compiler.view.svg import esc, to_svg

__all__ = ["to_html"]


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
    spans = [f'<span><span class="sw" style="background:{f};border-color:{s};{extra}"></span>{esc(t)}</span>'
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
    summary = "".join(f"<span><b>{v}</b> {esc(t)}</span>" for v, t in facts)
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
        f"<title>{esc(view.title)}</title><style>{_CSS}</style></head><body>\n"
        f"<header><h1>{esc(view.title)}</h1><div class=\"summary\">{summary}</div>"
        f"{_legend(view)}<div class=\"controls\"><button id=\"zout\">−</button>"
        "<button id=\"zin\">+</button><button id=\"zfit\">fit width</button>"
        "<button id=\"z1\">100%</button> hover a box for its decision</div></header>\n"
        f"<div id=\"graph\">{svg}</div><div id=\"tip\"></div>\n"
        f"<script type=\"application/json\" id=\"amp_nodes\">{script_json(nodes_json)}</script>\n"
        f"<script type=\"application/json\" id=\"amp_edges\">{script_json(edges_json)}</script>\n"
        f"<script>{_JS}</script>\n</body></html>\n")
