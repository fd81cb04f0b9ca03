"""The human report: one row per node (precision, kind, rule, reason) and the totals, for a
converted model (``amp.report()``) or a plan saved as JSON (``plan_table``, no model needed).
Both draw their rows with one function, ``decision_table``.

    >>> amp.report(only="fp32")      # only the nodes kept in fp32, with why
    >>> amp.report(why="softmax")    # one node's whole decision
    >>> rich.print(plan_table(PrecisionPlan.from_json(open("out/plan.json").read()), only="casts"))
"""

from __future__ import annotations

import re

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from amp_compiler.errors import ConfigError
from amp_compiler.passes.dtypes import dtype_name
from amp_compiler.passes.rules import Rule, meaning, pass_of
from amp_compiler.passes.plan import Decision, PrecisionPlan

_STYLE = {"float16": "green", "bfloat16": "green", "float32": "yellow", "float64": "magenta"}
_ONLY = ("fp32", "low", "casts", "unknown", "rules", "rewrites")
# rows left out of the plan table: inputs, parameters, constants, outputs and non-float values;
# the live report tells the last two by rule, the saved plan's table by category (as before the
# two tables shared their code)
_HIDDEN_RULES = (Rule.R0_NON_FLOAT, Rule.R0_OUTPUT)
_SOURCE_CATEGORIES = ("input", "param", "const")
_SAVED_HIDDEN_CATEGORIES = (*_SOURCE_CATEGORIES, "output", "non_float")


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
            "dtype": dtype_name(amp.low_dtype), "folded": bool(getattr(amp, "folded", False))}


def summary_line(s: dict) -> str:
    """``summary``'s totals in one line, as the report's caption and the pictures' title say it."""
    line = (f"{s['low']} nodes {s['dtype']}, {s['fp32']} fp32, {s['unknown']} unknown ops; "
            f"{s['casts']} casts in the graph ({s['param_casts']} of parameters)")
    return line + ("; weights folded" if s.get("folded") else "")


def decision_table(decisions: PrecisionPlan, low_dtype: torch.dtype, casts, *,
                   only: str | None = None, why: str | None = None,
                   hide_rules: tuple[str, ...] = (),
                   hide_categories: tuple[str, ...] = ()) -> Table:
    """The table of both reports, without its caption: one node's whole decision (``why``, a
    name in ``decisions``), the casts (``only="casts"``), the rules the plan used with their
    meaning (``"rules"``, from ``passes.rules``), what the rewrite passes did and did not do
    (``"rewrites"``: ``meta["rewrites"]`` and ``meta["missed"]``), or one row per node, ``only``
    "fp32" / "low" / "unknown" keeping those; rows whose rule or category is hidden are left out.

    ``casts``: dicts in the shape of ``plan.meta["casts"]`` (node, source, dtype name,
    consumers).
    """
    if why is not None:
        d: Decision = decisions[why]
        table = Table(title=f"why {literal(why)}", box=box.SIMPLE, show_header=False)
        for field in ("kind", "category", "precision", "rule", "reason"):
            value = getattr(d, field)
            table.add_row(field, dtype_name(value) if field == "precision" else literal(value))
            if field == "rule" and meaning(d.rule):
                table.add_row("rule says", literal(meaning(d.rule)))
        for row in _remark_rows(decisions):
            if row[3] == why:  # Text: a rule id next to a colon is no emoji code
                table.add_row(row[0], Text(visible(f"{row[2]} ({row[1]}): {row[4]}")))
        for c in casts:
            if c.get("source") == why:
                table.add_row("cast", literal(f"{c['node']} -> {c['dtype']} for "
                                              f"{', '.join(c['consumers'])}"))
    elif only == "rules":
        table = Table(title="rules this plan used", box=box.SIMPLE_HEAD)
        for col in ("rule", "pass", "nodes", "what it does"):
            table.add_column(col, overflow="fold")
        used: dict[str, int] = {}
        for d in decisions.values():
            used[d.rule] = used.get(d.rule, 0) + 1
        for _, _, rule, *_ in _remark_rows(decisions):
            used[rule] = used.get(rule, 0) + 1
        for rule, n in sorted(used.items(), key=lambda kv: _rule_order(kv[0])):
            table.add_row(literal(rule), pass_of(rule) or "-", str(n), literal(meaning(rule) or "-"))
    elif only == "rewrites":
        table = Table(title="rewrites (taken and missed)", box=box.SIMPLE_HEAD)
        for col in ("", "pass", "rule", "node", "reason"):
            table.add_column(col, overflow="fold")
        for row in _remark_rows(decisions):
            table.add_row(*(literal(v) for v in row))
    elif only == "casts":
        table = Table(title="casts", box=box.SIMPLE_HEAD)
        for col in ("cast node", "value", "to", "consumers"):
            table.add_column(col)
        for c in casts:
            table.add_row(literal(c["node"]), literal(c["source"]), literal(c["dtype"]),
                          literal(", ".join(c["consumers"])))
    else:
        table = Table(title=f"precision plan ({dtype_name(low_dtype)})", box=box.SIMPLE_HEAD)
        for col in ("node", "kind", "precision", "rule", "reason"):
            table.add_column(col, overflow="fold")
        for name, d in decisions.items():
            if d.rule in hide_rules or d.category in hide_categories:
                continue
            p = dtype_name(d.precision)
            if only == "fp32" and (d.precision is None or d.precision.itemsize < 4):
                continue
            if only == "low" and d.precision != low_dtype:
                continue
            if only == "unknown" and d.category != "unknown":
                continue
            table.add_row(literal(name), literal(d.kind), f"[{_STYLE.get(p, 'white')}]{p}[/]",
                          literal(d.rule), literal(d.reason))
    return table


