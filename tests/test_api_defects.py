"""API defects of the hardening issue, each checked through the public entry points:

- ``ac.compare`` stays the function however often it is called and whatever imported the
  submodule ``amp_compiler.compare`` (the import system binds submodules on their package);
- ``export_onnx(opset=...)`` writes the opset asked for, or raises naming the range;
- ``keep_fp32=None`` / ``force_low=None`` and calibration batches of another shape are
  ``ConfigError``s that say what to pass;
- names and reasons holding rich markup or terminal escapes are printed as written;
- an ONNX file that fails ``onnx.checker`` as given is blamed on the file, not the conversion;
- ``amp-compiler convert file.py:factory`` runs files that use ``@dataclass`` with postponed
  annotations or import a sibling module, as ``python file.py`` would.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch
from rich.console import Console
from torch import nn

import amp_compiler as ac
from amp_compiler.cli import main
from amp_compiler.errors import ConfigError, OnnxError
from amp_compiler.models import build
from amp_compiler.passes.plan import PrecisionPlan

from test_cli import _tiny_onnx, assert_one_line_error


@pytest.fixture(scope="module")
def mlp():
    model, inputs = build("mlp", "tiny")
    model.eval()
    return model, inputs, ac.convert(model, inputs)


# -- ac.compare -----------------------------------------------------------------------------------

def test_compare_stays_the_function(mlp):
    import amp_compiler.compare  # noqa: F401 -- as any user or test may

    module = sys.modules["amp_compiler.compare"]
    # what the import system does when a submodule finishes importing (the first time, in
    # whatever order): bind it on the package under its own name
    setattr(ac, "compare", module)
    model, inputs, amp = mlp
    for _ in range(2):
        report = ac.compare(model, amp, inputs)
        assert report.first_nonfinite is None and report.rows
    assert ac.compare is module.compare and ac.convert.__module__ == "amp_compiler.convert"


def test_compare_in_a_fresh_process():
    code = ("import amp_compiler as ac\n"
            "first = ac.compare\n"
            "import amp_compiler.compare\n"
            "from amp_compiler.compare import CompareReport\n"
            "assert ac.compare is first and callable(ac.compare), ac.compare\n"
            "assert ac.compare is ac.compare and CompareReport.__name__ == 'CompareReport'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- export_onnx(opset=...) ------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [99, 0, -1, "18", True, 18.0])
def test_export_opset_outside_the_range_is_refused(mlp, tmp_path, opset):
    pytest.importorskip("amp_compiler.onnx.export")
    import onnx

    _, inputs, amp = mlp
    with pytest.raises(ConfigError, match=rf"opset={opset!r}.*use 18-{onnx.defs.onnx_opset_version()}"):
        ac.export_onnx(amp, inputs, tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_export_opset_is_honoured_or_refused(mlp, tmp_path):
    pytest.importorskip("amp_compiler.onnx.export")
    import onnx

    _, inputs, amp = mlp
    path = ac.export_onnx(amp, inputs, tmp_path / "m17.onnx", opset=17)
    assert [o.version for o in onnx.load(path).opset_import if o.domain == ""] == [17]
    # the exporter cannot convert Relu below 14: it used to write opset 18 and report success
    with pytest.raises(OnnxError, match=r"at opset 9 \(it wrote opset 18.*18-\d+ are always honoured"):
        ac.export_onnx(amp, inputs, tmp_path / "m9.onnx", opset=9)
    assert not (tmp_path / "m9.onnx").exists()


# -- keep_fp32 / force_low / calibration ----------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"keep_fp32": None}, {"force_low": None}, {"keep_fp32": 3},
                                    {"force_low": b"relu"}])
@pytest.mark.parametrize("with_inputs", [True, False])
def test_override_arguments_of_the_wrong_type(kwargs, with_inputs):
    model, inputs = build("mlp", "tiny")
    value = next(iter(kwargs.values()))
    with pytest.raises(ConfigError, match=rf"keep_fp32 or force_low got {value!r}: pass a list"):
        ac.convert(model.eval(), inputs if with_inputs else None, **kwargs)


@pytest.mark.parametrize("batch, needle", [
    # the shapes export recorded, or the capture's own guard ("x.size()[1] == 784"), say why
    ((torch.randn(8, 100),), r"calibration batch 1\b.*(784.*\(8, 100\)|\(8, 100\).*784)"),
    ((torch.randn(8, 784), torch.randn(8)), r"batch 1 has 2 inputs; the captured model takes 1 \(x\)"),
    (("x",), r"batch 1, input 0 \(x\) is a str"),
    ((torch.randn(8, 784).double(),), r"batch 1 does not run through the model \(RuntimeError: .*dtype"),
])
def test_calibration_batch_of_another_shape(batch, needle):
    model, inputs = build("mlp", "tiny")
    with pytest.raises(ConfigError, match=needle):
        ac.convert(model.eval(), inputs, calibration=[inputs, batch])


def test_calibration_batch_of_another_shape_under_fx():
    model, _ = build("mlp", "tiny")
    with pytest.raises(ConfigError, match=r"batch 0 does not run through the model \(RuntimeError: "
                                          r"mat1 and mat2 shapes cannot be multiplied"):
        ac.convert(model.eval(), calibration=[(torch.randn(8, 100),)])


# -- markup and escapes are printed as written ----------------------------------------------------

def _rendered(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=400, force_terminal=True, color_system="standard").print(renderable)
    return buf.getvalue()


def test_report_prints_a_class_name_with_markup_as_written():
    class Marked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).relu()

    # a class name is any string (type() or a renaming decorator makes one): it reaches the
    # reason through keep_fp32's entry text
    Marked.__name__ = Marked.__qualname__ = "[bold red]Marked[/]"
    model = nn.Sequential(Marked(), nn.Linear(4, 2)).eval()
    amp = ac.convert(model, (torch.randn(2, 4),), keep_fp32=[Marked])
    decision = next(d for d in amp.plan.values() if d.rule == "R6:keep_fp32")
    assert "[bold red]Marked[/]" in decision.reason
    text = _rendered(amp.report(print_=False))
    assert "[bold red]Marked[/]" in text
    assert "\x1b[1;31m" not in text and "\x1b[31m" not in text  # nothing turned red


def test_cli_report_of_a_plan_with_escapes_and_markup(tmp_path, capsys):
    model, inputs = build("mlp", "tiny")
    plan = ac.convert(model.eval(), inputs).plan
    hostile = "\x1b[31mred\x1b[0m [bold red]loud[/] \r\x08"
    edited = PrecisionPlan(
        {"[bold red]x[/]": plan["linear"].with_(reason=hostile), **plan}, low_dtype=plan.low_dtype,
        device_type=plan.device_type, meta=plan.meta)
    path = tmp_path / "plan.json"
    path.write_text(edited.to_json())
    for argv in (["report", str(path)], ["report", str(path), "--why", "[bold red]x[/]"]):
        assert main(argv + ["--width", "300"]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\r" not in out and "\x08" not in out
        assert "[bold red]x[/]" in out and "\\x1b[31mred\\x1b[0m [bold red]loud[/] \\x0d\\x08" in out
    # a name in an error message is shown, not run, too
    code = main(["report", str(path), "--why", "\x1b[2Jgone"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "no node named")
    assert "\x1b" not in err


# -- ONNX files that are invalid as given ---------------------------------------------------------

def test_an_invalid_onnx_file_is_blamed_on_the_file(tmp_path, capsys):
    pytest.importorskip("amp_compiler.onnx.convert")
    import onnx

    path = tmp_path / "old.onnx"
    _tiny_onnx(path)
    model = onnx.load(str(path))
    model.ir_version = 3  # initializers must then also be graph inputs: the checker refuses it
    onnx.save(model, str(path))
    with pytest.raises(OnnxError) as e:
        ac.convert_onnx(str(path))
    msg = str(e.value)
    assert f"'{path}' is not a valid ONNX model" in msg and "w1 in initializer but not in graph input" in msg
    assert "report the model" not in msg and "keep_fp32" not in msg
    with pytest.raises(OnnxError, match="the model given is not a valid ONNX model"):
        ac.convert_onnx(model)
    code = main(["convert", str(path), "--out", str(tmp_path / "o")])
    assert_one_line_error(code, capsys.readouterr().err, "is not a valid ONNX model", "w1 in initializer")
    assert not (tmp_path / "o").exists()


# -- file.py:factory --------------------------------------------------------------------------------

def test_factory_file_with_dataclass_and_a_sibling(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the file's folder
    for name in ("amp_sibling_helpers", "amp_dc_models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "amp_sibling_helpers.py").write_text("WIDTH = 6\n")
    (tmp_path / "amp_dc_models.py").write_text(textwrap.dedent("""
        from __future__ import annotations

        from dataclasses import dataclass

        import torch
        from torch import nn

        from amp_sibling_helpers import WIDTH


        @dataclass
        class Config:
            width: int = WIDTH
            classes: int = 3


        def make():
            cfg = Config()
            return nn.Sequential(nn.Linear(cfg.width, cfg.classes)), (torch.randn(2, cfg.width),)
    """))
    elsewhere = tmp_path / "run_from_here"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the sibling is found beside the file, not in the cwd
    code = main(["convert", str(tmp_path / "amp_dc_models.py") + ":make", "--out", "o", "--no-onnx"])
    assert code == 0, capsys.readouterr().err
    plan = PrecisionPlan.from_json((elsewhere / "o" / "plan.json").read_text())
    assert plan["linear"].precision == torch.float16
    assert sys.modules["amp_dc_models"].Config().width == 6
