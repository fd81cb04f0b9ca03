"""kernels: does this device have a low-precision kernel for an op kind? Probed, not assumed.

CPU kernels differ by machine and build: oneDNN's float16 LSTM needs AVX512-FP16 or AMX (an AMD
Zen 4 has neither and raises "could not create a primitive descriptor"), some float16 CPU
kernels exist only in newer torch releases. A plan must never put an op in a dtype the device
cannot run, so before painting, every probed kind the graph contains runs once, on tiny tensors,
in the low dtype, on the model's device, the way the rewritten graph would run it (rule C5 in
``classify``, pinned fp32 by rule R8 in ``propagate``). Results are cached per process and
(kind, device type, dtype); kinds without a probe (elementwise arithmetic, data movement) have
float16 and bfloat16 kernels on every device torch supports.

    >>> missing_kernel("rnn", "cpu", torch.float16)      # None: it ran
    >>> missing_kernel("rnn", "cpu", torch.float16)      # on a Zen 4 CPU without AVX512-FP16
    'RuntimeError: could not create a primitive descriptor for the LSTM forward ...'
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F


def _x(dtype, device, *shape):
    return torch.rand(*shape, dtype=dtype, device=device) - 0.5


def _rnn(dtype, device):
    # what insert_casts' rule I6 runs: the module's parameters and the input in the low dtype
    for cls in (torch.nn.LSTM, torch.nn.GRU):
        m = cls(4, 4, batch_first=True).to(device)
        params = {n: p.detach().to(dtype) for n, p in m.named_parameters()}
        torch.func.functional_call(m, params, (_x(dtype, device, 2, 3, 4),))


def _conv(dtype, device):
    F.conv2d(_x(dtype, device, 1, 2, 5, 5), _x(dtype, device, 3, 2, 3, 3), _x(dtype, device, 3))
    F.conv1d(_x(dtype, device, 1, 2, 5), _x(dtype, device, 3, 2, 3))


def _sdpa(dtype, device):
    q = _x(dtype, device, 1, 2, 4, 8)
    F.scaled_dot_product_attention(q, q, q, is_causal=True)
    F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool, device=device))


def _batch_norm(dtype, device):
    x = _x(dtype, device, 2, 3, 4, 4)
    stats = torch.ones(3, device=device)  # fp32 statistics and affine parameters (CAST_ONLY_ARGS)
    F.batch_norm(x, stats * 0, stats, stats, stats, training=False)
    F.batch_norm(x, stats * 0, stats.clone(), stats, stats, training=True)


# kind -> a call that exercises its low-precision kernels; source: ours (the kinds whose CPU
# kernels have been seen to vary by machine or torch release, and the matrix-unit kinds)
PROBES: dict[str, Callable[[torch.dtype, str], object]] = {
    "linear": lambda dt, dev: F.linear(_x(dt, dev, 3, 4), _x(dt, dev, 5, 4), _x(dt, dev, 5)),
    "matmul": lambda dt, dev: torch.bmm(_x(dt, dev, 2, 3, 4), _x(dt, dev, 2, 4, 5)),
    "conv": _conv,
    "sdpa": _sdpa,
    "rnn": _rnn,
    "layer_norm": lambda dt, dev: F.layer_norm(_x(dt, dev, 3, 8), (8,), _x(dt, dev, 8), _x(dt, dev, 8)),
    "group_norm": lambda dt, dev: F.group_norm(_x(dt, dev, 2, 4, 3), 2, _x(dt, dev, 4), _x(dt, dev, 4)),
    "rms_norm": lambda dt, dev: torch.rms_norm(_x(dt, dev, 3, 8), (8,), _x(dt, dev, 8)),
    "batch_norm": _batch_norm,
    "instance_norm": lambda dt, dev: F.instance_norm(_x(dt, dev, 2, 3, 4)),
    "softmax": lambda dt, dev: torch.softmax(_x(dt, dev, 3, 8), -1),
    "log_softmax": lambda dt, dev: torch.log_softmax(_x(dt, dev, 3, 8), -1),
    "avg_pool": lambda dt, dev: F.adaptive_avg_pool2d(F.avg_pool2d(_x(dt, dev, 1, 2, 4, 4), 2), 1),
    "max_pool": lambda dt, dev: F.max_pool2d(_x(dt, dev, 1, 2, 4, 4), 2),
    "interpolate": lambda dt, dev: F.interpolate(_x(dt, dev, 1, 2, 4, 4), scale_factor=2.0, mode="bilinear"),
}


@functools.lru_cache(maxsize=None)
def missing_kernel(kind: str, device_type: str, dtype: torch.dtype) -> str | None:
    """None when ``kind`` runs in ``dtype`` on ``device_type`` (or has no probe), else the error
    the probe raised, one line."""
    probe = PROBES.get(kind)
    if probe is None:
        return None
    if device_type == "cuda" and not torch.cuda.is_available():
        return None  # planning for a device this process cannot reach: nothing to learn here
    try:
        with torch.no_grad():
            probe(dtype, device_type)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {first[:160]}"
    return None
