"""Open ONNX files in ONNX Runtime in a child process, so that a crash there is a report, not
the end of the caller's process.

ONNX Runtime can die on a signal while it builds a session: 1.32's CPU EP segfaults in
``InferenceSession(path)`` at the default optimization level on a pattern our export once wrote
(``passes.onnx_transposes`` rule W9). A Python process that opens such a file in-process dies with
it, pytest and all. ``OrtProbe`` keeps one child Python process (``sys.executable``, importing
only numpy and onnxruntime; started on first use, started again after it dies) that opens each
file with default session options, once per execution provider (CPU, and CUDA where ONNX
Runtime has it), and runs it once. Each check ends in one ``ProbeResult`` per provider:

- ``ok``: the session was built and ran (or could not be fed: a bfloat16 input, said so);
- ``error``: ONNX Runtime raised (a file it refuses: that is the caller's own business);
- ``crash``: the child died on a signal (``SIGSEGV`` ...); ``exit``: it died without one;
  ``timeout``: no answer in time (the child is killed). These three would have taken the
  caller down or hung it: ``ProbeResult.died``.

One child serves any number of checks: a check costs a session build and a run (10-20 ms for
the test suite's small models), not an interpreter start and an ``import onnxruntime``
(0.1-0.3 s).

    >>> with OrtProbe() as probe:
    ...     [r.status for r in probe.check("model.onnx", (x,))]
    ['ok']
    >>> probe_onnx("model.onnx")[0].died
    False
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from amp_compiler.errors import OnnxError

__all__ = ["OrtProbe", "ProbeResult", "probe_onnx"]

# The child: reads one JSON request a line, answers one JSON line. Its fd 1 is moved to fd 2 at
# start so that nothing ONNX Runtime (or a library) prints can corrupt the answers.
_CHILD = r"""
import json, os, sys
answers = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
import numpy as np
import onnxruntime as ort
if "CUDAExecutionProvider" in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
    try:
        ort.preload_dlls()
    except Exception:
        pass
NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
         "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
         "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
answers.write(json.dumps({"providers": ort.get_available_providers()}) + "\n")
for line in sys.stdin:
    req = json.loads(line)
    print(f"probe: building a session for {req['path']} ({req['provider']})", file=sys.stderr, flush=True)
    try:
        providers = [req["provider"]] + (["CPUExecutionProvider"] if req["provider"] != "CPUExecutionProvider" else [])
        session = ort.InferenceSession(req["path"], providers=providers)
        metas = session.get_inputs()
        if req["inputs"] is not None:
            with np.load(req["inputs"]) as npz:
                arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        else:  # zeros, symbolic dimensions 1
            arrays = [np.zeros([d if isinstance(d, int) and d >= 0 else 1 for d in m.shape],
                               NUMPY.get(m.type, np.float32)) for m in metas]
        if len(arrays) != len(metas):
            raise ValueError(f"the model takes {len(metas)} inputs, {len(arrays)} were given")
        unfed = [m.type for m in metas if m.type not in NUMPY]
        if unfed:
            answers.write(json.dumps({"status": "ok", "message": f"built; not run (no numpy type for {unfed[0]})"}) + "\n")
            continue
        feeds = {m.name: (a.astype(NUMPY[m.type]) if a.dtype.kind == "f" else a) for m, a in zip(metas, arrays)}
        print("probe: running it", file=sys.stderr, flush=True)
        session.run(None, feeds)
        answers.write(json.dumps({"status": "ok", "message": "built and ran"}) + "\n")
    except Exception as exc:
        text = " ".join(str(exc).split())[:1000]
        answers.write(json.dumps({"status": "error", "message": f"{type(exc).__name__}: {text}"}) + "\n")
