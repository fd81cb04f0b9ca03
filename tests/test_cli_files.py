"""Files the CLI writes: links are replaced, never followed; an output folder appears whole or
not at all; paths that cannot be written are one-line errors with exit code 2.

- ``convert`` (plan.json, report.txt, graph.py, model.onnx), ``inspect`` and ``export``: a
  dangling link at a destination is "already exists" without --overwrite (its target is not
  created), and with --overwrite the link itself is replaced (the file it pointed to is kept);
- a step failing after the first file was staged (the ONNX export) leaves no folder and no
  staging debris; a re-run needs no --overwrite; an existing folder keeps its old files;
- ``--out /proc/x``, ``--out`` an existing file for a folder, a folder for a file: exit 2.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from amp_compiler.cli import main
from amp_compiler.errors import OnnxError
from amp_compiler.passes.plan import PrecisionPlan

from test_cli import assert_one_line_error

CONVERT = ("convert", "mlp", "--no-onnx")
FILES = ("plan.json", "report.txt", "graph.py")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _link(at: Path, target: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target)


def _no_debris(folder: Path) -> None:
    assert not [p for p in folder.iterdir() if "amp_staging" in p.name or "amp_tmp" in p.name]


# -- links ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_convert_does_not_write_through_a_dangling_link(tmp_path, capsys, name):
    out, target = tmp_path / "out", tmp_path / "elsewhere" / "x"
    target.parent.mkdir()
    _link(out / name, target)
    code, _, err = run(capsys, *CONVERT, "--out", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert not target.exists() and sorted(p.name for p in out.iterdir()) == [name]


def test_convert_overwrite_replaces_links_not_their_targets(tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in FILES:
        (elsewhere / name).write_text("keep me")
        _link(out / name, elsewhere / name)
    code, _, err = run(capsys, *CONVERT, "--out", out, "--overwrite")
    assert code == 0, err
    for name in FILES:
        assert (elsewhere / name).read_text() == "keep me"
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 100
    PrecisionPlan.from_json((out / "plan.json").read_text())
    _no_debris(out)


def test_inspect_replaces_a_link_only_with_overwrite(tmp_path, capsys):
    target, link = tmp_path / "target.dot", tmp_path / "g.dot"
    _link(link, target)
    code, _, err = run(capsys, "inspect", "mlp", "--format", "dot", "--out", link)
    assert_one_line_error(code, err, "already exists")
    assert not target.exists()
    target.write_text("keep me")
    code, _, err = run(capsys, "inspect", "mlp", "--format", "dot", "--out", link, "--overwrite")
    assert code == 0, err
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text().startswith("digraph")
    _no_debris(tmp_path)


def test_export_onnx_treats_a_dangling_link_as_existing(tmp_path):
    pytest.importorskip("amp_compiler.onnx.io")
    from amp_compiler.onnx.io import OnnxFileExistsError, check_destination, save_model

    import onnx
    from onnx import helper

    link, target = tmp_path / "m.onnx", tmp_path / "target.onnx"
    _link(link, target)
    with pytest.raises(OnnxFileExistsError, match="already exists"):
        check_destination(link, overwrite=False)
    model = helper.make_model(helper.make_graph([], "empty", [], []))
    target.write_text("keep me")
    save_model(model, link, overwrite=True)
    assert target.read_text() == "keep me" and not link.is_symlink()
    assert onnx.load(str(link)).graph.name == "empty"


# -- all or nothing -------------------------------------------------------------------------------

def _failing_export(monkeypatch):
    def export(amp, inputs, path, **kw):
        Path(path).write_bytes(b"half a file")  # what a crash mid-write would leave
        raise OnnxError("export failed on purpose")

    monkeypatch.setattr("amp_compiler.commands._onnx_export_fn", lambda: export)


def test_a_failing_step_leaves_no_folder(tmp_path, capsys, monkeypatch):
    _failing_export(monkeypatch)
    out = tmp_path / "new" / "deeper" / "out"
    code, _, err = run(capsys, "convert", "mlp", "--out", out)
    assert_one_line_error(code, err, "export failed on purpose")
    assert list(tmp_path.iterdir()) == []  # not even the parent folders it made
    monkeypatch.undo()
    code, _, err = run(capsys, *CONVERT, "--out", out)  # no --overwrite needed
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


def test_a_failing_step_keeps_an_existing_folder_as_it_was(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run(capsys, *CONVERT, "--out", out, "--dtype", "bfloat16")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _failing_export(monkeypatch)
    code, _, err = run(capsys, "convert", "mlp", "--out", out, "--overwrite")
    assert_one_line_error(code, err, "export failed on purpose")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _no_debris(out)


def test_a_new_folder_gets_the_usual_mode(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, *CONVERT, "--out", out)[0] == 0
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    code, stdout, _ = run(capsys, *CONVERT, "--out", out, "--overwrite")
    printed = "".join(stdout.split())  # rich folds long paths over lines
    assert code == 0 and printed.count("wrote") == len(FILES)
    assert all(f"wrote{out / n}" in printed for n in FILES), stdout


# -- paths that cannot be written -----------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("argv", [
    ("convert", "mlp", "--no-onnx", "--out", "/proc/amp-x"),
    ("convert", "mlp", "--no-onnx", "--out", "/proc/amp-x/y"),
    ("inspect", "mlp", "--format", "dot", "--out", "/proc/amp-x.dot"),
    ("export", "mlp", "--out", "/proc/amp-x.onnx"),
])
def test_unwritable_out_is_one_line_exit_2(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "cannot write /proc/amp-x")


def test_out_of_the_wrong_type(tmp_path, capsys):
    a_file, a_folder = tmp_path / "file", tmp_path / "folder"
    a_file.write_text("x")
    a_folder.mkdir()
    code, _, err = run(capsys, *CONVERT, "--out", a_file)
    assert_one_line_error(code, err, f"--out {a_file} exists and is not a folder")
    code, _, err = run(capsys, *CONVERT, "--out", a_file / "sub")  # a file where a folder goes
    assert_one_line_error(code, err, "cannot write")
    for command in (("inspect", "mlp", "--format", "dot"), ("export", "mlp")):
        code, _, err = run(capsys, *command, "--out", a_folder, "--overwrite")
        assert_one_line_error(code, err, f"--out {a_folder} is a folder")
    (a_folder / "plan.json").mkdir()
    code, _, err = run(capsys, *CONVERT, "--out", a_folder, "--overwrite")
    assert_one_line_error(code, err, "plan.json is a folder")
    assert a_file.read_text() == "x"


def test_nothing_writes_modules_with_torch_save():
    """A torch.save straight to its destination leaves a truncated file when interrupted: the
    project has none; one added later must go through amp_compiler.onnx.io.replacing (this test says so)."""
    root = Path(__file__).resolve().parent.parent
    sources = [p for d in ("amp_compiler", "passes", "models") for p in (root / d).rglob("*.py")]
    assert sources
    offenders = [str(p.relative_to(root)) for p in sources
                 if re.search(r"\btorch\.save\(", text := p.read_text(encoding="utf-8"))
                 and "replacing(" not in text]
    assert offenders == [], offenders
