"""The house's contracts (``scripts/import_map.py``): no import circle, counting imports written
inside functions; ``passes/`` imports nothing from ``amp_compiler`` but ``errors``; rooms import
downwards only; no file over 500 lines unless the map says why. Checked on the repository, and
on a small tree that breaks each contract, so that the checks are seen to fail."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "import_map.py"


@pytest.fixture(scope="module")
def import_map():
    spec = importlib.util.spec_from_file_location("import_map", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_map"] = module
    spec.loader.exec_module(module)
    return module


def test_the_repository_keeps_every_contract(import_map):
    modules = import_map.collect()
    assert {"amp_compiler.convert", "amp_compiler.passes.infra", "amp_compiler.capture.fx",
            "amp_compiler.onnx.convert", "amp_compiler.view.report", "amp_compiler.bench.command"} <= set(modules)
    assert import_map.problems(modules) == []
    for mod in modules.values():  # every file says what it is for
        if mod.path.name != "__init__.py" or mod.lines:
            text = (ROOT / mod.path).read_text().lstrip()
            assert text.startswith(('"""', "#!")), f"{mod.path} has no module docstring"


def test_the_command_line_check_passes_here_and_prints_the_house():
    out = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "circles 0" in out.stdout and "files over 500 lines 0" in out.stdout
    for folder in ("amp_compiler/capture", "amp_compiler/onnx", "amp_compiler/view", "amp_compiler/bench", "passes"):
        assert folder in out.stdout


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_each_broken_contract_is_named(import_map, tmp_path):
    _tree(tmp_path, {
        "amp_compiler/__init__.py": "",
        "amp_compiler/errors.py": "",
        # a circle through an import written inside a function
        "amp_compiler/convert.py": "def f():\n    from amp_compiler import module\n",
        "amp_compiler/module.py": "from amp_compiler.convert import f\n",
        # the ground floor reaching up (errors is allowed)
        "passes/__init__.py": "",
        "passes/ranges.py": "from amp_compiler.errors import X\nfrom amp_compiler.convert import f\n",
        # a room importing one above it: the compiler's core importing the benchmarks
        "amp_compiler/bench/__init__.py": "",
        "amp_compiler/scaler.py": "from amp_compiler.bench import x\n",
        "models/__init__.py": "",
        "amp_compiler/long.py": "x = 1\n" * 501,
    })
    found = import_map.problems(import_map.collect(tmp_path))
    text = "\n".join(found)
    assert "import circle: " in text and "amp_compiler.convert" in text and "amp_compiler.module" in text
    assert "passes/ is the ground floor: amp_compiler.passes.ranges imports amp_compiler.convert" in text
    assert "amp_compiler.errors" not in text.split("ground floor")[-1].splitlines()[0]
    assert "upward import: amp_compiler.scaler (amp_compiler) imports amp_compiler.bench" in text
    # the ground floor's climb is an upward import as well
    assert "upward import: amp_compiler.passes.ranges (amp_compiler.passes) imports amp_compiler.convert" in text
    assert "amp_compiler/long.py: 501 lines" in text
    assert len(found) == 5, found


def test_imports_in_functions_are_counted_apart(import_map, tmp_path):
    _tree(tmp_path, {
        "amp_compiler/__init__.py": "",
        "amp_compiler/a.py": "import amp_compiler.b\n\ndef f():\n    from amp_compiler import c\n",
        "amp_compiler/b.py": "", "amp_compiler/c.py": "",
        "passes/__init__.py": "", "models/__init__.py": "",
    })
    modules = import_map.collect(tmp_path)
    assert modules["amp_compiler.a"].imports == {"amp_compiler.b": False, "amp_compiler.c": True}
    (row,) = [r for r in import_map.house(modules) if r[0] == "amp_compiler"]
    assert row[1:] == (4, 4, 1, 1)  # files, lines, imports at module level, inside functions
