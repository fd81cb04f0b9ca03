"""Tests of amp_compiler.bench.workloads (``amp-compiler bench``) on CPU with tiny models.

Each run is 1 round x 2 steps: the numbers are not benchmarks here, the test checks that every
metric is measured, lands in the JSON file and is consistent with the others.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from amp_compiler.bench import command, measure, workloads
from amp_compiler.passes import metrics

FAST = ["--device", "cpu", "--dtype", "bfloat16", "--size", "tiny",
        "--rounds", "1", "--steps", "2", "--warmup", "1"]


def run_bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    assert command.main([*FAST, *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def check_common(result: dict, model: str, mode: str, names: list[str]) -> None:
    assert result["command"].startswith("amp-compiler bench ")
    assert "--model" in result["argv"]
    assert result["date"].endswith("+00:00")
    assert result["torch"] == torch.__version__
    assert result["device"] == "cpu" and result["device_name"]
    assert (result["model"], result["mode"], result["dtype"]) == (model, mode, "bfloat16")
    assert list(result["variants"]) == names
    for name, v in result["variants"].items():
        t = v["time_ms"]
        assert t["samples"] == 2, name  # 1 round x 2 steps
        assert 0 < t["min"] <= t["median"] and t["iqr"] >= 0
        # on CPU there is no allocator to read: memory is reported as absent, not as zero
        assert v["peak_memory_bytes"] is None and v["state_memory_bytes"] is None
        assert isinstance(v["casts"], int) and v["casts"] >= 0
    # the error measure is relative to fp32 itself
    assert result["variants"]["fp32"]["max_rel_error"] == 0.0
    for name in names:
        if name == "fp32":
            continue
        err = result["variants"][name]["max_rel_error"]
        # a bfloat16 forward of a tiny model: clearly not exact, clearly not broken
        assert err is not None and math.isfinite(err) and 1e-5 < err < 5e-2, (name, err)
    ac = result["variants"]["autocast"]
    for name, r in result["ratios"].items():
        v = result["variants"][name]
        assert r["baseline"] == "autocast"
        assert r["time_vs_autocast"] == pytest.approx(
            v["time_ms"]["median"] / ac["time_ms"]["median"])
        assert r["error_vs_autocast"] == pytest.approx(v["max_rel_error"] / ac["max_rel_error"])
        assert r["peak_memory_vs_autocast"] is None


def test_train_mlp_fills_every_metric(tmp_path):
    result = run_bench(tmp_path, "--model", "mlp", "--mode", "train")
    check_common(result, "mlp", "train", ["fp32", "autocast", "amp"])
    v = result["variants"]
    # fp32 casts nothing; autocast casts input, weights and biases of both linears; amp's
    # count is its graph's, and a profiled forward of the graph sees the same casts
    assert v["fp32"]["casts"] == 0
    assert v["autocast"]["casts"] > 0 and v["amp"]["casts"] > 0
    assert v["amp"]["profiled_to_copy"] == v["amp"]["casts"]
    assert result["settings"]["optimizer"] == "AdamW(foreach)"
    assert result["batch"]["inputs"][0]["shape"] == [8, 784]  # x, then the targets
    assert result["batch"]["inputs"][1]["dtype"] == "int64"
    assert result["loss"] is None


def test_infer_gpt_with_half_and_default_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert command.main([*FAST, "--model", "gpt", "--mode", "infer", "--seq-len", "16",
                       "--variants", "fp32,autocast,amp,half"]) == 0
    path = tmp_path / "bench" / "results" / "gpt-infer-cpu-bfloat16.json"
    result = json.loads(path.read_text())
    check_common(result, "gpt", "infer", ["fp32", "autocast", "amp", "half"])
    assert result["batch"]["seq_len"] == 16 and result["batch"]["batch"] == 2
    assert result["settings"]["optimizer"] is None
    v = result["variants"]
    assert v["amp"]["casts"] > 0 and v["autocast"]["casts"] > 0
    # inference folds the weight casts: the graph keeps fewer casts than autocast performs
    assert v["amp"]["casts"] < v["autocast"]["casts"]
    assert v["half"]["casts"] == 0


def test_loss_steps_fp16_train_same_init(tmp_path):
    # --rounds 0: no timing, only errors, casts and the loss run
    result = run_bench(tmp_path, "--model", "gpt", "--mode", "train", "--dtype", "float16",
                       "--loss-steps", "12", "--seq-len", "16", "--rounds", "0", "--warmup", "0")
    assert result["dtype"] == "float16"
    assert all(v["time_ms"] is None for v in result["variants"].values())
    assert all(r["time_vs_autocast"] is None for r in result["ratios"].values())
    assert math.isfinite(result["variants"]["amp"]["max_rel_error"])
    assert result["variants"]["autocast"]["scaler"] == "GradScaler"
    assert result["variants"]["amp"]["scaler"].startswith(("amp.scaler", "LossScaler"))
    loss = result["loss"]
    assert loss["steps"] == 12 and "token_stream" in loss["data"]
    runs = loss["variants"]
    assert list(runs) == ["fp32", "autocast", "amp"]
    for name, r in runs.items():
        assert not r["nan"] and r["nonfinite_steps"] == 0, name
        assert math.isfinite(r["final_loss"]) and math.isfinite(r["first_loss"])
        # same init, same first batch: the first losses agree to fp16 rounding
        assert r["first_loss"] == pytest.approx(runs["fp32"]["first_loss"], rel=1e-2)
        assert r["ratio_to_fp32"] == pytest.approx(r["final_loss"] / runs["fp32"]["final_loss"])
        assert r["ratio_to_fp32"] == pytest.approx(1.0, rel=0.02)
    # 12 steps of AdamW on a learnable stream: the loss went down
    assert runs["fp32"]["final_loss"] < runs["fp32"]["first_loss"]
    assert runs["fp32"]["final_scale"] is None and runs["autocast"]["final_scale"] > 0


def test_variants_start_from_the_same_weights_and_train_their_own_copy():
    cfg = workloads._resolve(["--model", "mlp", "--device", "cpu", "--dtype", "bfloat16"])
    master, inputs = workloads._build(cfg, with_targets=True)
    before = {k: t.clone() for k, t in master.state_dict().items()}
    fp32 = workloads.make_variant("fp32", master, inputs, cfg)
    amp = workloads.make_variant("amp", master, inputs, cfg)
    for v in (fp32, amp):
        params = {n.removeprefix("graph_module."): p for n, p in v.module.named_parameters()}
        assert params.keys() == before.keys() - {k for k, _ in master.named_buffers()}
        for name, p in params.items():
            assert torch.equal(p.detach(), before[name]), (v.name, name)
            # its own copy: not the master's storage, not another variant's
            assert p.data_ptr() != dict(master.named_parameters())[name].data_ptr()
    fp32.step(fp32.inputs)
    # one step moved the fp32 copy only: neither the master nor the amp copy changed
    assert any(not torch.equal(p.detach(), before[n]) for n, p in fp32.module.named_parameters())
    assert all(torch.equal(t, before[k]) for k, t in master.state_dict().items())
    assert all(torch.equal(p.detach(), before[n.removeprefix("graph_module.")])
               for n, p in amp.module.named_parameters())


def test_rel_error_and_cast_counting():
    assert metrics.rel_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == 0.5
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)

    def autocast_linear():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lin(x)

    assert measure.count_to_copy(autocast_linear) == 3  # input, weight, bias
    assert measure.count_to_copy(lambda: x * 0.5) == 0  # scalar wrapping is not a cast
    assert measure.count_to_copy(lambda: x.to(torch.bfloat16)) == 1


@pytest.mark.parametrize("args, fragment", [
    (["--model", "vgg"], "invalid choice"),
    (["--mode", "train", "--variants", "fp32,half"], "inference only"),
    (["--variants", "fp32,bf16"], "--variants"),
    (["--model", "mlp", "--seq-len", "8"], "--seq-len"),
    (["--steps", "0"], "--steps"),
    (["--rounds", "-1"], "--rounds"),
    (["--mode", "infer", "--loss-steps", "5"], "--loss-steps"),
    (["--model", "gpt", "--seq-len", "4096"], "block_size"),
    (["--batch", "two"], "invalid int"),
])
def test_bad_arguments_exit_2_with_one_line(args, fragment, capsys, tmp_path):
    code = command.main(["--device", "cpu", *args, "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "x.json").exists()


def test_help_exits_0(capsys):
    assert command.main(["--help"]) == 0
    assert "--loss-steps" in capsys.readouterr().out
