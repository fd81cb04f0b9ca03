"""functionalize (amp_compiler/capture/functionalize.py): in-place and ``out=`` calls become
out-of-place nodes; writes into inputs and buffers are written back with ``aten.copy_`` (whose
source and destination are never cast); fx's capture-time writes into buffers are refused.

    pytest tests/test_functionalize.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import amp_compiler as ac
from amp_compiler.errors import TraceError
from amp_compiler.capture import build_dataflow, capture, symbolic_capture

from conftest import DTYPES, EPS, assert_unchanged, convert_via, rel_err, snapshot

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
FRONTENDS = ["fx", "export"]


def _writes(gm: fx.GraphModule) -> list[str]:
    """Calls left in the graph that write into a tensor (in-place or out=)."""
    names = []
    for n in gm.graph.nodes:
        if n.op not in ("call_method", "call_function"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if isinstance(n.target, torch._ops.OpOverload):
            name = n.target._overloadpacket.__name__
        if (name.endswith("_") and not name.startswith("_")) or n.kwargs.get("inplace") is True \
                or "out" in n.kwargs:
            names.append(f"{n.name}:{name}")
    return names



class _AllInPlace(nn.Module):
    """Every in-place spelling fx records, on values computed in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        z = torch.empty_like(x)
        torch.mul(x, 2, out=z)
        y = self.fc1(z)
        y.add_(1)
        y = F.relu_(y)
        y.sub_(0.5).mul_(3)
        y = self.act(y)
        torch.sigmoid_(y)
        y = F.leaky_relu(y, 0.1, True)  # inplace passed by position
        y.clamp_(max=0.9)
        return self.fc2(y)


def test_functionalize_leaves_no_writes_and_keeps_the_numbers():
    model = _AllInPlace().eval()
    gm = symbolic_capture(model)
    assert _writes(gm) == []
    gm.graph.lint()
    assert "empty_like" not in gm.code  # the out= buffer is gone with the out=
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_chain_converts_like_autocast(dtype, frontend):
    model = _AllInPlace().eval()
    with torch.no_grad():
        ref = model(X)
        with torch.autocast("cpu", dtype=dtype):
            theirs = rel_err(model(X), ref)
        amp = convert_via(frontend, model, (X,), dtype=dtype)
        out = amp(X)
    assert _writes(amp.graph_module) == []
    assert rel_err(out, ref) <= 1.1 * theirs + 4 * EPS[dtype]
    linears = [n for n, d in amp.plan.items() if d.kind == "linear"]
    assert len(linears) == 2 and all(amp.plan[n].precision == dtype for n in linears)


class _Pieces(nn.Module):
    """In-place on one piece of a chunk: the other piece is disjoint memory."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(8, 4)

    def forward(self, x):
        q, k = self.fc1(x).chunk(2, -1)
        q.mul_(2)
        return self.fc2(q + k)


class _ViewReadLater(nn.Module):
    """A view taken before the write and read after it sees the write (eager semantics)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc1(x)
        flat = y.view(-1)
        y.mul_(2)
        return self.fc2(flat.view(-1, 8))


@pytest.mark.parametrize("model_cls, copies", [(_Pieces, 0), (_ViewReadLater, 1)])
def test_functionalize_writes_back_only_where_another_view_reads(model_cls, copies):
    model = model_cls().eval()
    gm = symbolic_capture(model)
    assert _writes(gm) == ["copy__default:copy_"] * copies
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))
        amp = ac.convert(model, dtype="bfloat16")
        assert rel_err(amp(X), model(X)) < 16 * EPS[torch.bfloat16]


class _WritesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x.add_(self.fc(x))
        return self.fc(x)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_into_an_input_reaches_the_caller_in_its_dtype(dtype, frontend):
    model = _WritesInput().eval()
    x_ref, x_amp = X.clone(), X.clone()
    with torch.no_grad():
        ref = model(x_ref)
        amp = convert_via(frontend, model, (X.clone(),), dtype=dtype)
        out = amp(x_amp)
    (back,) = [n for n in amp.graph_module.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert not any(a.meta.get("amp_cast") for a in back.all_input_nodes)  # neither side cast
    assert x_amp.dtype == torch.float32
    assert not torch.equal(x_amp, X)  # the caller's tensor was written, as in eager
    assert rel_err(x_amp, x_ref) < 8 * EPS[dtype]
    assert rel_err(out, ref) < 16 * EPS[dtype]


class _RunningMean(nn.Module):
    """A buffer updated in forward (an exponential moving average)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)
        self.register_buffer("avg", torch.zeros(8))

    def forward(self, x):
        h = self.fc1(x)
        self.avg.add_(h.mean(0) - self.avg, alpha=0.1)
        return self.fc2(h - self.avg)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_buffer_update_in_training_accumulates_like_fp32(dtype, frontend):
    model = _RunningMean().train()
    twin = copy.deepcopy(model)
    amp = convert_via(frontend, model, (X,), dtype=dtype)
    assert torch.equal(model.avg, torch.zeros(8))  # capture itself wrote nothing
    for step in range(4):
        x = X + step
        out, ref = amp(x), twin(x)
    assert model.avg.dtype == torch.float32
    assert not torch.allclose(model.avg, torch.zeros(8))
    assert rel_err(model.avg, twin.avg) < 8 * EPS[dtype]
    assert rel_err(out, ref) < 16 * EPS[dtype]


class _WritesBufferOnConstants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("decay", torch.ones(8))

    def forward(self, x):
        self.decay.mul_(0.9)  # no traced value involved: fx would run it once, at capture
        return self.fc(x) * self.decay


def test_fx_refuses_a_buffer_write_it_would_run_at_capture_and_restores_the_buffer():
    model = _WritesBufferOnConstants().eval()
    snap = snapshot(model)
    with pytest.raises(TraceError) as info:
        ac.convert(model, dtype="bfloat16")
    assert_unchanged(model, snap)
    assert "`decay`" in str(info.value) and "example_inputs" in str(info.value)
    # torch.export records it: the decay happens on every call
    amp = ac.convert(model, (X,), dtype="bfloat16")
    with torch.no_grad():
        amp(X)
        amp(X)
    assert torch.allclose(model.decay, torch.full((8,), 0.81))


def test_export_buffer_copy_source_is_never_cast():
    """Any copy_ (export's buffer updates, our write-backs): its source is not a castable use."""
    model = _RunningMean().train()
    gm, _ = capture(model, (X,))
    graph = build_dataflow(gm)
    copies = [n.name for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert copies
    for name in copies:
        assert list(graph.float_inputs(name)) == []
