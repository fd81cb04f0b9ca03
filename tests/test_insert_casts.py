"""insert_casts pass (rules I1-I7): the structure of the rewritten FX graph.

Structure is checked on the graph (cast nodes, their sources and users) and, where a dtype only
exists at run time, by running the graph node by node (``DtypeRecorder``) and looking at what
each cast actually received. Training-mode conversions are used where parameter casts matter
(eval mode folds them away).
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amp_compiler as ac
from amp_compiler.models import build

from conftest import (DTYPES, FRONTENDS, MODELS, cast_nodes, fetch, nodes_of, rel_err,
                      runtime_dtypes, train_record)

CASES = [(m, fe) for m in MODELS for fe in FRONTENDS[m]]
def _key(gm, node):
    """What a cast converts: a tensor object for parameters (tied names share it), else the node."""
    src = node.args[0]
    if src.op == "get_attr":
        return ("tensor", id(fetch(gm, src.target)))
    return ("node", src.name)


def _read(node):
    """The value a cast reads, seen through fp16 training's gradient unscaling (rule L4:
    ``unscale_grads(scale, w, b)[i]``), which is the identity forward."""
    name = getattr(node.target, "__name__", "")
    if name == "getitem" and getattr(node.args[0].target, "__name__", "") == "unscale_grads":
        return node.args[0].args[1 + node.args[1]]
    return node


@pytest.mark.parametrize("name, frontend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_graph_structure_of_every_reference_model(name, frontend, dtype):
    # training conversions, so that parameter casts are in the graph; export ones return the loss
    c = train_record(name, dtype, frontend)
    model, inputs, amp = c.model, c.inputs, c.amp
    gm = amp.graph_module
    gm.graph.lint()
    casts = cast_nodes(gm)
    # I2: at most one cast per (value, dtype), tied parameters included
    per_value = Counter((_key(gm, c), c.args[1]) for c in casts)
    assert max(per_value.values(), default=1) == 1, per_value
    # I3: no chains: a cast never reads a cast
    assert not [c for c in casts if c.args[0].meta.get("amp_cast")]
    # the meta agrees with the node, and every cast is recorded in amp.casts
    for c in casts:
        assert c.op == "call_method" and c.target == "to"
        assert c.meta["amp_cast"] == {"source": _read(c.args[0]).name, "dtype": c.args[1]}
    assert {c.name for c in casts} == {r.node for r in amp.casts}
    assert amp.cast_count() == len(casts)
    # run it: what did each cast receive?
    rec = runtime_dtypes(gm, *inputs)
    for c in casts:
        have = rec.dtypes[c.args[0].name]
        # I1: integer inputs (indices) and boolean masks are never cast
        assert isinstance(have, torch.dtype) and have.is_floating_point, (c.name, have)
        assert c.args[1].is_floating_point
    # I5: outputs come back in the dtype the model returns (logits, or the loss)
    with torch.no_grad():
        out, ref = amp(*inputs), model(*inputs)
    assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape


@pytest.mark.parametrize("name, frontend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_cast_to_the_dtype_a_value_already_has(name, frontend, dtype):
    c = train_record(name, dtype, frontend)
    inputs, amp = c.inputs, c.amp
    rec = runtime_dtypes(amp.graph_module, *inputs)
    same = [c.name for c in cast_nodes(amp.graph_module) if rec.dtypes[c.args[0].name] == c.args[1]]
    assert same == []


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) + x * 2.0


def test_an_fp32_op_reading_a_model_input_adds_no_cast_on_the_fx_path():
    amp = ac.convert(Residual().eval(), dtype="float16")
    x = torch.randn(4, 8)
    rec = runtime_dtypes(amp.graph_module, x)
    same = [c.name for c in cast_nodes(amp.graph_module) if rec.dtypes[c.args[0].name] == c.args[1]]
    assert same == []


def test_one_cast_per_value_and_dtype_however_many_consumers():
    class Fan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.a(x)
            # h feeds three low consumers and two fp32 ones (exp, and the output via sum)
            return self.b(h) + self.c(h) + self.a(h), torch.exp(h).sum()

    amp = ac.convert(Fan().train(), dtype="bfloat16", training=True)
    casts = cast_nodes(amp.graph_module)
    by_source = Counter((c.args[0].name, c.args[1]) for c in casts)
    assert by_source[("x", torch.bfloat16)] == 1
    assert by_source[("linear", torch.float32)] == 1  # exp's input, shared
    assert by_source[("a_weight", torch.bfloat16)] == 1  # a is used twice, cast once
    x_cast = next(c for c in casts if c.args[0].name == "x")
    assert len(x_cast.users) == 1
    # I4: each cast sits right before its first consumer
    for c in casts:
        first_user = min(c.users, key=lambda u: list(amp.graph_module.graph.nodes).index(u))
        assert c.next is first_user or c.next.meta.get("amp_cast") or c.next.op == "get_attr"


def test_tied_parameters_are_cast_once_in_gpt():
    c = train_record("gpt", torch.bfloat16, "export")
    model, amp = c.model, c.amp
    gm, wte = amp.graph_module, model.transformer.wte.weight
    assert model.lm_head.weight is wte
    of_wte = [c for c in cast_nodes(gm) if c.args[0].op == "get_attr" and fetch(gm, c.args[0].target) is wte]
    assert len(of_wte) == 1 and of_wte[0].args[1] == torch.bfloat16
    # the embedding lookup reads the fp32 tensor itself, the lm_head matmul the one cast
    emb = next(n for n in gm.graph.nodes if n.name == nodes_of(amp.plan, "embedding")[0])
    assert any(a.op == "get_attr" and fetch(gm, a.target) is wte for a in emb.all_input_nodes)
    users = {u.name for u in of_wte[0].users}
    assert users == {nodes_of(amp.plan, "linear")[-1]}


def test_tied_parameters_are_cast_once_on_the_fx_path():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.dec = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.dec(F.relu(self.enc(x)))

    model = Tied().train()
    amp = ac.convert(model, dtype="float16", training=True, loss_scale=None)
    gm = amp.graph_module
    weight_casts = [c for c in cast_nodes(gm) if c.args[0].op == "get_attr"]
    assert len(weight_casts) == 1
    assert fetch(gm, weight_casts[0].args[0].target) is model.enc.weight
    assert len(weight_casts[0].users) == 2
    x = torch.randn(3, 8)
    out = amp(x)
    out.sum().backward()
    assert model.enc.weight.grad is not None and model.enc.weight.grad.dtype == torch.float32


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("training", [False, True])
def test_batch_norm_statistics_are_never_cast(frontend, training):
    model, inputs = build("resnet", "tiny")
    model.train(training)
    amp = ac.convert(model, inputs if frontend == "export" else None, dtype="bfloat16",
                     training=training)
    gm = amp.graph_module
    stats = {id(b) for n, b in model.named_buffers() if "running" in n}
    for c in cast_nodes(gm):
        src = c.args[0]
        assert not (src.op == "get_attr" and id(fetch(gm, src.target)) in stats), c.name
    # the batch_norm calls receive the user's own fp32 buffers
    rec = runtime_dtypes(gm, *inputs)
    bns = [n for n in gm.graph.nodes if n.name in nodes_of(amp.plan, "batch_norm")]
    assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6
    for bn in bns:
        if bn.op == "call_module":  # a leaf: the module holds them
            mod = fetch(gm, bn.target)
            assert {id(mod.running_mean), id(mod.running_var)} <= stats
            assert mod.running_mean.dtype == mod.running_var.dtype == torch.float32
            continue
        getattrs = [a for a in bn.all_input_nodes if a.op == "get_attr"]
        seen = {id(fetch(gm, a.target)) for a in getattrs} & stats
        assert len(seen) == 2, bn.name
        assert all(rec.dtypes[a.name] == torch.float32 for a in getattrs)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_updates_the_shared_running_statistics(frontend, dtype):
    torch.manual_seed(0)
    model = BNNet().train()
    ref = copy.deepcopy(model)
    x = torch.randn(6, 3, 10, 10) * 2 + 0.5
    amp = ac.convert(model, (x,) if frontend == "export" else None, dtype=dtype, training=True,
                     loss_scale=None)
    for _ in range(2):
        amp(x)
        ref(x)
    moved = (ref.bn.running_mean - torch.zeros(8)).abs().max()
    assert moved > 0.02  # the statistics really moved
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean, rtol=tol, atol=tol * moved)
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var, rtol=tol, atol=tol)
    assert model.bn.running_mean.dtype == torch.float32


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("model_mode, training", [(True, False), (False, True)],
                         ids=["train-model-for-inference", "eval-model-for-training"])
def test_batch_norm_runs_in_the_mode_asked_for(frontend, model_mode, training):
    torch.manual_seed(0)
    model = BNNet().train(model_mode)
    with torch.no_grad():  # non-trivial statistics, so that the two modes differ
        model.bn.running_mean.fill_(0.3)
        model.bn.running_var.fill_(2.0)
    ref = copy.deepcopy(model).train(training)
    x = torch.randn(6, 3, 10, 10)
    stats = {k: v.clone() for k, v in model.named_buffers()}
    amp = ac.convert(model, (x,) if frontend == "export" else None, dtype="bfloat16",
                     training=training)
    out, expected = amp(x), ref(x)
    assert rel_err(out, expected) < 3e-2
    if not training:  # inference never touches the user's statistics
        for k, v in model.named_buffers():
            assert torch.equal(v, stats[k]), k
    assert model.training == model_mode


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_training_counts_batches_like_the_model(frontend):
    # resnet's BatchNorm2d subclass is traced through on the fx path (nn.BatchNorm2d is a leaf)
    model, inputs = build("resnet", "tiny")
    model.train()
    ref = copy.deepcopy(model)
    amp = ac.convert(model, inputs if frontend == "export" else None, dtype="bfloat16", training=True)
    assert int(model.bn1.num_batches_tracked) == 0
    for _ in range(2):
        amp(*inputs)
        ref(*inputs)
    assert int(model.bn1.num_batches_tracked) == int(ref.bn1.num_batches_tracked) == 2


class _Heads(nn.Module):
    """Three outputs: a matrix op (low in the plan), a deny op (fp32 in the plan), a user cast."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        return h, torch.exp(h), h.float()


