"""Golden plan tables: the plan of every reference model (tiny, eval mode, torch.export path,
float16 and bfloat16) compared with the table stored in ``tests/golden/``.

A mismatch prints, node by node, what changed (kind, category, precision, rule). When the change
is intended, regenerate the tables and review them like code:

    AMP_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import os

import pytest

from conftest import DTYPES, MODELS, eval_conversion
from golden_util import UPDATE_ENV, diff_tables, golden_path, load_table, plan_table, save_table


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plan_matches_golden_table(name, dtype):
    amp = eval_conversion(name, dtype, "export")[2]
    current = plan_table(amp.plan)
    path = golden_path(name, dtype)
    if os.environ.get(UPDATE_ENV) == "1":
        path.parent.mkdir(exist_ok=True)
        save_table(path, current)
    assert path.exists(), f"no golden table {path.name}: run {UPDATE_ENV}=1 pytest tests/test_golden.py"
    golden = load_table(path)
    diff = diff_tables(golden, current)
    assert not diff, f"plan of {name} ({dtype}) differs from {path.name}:\n{diff}\n" \
                     f"(intended? regenerate with {UPDATE_ENV}=1 pytest tests/test_golden.py)"


def test_diff_is_readable():
    golden = {"a": ["linear", "allow", "float16", "R1:allow"], "b": ["add", "infer", "float16", "R3:between-low"]}
    current = {"a": ["linear", "allow", "float32", "R6:keep_fp32"], "c": ["exp", "deny", "float32", "R2:deny"]}
    diff = diff_tables(golden, current).splitlines()
    assert diff == ["~ a: precision float16 -> float32, rule R1:allow -> R6:keep_fp32",
                    "- b: add / infer / float16 / R3:between-low  (no longer in the graph)",
                    "+ c: exp / deny / float32 / R2:deny  (new node)"]
    assert diff_tables(golden, dict(golden)) == ""
