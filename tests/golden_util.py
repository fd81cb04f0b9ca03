"""Golden plan tables: a PrecisionPlan as plain data, stored as JSON, and a readable diff.

A table maps node name -> [kind, category, precision, rule]; the reason text is left out so
rewording a reason does not break the tables. Tables live in ``tests/golden/<model>_<dtype>.json``.

    >>> table = plan_table(amp.plan)
    >>> table["linear"]
    ['linear', 'allow', 'bfloat16', 'R1:allow']
    >>> print(diff_tables(load_table(path), table))
"""

from __future__ import annotations

import json
from pathlib import Path

from amp_compiler.passes.plan import PrecisionPlan, dtype_name

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_ENV = "AMP_UPDATE_GOLDEN"


def golden_path(model: str, dtype) -> Path:
    return GOLDEN_DIR / f"{model}_{dtype_name(dtype)}.json"


# bookkeeping nodes whose presence depends on the torch version (export's guard module,
# runtime asserts), not on the model or on our passes
_UNSTABLE_KINDS = frozenset({"guards", "assert"})


def plan_table(plan: PrecisionPlan) -> dict[str, list[str]]:
    """node -> [kind, category, precision, rule], in graph order."""
    return {n: [d.kind, d.category, dtype_name(d.precision), d.rule] for n, d in plan.items()
            if d.kind not in _UNSTABLE_KINDS}


def save_table(path: Path, table: dict[str, list[str]]) -> None:
    # one node per line: a change to one decision is a one-line change in review
    lines = [f"  {json.dumps(n)}: {json.dumps(row)}" for n, row in table.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def load_table(path: Path) -> dict[str, list[str]]:
    return json.loads(path.read_text())


def diff_tables(golden: dict[str, list[str]], current: dict[str, list[str]]) -> str:
    """Human-readable differences, one line per node: changed, missing, new."""
    out = []
    fields = ("kind", "category", "precision", "rule")
    # golden order first, then the nodes only the current plan has
    for n in list(golden) + [n for n in current if n not in golden]:
        old, new = golden.get(n), current.get(n)
        if old == new:
            continue
        if new is None:
            out.append(f"- {n}: {' / '.join(old)}  (no longer in the graph)")
        elif old is None:
            out.append(f"+ {n}: {' / '.join(new)}  (new node)")
        else:
            changes = ", ".join(f"{f} {a} -> {b}" for f, a, b in zip(fields, old, new) if a != b)
            out.append(f"~ {n}: {changes}")
    return "\n".join(out)