@pytest.mark.parametrize("model_dtype", (torch.float32, *DTYPES), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fx_outputs_come_back_in_the_models_own_dtype(dtype, model_dtype):
    # I5 without recorded dtypes (fx): restored to the dtype of the model's parameters
    model = _Heads().to(model_dtype).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(model_dtype)
    amp = ac.convert(model, dtype=dtype)
    assert amp.plan["linear"].precision == dtype and amp.plan["exp"].precision == torch.float32
    with torch.no_grad():
        low, exp, user = amp(x)
        ref = model(x)
    assert [t.dtype for t in (low, exp, user)] == [t.dtype for t in ref] == [model_dtype] * 2 + [torch.float32]
    assert rel_err(exp, ref[1]) < 3e-2
    # one restore cast per output whose computed dtype differs from the model's; the user's
    # own .float() is honoured as written
    output = next(n for n in amp.graph_module.graph.nodes if n.op == "output")
    restores = {c.args[0].name: c.args[1] for c in cast_nodes(amp.graph_module) if output in c.users}
    want = {}
    if dtype != model_dtype:
        want["linear"] = model_dtype
    if model_dtype != torch.float32:
        want["exp"] = model_dtype
    assert restores == want


def test_model_float_dtype_is_the_dtype_of_most_parameter_elements():
    from amp_compiler.passes.insert_casts import model_float_dtype

    mixed = nn.Sequential(nn.Linear(16, 16).half(), nn.Linear(2, 1))  # a small fp32 head
    assert model_float_dtype(mixed) == torch.float16
    stats = nn.BatchNorm1d(4, affine=False).to(torch.bfloat16)  # buffers only
    assert model_float_dtype(stats) == torch.bfloat16
    assert model_float_dtype(nn.ReLU()) == torch.float32
    ids = nn.Embedding(4, 4).double()
    ids.register_buffer("scale", torch.ones(3, dtype=torch.float16))  # parameters decide
    assert model_float_dtype(ids) == torch.float64
