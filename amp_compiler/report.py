"""The human report: one row per node (precision, kind, rule, reason) and the totals.

    >>> amp.report(only="fp32")      # only the nodes kept in fp32, with why
    >>> amp.report(why="softmax")    # one node's whole decision
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from amp_compiler.passes.plan import dtype_name

_STYLE = {"float16": "green", "bfloat16": "green", "float32": "yellow", "float64": "magenta"}
_HIDDEN_RULES = ("R0:non-float", "R0:output")


def summary(amp) -> dict:
    """Totals: nodes computing low / fp32, unknown ops, casts in the graph."""
    counts = amp.plan.counts()
    casts = amp.casts
    return {**counts, "casts": len(casts), "param_casts": sum(c.is_param for c in casts),
            "dtype": dtype_name(amp.low_dtype), "folded": amp.folded}


def render_report(amp, *, only: str | None = None, why: str | None = None, print_: bool = True,
                  console: Console | None = None) -> Table:
    console = console or Console()
    plan = amp.plan
    if why is not None:
        if why not in plan:
            from amp_compiler.errors import ConfigError
            raise ConfigError(f"no node named {why!r} in the plan; see amp.report() for names")
        d = plan[why]
        table = Table(title=f"why {why}", box=box.SIMPLE, show_header=False)
        for field in ("kind", "category", "precision", "rule", "reason"):
            value = getattr(d, field)
            table.add_row(field, dtype_name(value) if field == "precision" else str(value))
        users = [c for c in amp.casts if c.source == why]
        for c in users:
            table.add_row("cast", f"{c.node} -> {dtype_name(c.dtype)} for {', '.join(c.consumers)}")
    elif only == "casts":
        table = Table(title="casts", box=box.SIMPLE_HEAD)
        for col in ("cast node", "value", "to", "consumers"):
            table.add_column(col)
        for c in amp.casts:
            table.add_row(c.node, c.source, dtype_name(c.dtype), ", ".join(c.consumers))
    else:
        table = Table(title=f"precision plan ({dtype_name(amp.low_dtype)})", box=box.SIMPLE_HEAD)
        for col in ("node", "kind", "precision", "rule", "reason"):
            table.add_column(col, overflow="fold")
        for name, d in plan.items():
            if d.rule in _HIDDEN_RULES or d.category in ("input", "param", "const"):
                continue
            p = dtype_name(d.precision)
            if only == "fp32" and d.precision is not None and d.precision.itemsize < 4:
                continue
            if only == "fp32" and d.precision is None:
                continue
            if only == "low" and d.precision != amp.low_dtype:
                continue
            if only == "unknown" and d.category != "unknown":
                continue
            table.add_row(name, d.kind, f"[{_STYLE.get(p, 'white')}]{p}[/]", d.rule, d.reason)
    s = summary(amp)
    table.caption = (f"{s['low']} nodes {s['dtype']}, {s['fp32']} fp32, {s['unknown']} unknown ops; "
                     f"{s['casts']} casts in the graph ({s['param_casts']} of parameters)"
                     + ("; weights folded" if s["folded"] else ""))
    if print_:
        console.print(table)
    return table
