"""The torch.autocast reference run, told apart from a device that lacks autocast's kernels.

Tests, the demo and the CLI compare amp_compiler with ``torch.autocast`` on the same input. On
some CPUs autocast itself cannot run a model: oneDNN's float16 LSTM needs AVX512-FP16 or AMX
(an AMD Zen 4 has neither), and CPU builds miss some float16 kernels. That is a fact about the
machine, not a defect of the model or of ours: ``autocast_run`` raises ``ReferenceUnavailable``
with the reason, and callers compare with fp32 instead. Any other error propagates unchanged.

    >>> try:
    ...     out = autocast_run(lambda: model(x), "cpu", torch.float16)
    ... except ReferenceUnavailable as exc:
    ...     print(exc)   # torch.autocast(cpu, float16) cannot run here: RuntimeError: could not ...
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from amp_compiler.errors import AmpCompilerError

# What torch and oneDNN say when a kernel for a dtype does not exist on this machine or build.
# Source: oneDNN's primitive-descriptor failure (fp16 LSTM without AVX512-FP16/AMX) and ATen's
# dispatch messages (`"addmm_impl_cpu_" not implemented for 'Half'`, "Unsupported dtype Half").
NO_KERNEL_MESSAGES = (
    "could not create a primitive descriptor",
    "not implemented for 'Half'",
    "not implemented for 'BFloat16'",
    "Unsupported dtype Half",
    "Unsupported dtype BFloat16",
)


class ReferenceUnavailable(AmpCompilerError):
    """torch.autocast cannot run this model on this device (a kernel is missing here)."""


def is_missing_kernel(exc: BaseException) -> bool:
    """True when ``exc`` says a kernel for a dtype does not exist on this machine or build."""
    return isinstance(exc, (RuntimeError, NotImplementedError)) and any(
        m in str(exc) for m in NO_KERNEL_MESSAGES)


def autocast_run(fn: Callable[[], Any], device_type: str, dtype: torch.dtype) -> Any:
    """``fn()`` under ``torch.autocast(device_type, dtype)``; ``ReferenceUnavailable`` when the
    device has no kernel for an op autocast picked."""
    try:
        with torch.autocast(device_type, dtype=dtype):
            return fn()
    except Exception as exc:  # noqa: BLE001 -- sorted below; anything else propagates
        if not is_missing_kernel(exc):
            raise
        first = str(exc).splitlines()[0][:200]
        raise ReferenceUnavailable(
            f"torch.autocast({device_type}, {str(dtype).replace('torch.', '')}) cannot run this "
            f"model on this machine: {type(exc).__name__}: {first}") from exc
