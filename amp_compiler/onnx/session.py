"""ONNX Runtime for our files: its providers, a session, and a converted file checked against torch.

``onnx_session`` opens a model on the CUDA provider where ONNX Runtime has it, else the CPU
one; ``verify_onnx`` runs a file and a torch module on the same inputs and reports the error of
every output. The session is built in this process: ``amp_compiler.onnx.check.probe_onnx``
opens a file in a child process first, for files that might crash ONNX Runtime.

    >>> verify_onnx("model.onnx", model, (x,))["max_rel"] < 1e-2
    True
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from torch.utils._pytree import tree_leaves

from amp_compiler.errors import OnnxError


def ort_providers() -> list[str]:
    """ONNX Runtime's execution providers, after letting onnxruntime-gpu find the CUDA
    libraries torch's wheels installed (``preload_dlls``; without it a CUDA session fails to
    load them)."""
    import onnxruntime as ort  # optional: exporting needs no ONNX Runtime

    if "CUDAExecutionProvider" in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 -- libraries missing: the CUDA session says so itself
            pass
    return ort.get_available_providers()


def onnx_session(path, providers: list[str] | None = None, *, quiet: bool = False):
    """An ``onnxruntime.InferenceSession``: CUDAExecutionProvider when ORT has it, else CPU.

    ``path`` may also be an ``onnx.ModelProto`` or serialized bytes. The session is built in this
    process: a file that crashes ONNX Runtime takes the process with it
    (``amp_compiler.onnx.check.probe_onnx`` opens a file in a child process first). ``quiet``:
    errors only in ONNX Runtime's log (not the CUDA provider's "nodes placed on the CPU" notes).

        >>> onnx_session("model.onnx").get_providers()[0]
        'CPUExecutionProvider'
    """
    import onnxruntime as ort  # optional: exporting needs no ONNX Runtime

    if providers is None:
        available = ort_providers()
        providers = [p for p in ("CUDAExecutionProvider",) if p in available] + ["CPUExecutionProvider"]
    source = path.SerializeToString() if isinstance(path, onnx.ModelProto) else (
        path if isinstance(path, (bytes, bytearray)) else os.fspath(path))
    options = ort.SessionOptions()
    if quiet:
        options.log_severity_level = 3
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # noqa: BLE001
        raise OnnxError(f"ONNX Runtime cannot load the model ({type(exc).__name__}: {exc})") from exc


_ORT_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _leaves(x) -> list:
    return [t for t in tree_leaves(x) if t is not None]


def verify_onnx(path, reference: torch.nn.Module, example_inputs, *, session=None) -> dict:
    """Run the ONNX file and ``reference`` on the same inputs; errors of each output.

    ``reference`` is any torch module (the fp32 model, or an AmpModule); one in training mode is
    run in eval mode and switched back. Floating inputs are given to ONNX Runtime in the dtype
    the file declares (float16 files made with ``keep_io_types=False`` included).

    Returns ``{"outputs": [{"name", "max_abs", "max_rel"}], "max_abs", "max_rel", "provider"}``,
    with relative error max|onnx - ref| / max|ref| (infinite when ONNX gives inf/nan where the
    reference is finite).

        >>> verify_onnx("model.onnx", model, (x,))["max_rel"]
        0.00031
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,)
    session = session or onnx_session(path)
    metas = session.get_inputs()
    arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
              for t in _leaves(example_inputs)]
    if len(arrays) != len(metas):
        raise OnnxError(f"the ONNX model takes {len(metas)} inputs, {len(arrays)} were given")
    feeds = {}
    for meta, a in zip(metas, arrays):
        want = _ORT_NUMPY.get(meta.type)
        feeds[meta.name] = a.astype(want) if want is not None and a.dtype.kind == "f" else a
    outputs = session.run(None, feeds)

    was_training = reference.training
    try:
        if was_training:
            reference.eval()
        with torch.no_grad():
            ref = _leaves(reference(*example_inputs))
    finally:
        if was_training:
            reference.train(True)
    if len(ref) != len(outputs):
        raise OnnxError(f"the ONNX model gives {len(outputs)} outputs, the reference {len(ref)}")
    rows = []
    for meta, got, want in zip(session.get_outputs(), outputs, ref):
        a = np.asarray(got, dtype=np.float64)
        b = want.detach().cpu().double().numpy()
        diff = np.abs(a - b)
        if diff.size == 0:
            max_abs = 0.0
        elif not np.all(np.isfinite(diff)[np.isfinite(b)]):
            max_abs = float("inf")
        else:
            max_abs = float(np.nanmax(diff))
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        rows.append({"name": meta.name, "max_abs": max_abs,
                     "max_rel": max_abs / scale if scale > 0 else max_abs})
    return {"outputs": rows, "max_abs": max(r["max_abs"] for r in rows),
            "max_rel": max(r["max_rel"] for r in rows), "provider": session.get_providers()[0]}
