"""Tests of amp_compiler.bench.onnx_files (``amp-compiler bench --mode onnx``) on the CPU provider.

One round of two runs per file: the timings are not benchmarks here; the test checks that every
file is built, loads, is measured, and that errors, Cast counts and ratios agree with the files.
"""

from __future__ import annotations

import json
import math

import onnx
import pytest
import torch

import amp_compiler as ac

from amp_compiler.bench import command
from amp_compiler.bench import onnx_files as bench_onnx
from amp_compiler.bench import table as bench_table
from amp_compiler.models import build
from amp_compiler.onnx.convert import convert_onnx

FAST = ["--mode", "onnx", "--device", "cpu", "--rounds", "1", "--steps", "2", "--warmup", "1",
        "--error-batch", "0"]


@pytest.fixture(autouse=True)
def _files_opened_in_a_child_first(monkeypatch, ort_no_crash):
    """The bench opens every file it builds in this process: a child ONNX Runtime opens and runs
    each one first (conftest ``ort_no_crash``), so a file that crashes ONNX Runtime fails the
    test rather than ending the test run."""
    build_files = bench_onnx.make_files

    def checked(cfg, model, inputs, progress):
        files = build_files(cfg, model, inputs, progress)
        for proto in files.values():
            ort_no_crash(proto, inputs)
        return files

    monkeypatch.setattr(bench_onnx, "make_files", checked)


def run(tmp_path, *args: str) -> dict:
    out = tmp_path / "onnx.json"
    assert command.main([*FAST, *args, "--out", str(out)]) == 0  # through bench's entry point
    return json.loads(out.read_text())


def test_gpt_every_file_measured_and_consistent(tmp_path, capsys):
    result = run(tmp_path, "--model", "gpt")
    assert result["command"].startswith("amp-compiler bench --mode onnx")
    assert result["mode"] == "onnx" and result["baseline"] == "onnxconverter-common"
    assert list(result["files"]) == list(bench_onnx.DEFAULT_FILES) and not result["refused_by_ort"]
    files = result["files"]
    for name, r in files.items():
        assert r["provider"] == "CPUExecutionProvider"
        assert r["time_ms"]["samples"] == 2 and r["time_ms"]["median"] > 0, name
        assert r["size_bytes"] > 0
    # the fp32 file is exact up to the engine; every fp16 file is float16-accurate, not exact
    assert files["fp32"]["max_rel_error"] < 1e-5
    for name in bench_onnx.DEFAULT_FILES[1:]:
        err = files[name]["max_rel_error"]
        assert math.isfinite(err) and 1e-5 < err <= 2.0 ** -10, (name, err)
    # the min-cast recipe has onnxconverter-common's cast count; the default plan buys accuracy
    occ = files["onnxconverter-common"]
    assert files["convert_onnx-mincast"]["casts"] <= occ["casts"] < files["convert_onnx"]["casts"]
    assert files["convert_onnx"]["max_rel_error"] < occ["max_rel_error"]
    for name, r in files.items():
        assert r["time_vs_baseline"] == pytest.approx(r["time_ms"]["median"] / occ["time_ms"]["median"])
        assert r["error_vs_baseline"] == pytest.approx(r["max_rel_error"] / occ["max_rel_error"])
    assert "convert_onnx-mincast" in capsys.readouterr().out  # the table


