"""Tests for ``amp_compiler.onnx.check``: ONNX Runtime in a child process.

The child's deaths are made on purpose with a stand-in child (same protocol, no ONNX Runtime):
a real ONNX Runtime crash depends on its version. The real child runs a tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from amp_compiler.onnx import check as onnx_check
from amp_compiler.onnx.check import OrtProbe, probe_onnx

# Answers like the real child; dies by SIGSEGV on a path ending in crash.onnx, exits on
# exit.onnx, hangs on hang.onnx, and raises on anything else ending in .bad.
_STAND_IN = r"""
import json, os, signal, sys, time
print(json.dumps({"providers": ["CPUExecutionProvider"]}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    print("probe: building a session for " + req["path"], file=sys.stderr, flush=True)
    if req["path"].endswith("crash.onnx"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if req["path"].endswith("exit.onnx"):
        os._exit(3)
    if req["path"].endswith("hang.onnx"):
        time.sleep(60)
    status = "error" if req["path"].endswith(".bad") else "ok"
    print(json.dumps({"status": status, "message": "stand-in"}), flush=True)
"""


def test_deaths_are_reported_and_the_next_check_gets_a_fresh_child(monkeypatch, tmp_path):
    monkeypatch.setattr(onnx_check, "_CHILD", _STAND_IN)
    with OrtProbe(timeout=1) as probe:
        first = probe.check(tmp_path / "a.onnx")
        crash = probe.check(tmp_path / "crash.onnx", (np.zeros(3, np.float32),))
        after = probe.check(tmp_path / "b.onnx")
        exited = probe.check(tmp_path / "exit.onnx")
        hung = probe.check(tmp_path / "hang.onnx")
        refused = probe.check(tmp_path / "c.bad")
        assert probe.children == 4  # the first, and one after each death
    assert [r.status for r in first + after] == ["ok", "ok"] and not first[0].died
    (c,) = crash
    assert c.status == "crash" and c.died and c.signal == "SIGSEGV" and c.returncode < 0
    assert "killed by SIGSEGV" in str(c) and "crash.onnx" in str(c) and "building a session" in c.message
    assert exited[0].status == "exit" and exited[0].returncode == 3 and exited[0].died
    assert hung[0].status == "timeout" and hung[0].died
    assert refused[0].status == "error" and not refused[0].died


def test_real_child_runs_a_model_and_reports_a_refusal(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with OrtProbe() as probe:
        ok = probe.check(model, (np.ones((2, 4), np.float32),))  # an in-memory model
        zeros = probe.check(model)  # no inputs: zeros of the declared shape
        missing = probe.check(tmp_path / "missing.onnx")
        assert probe.children == 1 and probe.providers[0] == "CPUExecutionProvider"
    assert [r.status for r in ok + zeros] == ["ok"] * (len(ok) + len(zeros))
    assert ok[0].message == "built and ran"
    assert {r.status for r in missing} == {"error"} and "NO_SUCHFILE" in missing[0].message
    assert probe_onnx(model)[0].status == "ok"


def test_a_death_fails_the_test_naming_the_signal(monkeypatch, tmp_path):
    from conftest import no_crash_check  # what the ort_no_crash fixture hands a test

    monkeypatch.setattr(onnx_check, "_CHILD", _STAND_IN)
    with OrtProbe(timeout=2) as probe:
        check = no_crash_check(probe)
        assert check(tmp_path / "fine.onnx")[0].status == "ok"
        assert check(tmp_path / "c.bad")[0].status == "error"  # a refusal is the test's business
        with pytest.raises(pytest.fail.Exception, match="killed by SIGSEGV"):
            check(tmp_path / "crash.onnx")