def _remark_rows(plan: PrecisionPlan) -> list[tuple[str, str, str, str, str]]:
    """(taken | missed, pass, rule, node, reason) for every remark the plan keeps."""
    return [(kind, *row) for kind, key in (("taken", "rewrites"), ("missed", "missed"))
            for row in plan.meta.get(key, ())]


_ORDER = {r.value: i for i, r in enumerate(Rule)}


def _rule_order(rule: str) -> tuple[int, str]:
    """Pipeline order (the enum's), rules from elsewhere last."""
    return _ORDER.get(rule, len(_ORDER)), rule


def render_report(amp, *, only: str | None = None, why: str | None = None, print_: bool = True,
                  console: Console | None = None) -> Table:
    """``amp.report()``: the plan table of a converted model (``only``, ``why`` as in
    ``decision_table``), its caption the totals and the ops a forward runs; printed unless
    ``print_=False``, and returned."""
    console = console or Console()
    plan = amp.plan
    if why is not None and why not in plan:
        raise ConfigError(f"no node named {why!r} in the plan; see amp.report() for names")
    casts = [{"node": c.node, "source": c.source, "dtype": dtype_name(c.dtype),
              "consumers": c.consumers} for c in amp.casts]
    table = decision_table(plan, amp.low_dtype, casts, only=only, why=why, hide_rules=_HIDDEN_RULES,
                           hide_categories=_SOURCE_CATEGORIES)
    ops = amp.op_count()
    table.caption = (summary_line(summary(amp))
                     + f"; {ops['per_call']} ops a forward"
                     + (f" (+{ops['per_shape']} once per input shape)" if ops["per_shape"] else ""))
    if print_:
        console.print(table)
    return table


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
    if why is not None and why not in plan:
        close = [n for n in plan if why in n][:5]
        raise ConfigError(f"no node named {why!r} in the plan"
                          + (f" (did you mean {', '.join(close)}?)" if close else
                             "; `amp-compiler report PLAN.json` lists the names"))
    if why is None and only == "casts" and "casts" not in plan.meta:
        raise ConfigError("this plan file lists no casts (it was not written by "
                          "`amp-compiler convert`); run `amp-compiler report TARGET --only "
                          "casts` on the model instead")
    table = decision_table(plan, plan.low_dtype, casts, only=only, why=why,
                           hide_categories=_SAVED_HIDDEN_CATEGORIES)
    c = plan.counts()
    low = dtype_name(plan.low_dtype)
    caption = f"{c['low']} nodes {low}, {c['fp32']} fp32, {c['unknown']} unknown ops"
    if "casts" in plan.meta:
        caption += (f"; {len(casts)} casts in the graph "
                    f"({sum(bool(x.get('is_param')) for x in casts)} of parameters)")
    table.caption = caption
    return table