def test_a_library_model_against_both_converters_at_two_batches(tmp_path, capsys):
    """A suite model (HF GPT-2, tiny config), dynamo-exported, ModelOpt's file beside
    onnxconverter-common's, one set of files timed at batch 1 and 3; the ratios to the other
    converters are those of the rows."""
    pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt is a dev dependency")
    result = run(tmp_path, "--model", "gpt2", "--size", "tiny", "--batch", "1,3", "--error-batch", "32",
                 "--files", "fp32,onnxconverter-common,modelopt,convert_onnx")
    assert [r["input_shapes"] for r in result["runs"]] == [[[1, 64]], [[3, 64]]]
    assert result["files"] == result["runs"][0]["files"]
    for run_ in result["runs"]:
        files = run_["files"]
        assert list(files) == ["fp32", "onnxconverter-common", "modelopt", "convert_onnx"]
        occ, mo, ours = files["onnxconverter-common"], files["modelopt"], files["convert_onnx"]
        fastest = min(occ["time_ms"]["median"], mo["time_ms"]["median"])
        assert ours["time_vs_fastest_other"] == pytest.approx(ours["time_ms"]["median"] / fastest)
        assert ours["error_vs_best_other"] == pytest.approx(
            ours["max_rel_error"] / min(occ["max_rel_error"], mo["max_rel_error"]))
        assert ours["casts_vs_modelopt"] == pytest.approx(ours["casts"] / mo["casts"])
        assert ours["size_vs_onnxconverter_common"] == pytest.approx(ours["size_bytes"] / occ["size_bytes"])
        assert 0 < ours["max_rel_error"] < min(occ["max_rel_error"], mo["max_rel_error"])
    errors = result["errors"]  # on 32 distinct samples, beside the timed batches
    assert errors["batch"] == 32 and errors["input_shapes"] == [[32, 64]]
    e_occ, e_mo, e_ours = (errors["files"][k] for k in ("onnxconverter-common", "modelopt", "convert_onnx"))
    for key in ("max_rel", "rms_rel"):
        best = min(e_occ[f"{key}_error"], e_mo[f"{key}_error"])
        assert e_ours[f"{key}_vs_best_other"] == pytest.approx(e_ours[f"{key}_error"] / best)
        assert 0 < e_ours[f"{key}_error"] < best
    assert e_ours["rms_rel_error"] <= e_ours["max_rel_error"] * 2  # RMS of the same differences
    err_md = bench_table.onnx_errors_table([str(tmp_path / "onnx.json")])
    assert f"| 32 | convert_onnx | {e_ours['max_rel_error']:.2e} |" in err_md
    md = bench_table.onnx_table([str(tmp_path / "onnx.json")]).splitlines()
    assert len(md) == 2 + 2 * 4  # header, rule, a row per file and batch
    ours = result["runs"][1]["files"]["convert_onnx"]
    row = next(line for line in md if "| 3x64 | convert_onnx |" in line)
    assert f"| {ours['time_vs_fastest_other']:.2f}x |" in row and f"| {ours['casts_vs_modelopt']:.2f}x |" in row
    # the command line prints the ONNX tables only: no empty table of torch workloads above them
    capsys.readouterr()
    assert bench_table.main([str(tmp_path / "onnx.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| run | inputs | file |") and "| workload |" not in printed


def test_files_dir_builds_once_and_the_run_reads_those_files(tmp_path, capsys):
    """--build-only writes the files (the slow part, on many CPU cores at once); the timed run
    with the same --files-dir reads them: a file changed on disk is the one measured."""
    keep = tmp_path / "files"
    assert command.main([*FAST, "--model", "mlp", "--files", "fp32,convert_onnx", "--files-dir", str(keep),
                       "--build-only"]) == 0
    assert "built convert_onnx, fp32" in capsys.readouterr().out
    ours = keep / f"mlp-tiny-float16-opsetdefault-{bench_onnx.code_digest()}-convert_onnx.onnx"
    proto = onnx.load(ours)
    casts = sum(n.op_type == "Cast" for n in proto.graph.node)
    # one more (identity) Cast in the stored file: the run must count it
    last = proto.graph.output[0].name
    proto.graph.node[-1].output[0] = "pre_" + last
    proto.graph.node.append(onnx.helper.make_node("Cast", ["pre_" + last], [last], to=1))
    onnx.save(proto, ours)
    result = run(tmp_path, "--model", "mlp", "--files", "fp32,convert_onnx", "--files-dir", str(keep))
    assert result["files"]["convert_onnx"]["casts"] == casts + 1


def test_files_dir_builds_again_after_a_code_change(tmp_path, capsys, monkeypatch):
    """A kept file is named by the digest of the code that built it: once amp_compiler's source
    (or a converter's version) changes, the run builds afresh instead of measuring the old file."""
    keep = tmp_path / "files"
    argv = [*FAST, "--model", "mlp", "--files", "fp32,convert_onnx", "--files-dir", str(keep), "--build-only"]
    assert command.main(argv) == 0
    before = sorted(p.name for p in keep.iterdir())
    assert len(before) == 2 and all(bench_onnx.code_digest() in name for name in before)
    monkeypatch.setattr(bench_onnx, "code_digest", lambda: "0ther0ne")
    assert command.main(argv) == 0
    after = sorted(p.name for p in keep.iterdir())
    assert len(after) == 4 and sum("0ther0ne" in name for name in after) == 2
    capsys.readouterr()


def test_build_only_needs_a_files_dir(capsys, tmp_path):
    assert command.main([*FAST, "--build-only", "--out", str(tmp_path / "x.json")]) == 2
    assert "--files-dir" in capsys.readouterr().err


def test_batch_list_must_hold_positive_integers(capsys, tmp_path):
    assert command.main([*FAST, "--batch", "1,x", "--out", str(tmp_path / "x.json")]) == 2
    assert "--batch '1,x'" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_the_min_cast_recipe_runs_on_models_without_its_kinds(model, tmp_path):
    """force_low=("add", "layer_norm") names a kind these models lack: a warning
    (UnusedOverrideWarning), not the ConfigError that made the bench exit 1."""
    with pytest.warns(ac.UnusedOverrideWarning, match="layer_norm"):
        result = run(tmp_path, "--model", model, "--files", "fp32,convert_onnx-mincast")
    assert result["files"]["convert_onnx-mincast"]["casts"] >= 1
    assert result["files"]["convert_onnx-mincast"]["max_rel_error"] < 2.0 ** -9


def test_cast_counts_are_those_of_the_files(tmp_path):
    """The JSON's Cast count is the file's: the same conversion done by hand agrees."""
    result = run(tmp_path, "--model", "mlp", "--files", "fp32,convert_onnx")
    model, inputs = build("mlp", "tiny")
    fp32 = bench_onnx.export_fp32(model.eval(), inputs)
    ours = convert_onnx(fp32)
    assert result["files"]["convert_onnx"]["casts"] == sum(n.op_type == "Cast" for n in ours.graph.node)
    assert result["files"]["fp32"]["casts"] == sum(n.op_type == "Cast" for n in fp32.graph.node)
    assert result["baseline"] == "fp32"  # no onnxconverter-common file asked for


def test_bfloat16_drops_onnxconverter_common(tmp_path):
    result = run(tmp_path, "--model", "mlp", "--dtype", "bfloat16", "--files", "fp32,onnxconverter-common")
    assert list(result["files"]) == ["fp32"]


@pytest.mark.parametrize("args, fragment", [
    (["--files", "fp32,tensorrt"], "--files"),
    (["--model", "mlp", "--seq-len", "8"], "--seq-len"),
    (["--steps", "0"], "--steps"),
])
def test_bad_arguments_exit_2_with_one_line(args, fragment, capsys, tmp_path):
    code = command.main(["--mode", "onnx", "--device", "cpu", *args, "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_gpu_is_a_clear_error(capsys, tmp_path):
    assert command.main(["--mode", "onnx", "--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_export_fp32_is_a_valid_dynamic_batch_file():
    model, inputs = build("gpt", "tiny")
    proto = bench_onnx.export_fp32(model.eval(), inputs)
    onnx.checker.check_model(proto, full_check=True)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # batch is symbolic
