"""Shared helpers for the compiler tests: the error metric, graph inspection, model snapshots,
and a per-session cache of eval-mode conversions of the reference models.

Conversions through ``torch.export`` cost about a second each, and several test files look at
the same ones (numbers in test_convert, tables in test_golden): the cache builds each
(model, dtype, front end) once. Tests that mutate a converted module (``freeze()``, ``train()``,
backward) convert their own instead.

    >>> model, inputs, amp = eval_conversion("mlp", torch.bfloat16, "fx")
    >>> rel_err(amp(*inputs), model(*inputs)) < 1e-2
    True

ONNX files are opened in a child ONNX Runtime first (``ort_no_crash``) before any test opens them
in-process: a file that crashes ONNX Runtime would otherwise end the whole pytest process.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

# One intra-op thread per process: the tiny models gain nothing from a second thread, and on a
# 2-core CI runner two OpenMP threads spin against any other load (measured on 2 cores with
# other work running: the 200-step fp32 gpt run once took 110 s instead of 2 s; four heavy test
# files 91 s with one thread against 130-173 s with two). The variable also reaches the CLI
# subprocesses and the distributed test's workers; an explicit OMP_NUM_THREADS is honoured.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import torch.fx as fx
from torch import nn

import amp_compiler as ac
from amp_compiler.models import build

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

DTYPES = (torch.float16, torch.bfloat16)
MODELS = ("mlp", "mlp_wide", "resnet", "gpt", "bert", "lstm", "mf")
# gpt builds its causal mask from a traced size: only torch.export captures it (by design)
FRONTENDS = {name: ("export",) if name == "gpt" else ("fx", "export") for name in MODELS}
LOW_KINDS = frozenset({"linear", "matmul", "conv", "rnn"})
# kinds that must stay fp32 wherever they appear (policy DENY entries the models contain)
FP32_KINDS = frozenset({"exp", "log", "pow", "sum", "cross_entropy", "nll_loss", "bce_with_logits"})


# Machine epsilon of each low dtype: tolerances are written as multiples of it.
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


# Where torch.autocast cannot run a model on this machine (oneDNN's float16 LSTM needs
# AVX512-FP16 or AMX), the comparison with autocast becomes one with fp32: the error must stay
# under this many machine epsilons of the low dtype (the reference models measure 0.9 eps and
# less, tests/test_convert.py prints them).
FP32_BOUND_EPS = 8


def autocast_error_or_skip(ours: float, fn: Callable[[], torch.Tensor], dtype: torch.dtype,
                           ref: torch.Tensor, *, device_type: str = "cpu") -> float:
    """torch.autocast's error against ``ref`` on ``fn()``. Where autocast cannot run on this
    machine, asserts ``ours`` against fp32 instead (``FP32_BOUND_EPS`` epsilons) and skips the
    autocast comparison, the reason in the skip message."""
    import pytest
    from amp_compiler.reference import ReferenceUnavailable, autocast_run

    try:
        with torch.no_grad():
            return rel_err(autocast_run(fn, device_type, dtype), ref)
    except ReferenceUnavailable as exc:
        bound = FP32_BOUND_EPS * EPS[dtype]
        assert ours <= bound, f"error vs fp32 {ours:.3e} > {FP32_BOUND_EPS} eps ({bound:.3e}); {exc}"
        pytest.skip(f"{exc} -- compared with fp32 instead: error {ours:.2e} <= "
                    f"{FP32_BOUND_EPS} eps = {bound:.2e}")


def assert_within_autocast(model: nn.Module, amp, *inputs, dtype: torch.dtype,
                           floor_eps: float = 2) -> float:
    """amp's error against fp32 on ``inputs`` is at most 1.1x torch.autocast's (the design's
    target), or ``floor_eps`` machine epsilons where both are at rounding level. Returns it."""
    with torch.no_grad():
        ref, out = model(*inputs), amp(*inputs)
    ours = rel_err(out, ref)
    theirs = autocast_error_or_skip(ours, lambda: model(*inputs), dtype, ref)
    assert ours <= max(1.1 * theirs, floor_eps * EPS[dtype]), (ours, theirs)
    return ours


def convert_via(frontend: str, model: nn.Module, inputs: tuple, **kw):
    """``convert()`` through one front end: torch.export with ``inputs``, fx tracing without."""
    return ac.convert(model, inputs if frontend == "export" else None, **kw)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The project's relative error: max|out - ref| / max|ref|, computed in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def cast_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The casts insert_casts added (``call_method to`` nodes tagged ``amp_cast``)."""
    return [n for n in gm.graph.nodes if n.meta.get("amp_cast")]


def nodes_of(plan, *kinds: str) -> list[str]:
    """Names of the plan's nodes whose kind is one of ``kinds``."""
    return [n for n, d in plan.items() if d.kind in kinds]


def fetch(root: nn.Module, target: str):
    obj = root
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