"""

DIED = ("crash", "exit", "timeout")
# A child's start (Python, numpy, onnxruntime; CUDA libraries) is not a check: a cold disk or a
# busy machine may take a while, and no file is being opened yet.
_START_SECONDS = 120.0


@dataclass(frozen=True)
class ProbeResult:
    """How one file fared in a child ONNX Runtime with one execution provider."""

    path: str
    provider: str
    status: str                  # "ok" | "error" | "crash" | "exit" | "timeout"
    message: str = ""
    signal: str | None = None    # "SIGSEGV" ... for a crash
    returncode: int | None = None

    @property
    def died(self) -> bool:
        """The child died or hung: in-process, this file would have done that to the caller."""
        return self.status in DIED

    def __str__(self) -> str:
        what = {"crash": f"killed by {self.signal}", "exit": f"exited with code {self.returncode}",
                "timeout": "no answer in time"}.get(self.status, self.status)
        tail = f": {self.message}" if self.message else ""
        return f"{self.path} ({self.provider}, default session options): {what}{tail}"


class OrtProbe:
    """A child ONNX Runtime that opens files for the caller (module docstring).

    Args:
        providers: execution providers to check each file with; None: CPUExecutionProvider, and
            CUDAExecutionProvider where the child's ONNX Runtime has it.
        timeout: seconds one check (session build and run) may take before it counts as hung
            (the child's own start may take up to two minutes more).
    """

    def __init__(self, providers: Sequence[str] | None = None, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self._wanted = list(providers) if providers is not None else None
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._stderr = None
        self._dir = tempfile.mkdtemp(prefix="amp_ort_probe_")
        self._count = 0
        self.providers: list[str] = []   # checked with, known once the child has started
        self.available: list[str] = []   # the child's ONNX Runtime's
        self.children = 0  # children started so far (one, plus one after each death)

    # -- the child ----------------------------------------------------------------------------

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile(dir=self._dir)
        self._proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        self.children += 1
        lines: queue.Queue = queue.Queue()
        self._lines = lines
        stdout = self._proc.stdout

        def read() -> None:  # a thread, so that a read can time out
            for line in stdout:
                lines.put(line)
            stdout.close()
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        hello = self._answer(max(self.timeout, _START_SECONDS))
        if not isinstance(hello, dict) or "providers" not in hello:
            if hello == "timeout":
                self._proc.kill()
            code = self._stop()
            raise OnnxError(f"the ONNX Runtime child process did not start (exit code {code}): "
                               f"{self._stderr_tail()}")
        self.available = hello["providers"]
        self.providers = self._wanted or ["CPUExecutionProvider"] + [
            p for p in ("CUDAExecutionProvider",) if p in self.available]

    def _answer(self, timeout: float):
        """The child's next answer (a dict), None when it died, "timeout" when it hung."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return "timeout"
        return None if line is None else json.loads(line)

    def _stop(self) -> int | None:
        """End the child (only ours, by its own handle); its return code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        return proc.returncode

    def _stderr_tail(self, limit: int = 1500) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace")
        self._stderr.close()
        self._stderr = None
        lines = [line for line in text.splitlines() if line.strip()]
        start = max((i for i, line in enumerate(lines) if line.startswith("probe: building")), default=0)
        return " | ".join(lines[start:])[-limit:]  # what this check printed: where it died

    # -- checks -------------------------------------------------------------------------------

    def check(self, model, inputs: Sequence[Any] | None = None) -> list[ProbeResult]:
        """Open ``model`` (a path, an ``onnx.ModelProto`` or its bytes) once per provider with
        default session options and run it once on ``inputs`` (tensors or arrays, positional;
        None: zeros of the declared shapes, symbolic dimensions 1). One result per provider."""
        path, written = self._as_path(model)
        feeds = None
        if inputs is not None:
            feeds = os.path.join(self._dir, f"inputs_{self._count}.npz")
            np.savez(feeds, *[_as_array(a) for a in inputs])
        try:
            if self._proc is None:
                self._start()
            return [self._ask(path, p, feeds) if p in self.available else
                    ProbeResult(path, p, "error", f"{p} is not available in this ONNX Runtime")
                    for p in list(self.providers)]
        finally:
            for temporary in (feeds, written):
                if temporary is not None:
                    os.unlink(temporary)

    def _ask(self, path: str, provider: str, feeds: str | None) -> ProbeResult:
        if self._proc is None:
            self._start()
        try:
            self._proc.stdin.write(json.dumps({"path": path, "provider": provider, "inputs": feeds}) + "\n")
            self._proc.stdin.flush()
        except OSError:
            pass  # it died: the answer says how
        answer = self._answer(self.timeout)
        if isinstance(answer, dict):
            return ProbeResult(path, provider, answer["status"], answer.get("message", ""))
        if answer == "timeout":
            self._proc.kill()
        code = self._stop()
        tail = self._stderr_tail()
        if answer == "timeout":
            return ProbeResult(path, provider, "timeout", f"over {self.timeout:g} s; {tail}", returncode=code)
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return ProbeResult(path, provider, "crash", tail, signal=name, returncode=code)
        return ProbeResult(path, provider, "exit", tail, returncode=code)

    def _as_path(self, model) -> tuple[str, str | None]:
        """(the path to open, the temporary file written for an in-memory model or None)."""
        self._count += 1
        if isinstance(model, (str, os.PathLike)):
            return os.path.abspath(os.fspath(model)), None
        data = model if isinstance(model, (bytes, bytearray)) else model.SerializeToString()
        path = os.path.join(self._dir, f"model_{self._count}.onnx")
        with open(path, "wb") as f:
            f.write(data)
        return path, path

    def close(self) -> None:
        """End the child and remove the probe's temporary files."""
        self._stop()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "OrtProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_array(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor; bfloat16 has no numpy type: float32 holds it exactly
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        return a.numpy()
    return np.asarray(a)


def probe_onnx(model, inputs: Sequence[Any] | None = None, *, providers: Sequence[str] | None = None,
               timeout: float = 120.0) -> list[ProbeResult]:
    """One-off ``OrtProbe(...).check(model, inputs)`` (a child process of its own)."""
    with OrtProbe(providers, timeout) as probe:
        return probe.check(model, inputs)
