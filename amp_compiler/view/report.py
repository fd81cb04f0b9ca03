"""The human report: one row per node (precision, kind, rule, reason) and the totals.

    >>> amp.report(only="fp32")      # only the nodes kept in fp32, with why
    >>> amp.report(why="softmax")    # one node's whole decision
"""

from __future__ import annotations

import re

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from amp_compiler.passes.plan import dtype_name

_STYLE = {"float16": "green", "bfloat16": "green", "float32": "yellow", "float64": "magenta"}
_HIDDEN_RULES = ("R0:non-float", "R0:output")


# C0 and C1 control characters but tab and newline: ESC starts the terminal's colour and cursor
# sequences, CR and BS overwrite what was printed
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(value) -> str:
    """``value`` as text whose control characters are shown (``\\x1b``), not sent to the
    terminal: names and reasons come from the user's model or plan file."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def literal(value) -> str:
    """``value`` for a rich cell or title, shown as written: ``visible`` and markup escaped, so a
    module named ``[bold red]x[/]`` is printed as that, not in bold red."""
    return escape(visible(value))


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
        table = Table(title=f"why {literal(why)}", box=box.SIMPLE, show_header=False)
        for field in ("kind", "category", "precision", "rule", "reason"):
            value = getattr(d, field)
            table.add_row(field, dtype_name(value) if field == "precision" else literal(value))
        users = [c for c in amp.casts if c.source == why]
        for c in users:
            table.add_row("cast", literal(f"{c.node} -> {dtype_name(c.dtype)} for "
                                          f"{', '.join(c.consumers)}"))
    elif only == "casts":
        table = Table(title="casts", box=box.SIMPLE_HEAD)
        for col in ("cast node", "value", "to", "consumers"):
            table.add_column(col)
        for c in amp.casts:
            table.add_row(literal(c.node), literal(c.source), dtype_name(c.dtype),
                          literal(", ".join(c.consumers)))
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
            table.add_row(literal(name), literal(d.kind), f"[{_STYLE.get(p, 'white')}]{p}[/]",
                          literal(d.rule), literal(d.reason))
    s = summary(amp)
    ops = amp.op_count()
    table.caption = (f"{s['low']} nodes {s['dtype']}, {s['fp32']} fp32, {s['unknown']} unknown ops; "
                     f"{s['casts']} casts in the graph ({s['param_casts']} of parameters)"
                     + ("; weights folded" if s["folded"] else "")
                     + f"; {ops['per_call']} ops a forward"
                     + (f" (+{ops['per_shape']} once per input shape)" if ops["per_shape"] else ""))
    if print_:
        console.print(table)
    return table