class DtypeRecorder(fx.Interpreter):
    """Runs a GraphModule node by node and records each node's runtime output dtype.

    Tensors record their dtype; tuples record a tuple of dtypes; anything else records None.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.dtypes: dict[str, object] = {}
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.values[n.name] = out
        if isinstance(out, torch.Tensor):
            self.dtypes[n.name] = out.dtype
        elif isinstance(out, (tuple, list)):
            self.dtypes[n.name] = tuple(o.dtype if isinstance(o, torch.Tensor) else None for o in out)
        else:
            self.dtypes[n.name] = None
        return out


def runtime_dtypes(gm: fx.GraphModule, *inputs) -> DtypeRecorder:
    rec = DtypeRecorder(gm)
    with torch.no_grad():
        rec.run(*inputs)
    return rec


def snapshot(model: nn.Module) -> dict:
    """Everything convert() promises not to touch: state (bit for bit), dtypes, modes, identity."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": {k: (id(p), p.dtype, p.requires_grad) for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    state = model.state_dict(keep_vars=True)
    assert state.keys() == snap["state"].keys()
    for k, before in snap["state"].items():
        now = state[k]
        assert now.dtype == before.dtype, f"{k}: dtype {before.dtype} -> {now.dtype}"
        assert torch.equal(now.detach(), before), f"{k} changed"
    assert {k: (id(p), p.dtype, p.requires_grad) for k, p in model.named_parameters()} == snap["params"]
    assert {k: m.training for k, m in model.named_modules()} == snap["training"]


def loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss each reference model computes itself when given targets."""
    import torch.nn.functional as F

    if name == "mf":
        return F.binary_cross_entropy_with_logits
    if name == "gpt":
        return lambda logits, t: F.cross_entropy(logits.view(-1, logits.size(-1)), t.view(-1))
    return F.cross_entropy


@dataclass
class Conversion:
    """A converted reference model plus what the model looked like just before convert()."""

    model: nn.Module
    inputs: tuple            # what amp and model are called with
    amp: "ac.AmpModule"
    targets: torch.Tensor | None = None
    ref: torch.Tensor | None = None          # model(*inputs) before convert (eval only)
    unchanged_error: str | None = None       # assert_unchanged() right after convert()


def _check_unchanged(model: nn.Module, snap: dict) -> str | None:
    try:
        assert_unchanged(model, snap)
    except AssertionError as exc:
        return str(exc) or "changed"
    return None


@functools.lru_cache(maxsize=None)
def eval_conversion(name: str, dtype: torch.dtype, frontend: str):
    """(model, inputs, amp) for a tiny reference model converted in eval mode; cached per session.

    Callers must not mutate the returned objects (no freeze/train/backward).
    """
    c = eval_record(name, dtype, frontend)
    return c.model, c.inputs, c.amp


@functools.lru_cache(maxsize=None)
def eval_record(name: str, dtype: torch.dtype, frontend: str) -> Conversion:
    model, inputs = build(name, "tiny")
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    snap = snapshot(model)
    amp = ac.convert(model, inputs if frontend == "export" else None, dtype=dtype)
    return Conversion(model, inputs, amp, ref=ref, unchanged_error=_check_unchanged(model, snap))


@functools.lru_cache(maxsize=None)
def train_record(name: str, dtype: torch.dtype, frontend: str) -> Conversion:
    """A training conversion (default loss scaling) of a tiny reference model in train mode.

    torch.export captures the loss branch (targets given); fx specialises ``targets=None`` and
    captures the logits, so the caller computes the loss. Tests may run forward/backward on it
    (zero the grads first); the unchanged check is taken right after convert().
    """
    model, inputs = build(name, "tiny", with_targets=True)
    model.train()
    args, targets = tuple(inputs[:-1]), inputs[-1]
    snap = snapshot(model)
    if frontend == "export":
        amp = ac.convert(model, tuple(inputs), dtype=dtype, training=True)
        return Conversion(model, tuple(inputs), amp, targets=None,
                          unchanged_error=_check_unchanged(model, snap))
    amp = ac.convert(model, dtype=dtype, training=True)
    return Conversion(model, args, amp, targets=targets, unchanged_error=_check_unchanged(model, snap))


# -- ONNX Runtime in a child process ----------------------------------------------------------------

@pytest.fixture(scope="session")
def _ort_probe():
    """One child ONNX Runtime for the whole session (started on first use): a check costs a
    session build and a run, not a Python start and an ``import onnxruntime``."""
    from amp_compiler.onnx.check import OrtProbe

    with OrtProbe() as probe:
        yield probe


def no_crash_check(probe):
    """The ``check`` that ``ort_no_crash`` hands a test, on ``probe`` (an ``OrtProbe``)."""
    def check(model, inputs=None):
        results = probe.check(model, inputs)
        died = [r for r in results if r.died]
        if died:
            pytest.fail("ONNX Runtime would take the process down opening this file: "
                        + "; ".join(str(r) for r in died), pytrace=False)
        return results

    return check


@pytest.fixture
def ort_no_crash(_ort_probe):
    """``check(model_or_path, inputs=None)``: open an ONNX file (path, ModelProto or bytes) in the
    child with default session options (CPU, and CUDA where ONNX Runtime has it) and run it once
    on ``inputs``. A child killed by a signal, dead or hung fails the test, the signal named;
    ONNX Runtime refusing the file does not (the results say so, for the test to judge).
    Call it right after writing a file, before anything opens that file in-process."""
    return no_crash_check(_ort_probe)
