"""Property tests: random small DAG models of supported ops, converted every way, keep the
compiler's invariants.

A model is a list of op specs applied to a growing list of live tensors, each of shape
``(B, d)``; every op reads one or two live tensors of compatible width and appends its result.
Ops: linear, conv1d, conv2d (through view/reshape), matmul, softmax, layer_norm, exp, add, mul,
relu, gelu, cat, sum, mean, view/reshape. Each generated model is converted in float16 and
bfloat16, through fx and through torch.export, and checked for:

    P1  forward error vs fp32 within max(3 x autocast's error, 2 eps x #low-precision ops);
    P2  every node the plan decides fp32 computes in fp32 at run time and reads fp32 inputs --
        except promoting elementwise ops (insert_casts I7), which may read a low operand when
        another operand is fp32 (type promotion computes in fp32 anyway); low nodes compute low;
    P3  every cast changes its value's dtype; no value is cast twice to one dtype; no cast of a
        cast;
    P4  ``graph.lint()`` passes;
    P5  outputs keep the dtype the model returns;
    P6  the user's model is unchanged: state_dict and outputs bit for bit.

    pytest tests/test_properties.py
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import amp_compiler as ac
from amp_compiler.passes.insert_casts import PROMOTING

from conftest import DTYPES, EPS, rel_err, runtime_dtypes

B = 3
UNARY = ("linear", "conv1d", "conv2d", "softmax", "layer_norm", "exp", "relu", "gelu", "sum",
         "mean", "reshape")
BINARY = ("add", "mul", "matmul", "cat")
MAX_WIDTH = 24
SKIP_KINDS = ("input", "param", "const", "output", "non_float", "factory", "cast")


@st.composite
def programs(draw):
    """(input width, [(op, operand indices, extra)], output indices): a valid DAG."""
    width0 = draw(st.sampled_from([4, 6, 8]))
    widths = [width0]
    ops = []
    for _ in range(draw(st.integers(2, 9))):
        live = range(len(widths))
        op = draw(st.sampled_from(UNARY + BINARY))
        if op in BINARY:
            i = draw(st.sampled_from(live))
            partners = [j for j in live if widths[j] == widths[i]
                        or (op in ("add", "mul") and widths[j] == 1)]
            if op == "cat":
                partners = [j for j in live if widths[i] + widths[j] <= MAX_WIDTH]
            if not partners:
                op = "linear"
            else:
                j = draw(st.sampled_from(partners))
                ops.append((op, (i, j), None))
                widths.append(widths[i] + widths[j] if op == "cat" else widths[i])
                continue
        i = draw(st.sampled_from(live))
        w = widths[i]
        if op == "linear" or (op in ("conv1d", "conv2d") and 2 * w > MAX_WIDTH) \
                or (op == "conv2d" and w % 2) or (op == "reshape" and w % 2) or (op == "layer_norm" and w == 1):
            op = "linear"
            out = draw(st.sampled_from([1, 4, 8]) if w > 1 else st.sampled_from([4, 8]))
            ops.append(("linear", (i,), out))
            widths.append(out)
        elif op in ("conv1d", "conv2d"):
            ops.append((op, (i,), None))
            widths.append(2 * w)
        elif op in ("sum", "mean"):
            ops.append((op, (i,), None))
            widths.append(1)
        else:
            ops.append((op, (i,), None))
            widths.append(w)
    n = len(widths)
    outputs = (n - 1,) if draw(st.booleans()) else (n - 1, draw(st.sampled_from(range(1, n))))
    return width0, ops, outputs


class Program(nn.Module):
    """Runs a generated op list; the op list is static Python, so fx and export unroll it."""

    def __init__(self, width0: int, ops, outputs, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.ops, self.outputs = list(ops), tuple(outputs)
        widths = [width0]
        self.mods = nn.ModuleList()
        for op, args, extra in self.ops:
            w = widths[args[0]]
            if op == "linear":
                self.mods.append(nn.Linear(w, extra))
                widths.append(extra)
                continue
            if op == "conv1d":
                self.mods.append(nn.Conv1d(1, 2, 3, padding=1))
            elif op == "conv2d":
                self.mods.append(nn.Conv2d(1, 2, 3, padding=1))
            elif op == "layer_norm":
                self.mods.append(nn.LayerNorm(w))
            else:
                self.mods.append(nn.Identity())
            widths.append({"conv1d": 2 * w, "conv2d": 2 * w, "sum": 1, "mean": 1,
                           "cat": w + widths[args[-1]]}.get(op, w))

    def forward(self, x):
        live = [x]
        for (op, args, _), mod in zip(self.ops, self.mods):
            a = live[args[0]]
            b = live[args[1]] if len(args) > 1 else None
            if op in ("linear", "layer_norm"):
                y = mod(a)
            elif op == "conv1d":
                y = mod(a.view(a.shape[0], 1, -1)).reshape(a.shape[0], -1)
            elif op == "conv2d":
                y = mod(a.reshape(a.shape[0], 1, 2, -1)).view(a.shape[0], -1)
            elif op == "reshape":
                y = a.view(a.shape[0], -1, 2).reshape(a.shape[0], -1)
            elif op == "softmax":
                y = a.softmax(-1)
            elif op == "exp":
                y = torch.exp(a.clamp(max=4.0))  # bounded: any finite fp32 model is a fair test
            elif op == "relu":
                y = F.relu(a)
            elif op == "gelu":
                y = F.gelu(a)
            elif op == "sum":
                y = a.sum(-1, keepdim=True)
            elif op == "mean":
                y = a.mean(-1, keepdim=True)
            elif op == "add":
                y = a + b
            elif op == "mul":
                y = a * b
            elif op == "matmul":
                y = torch.matmul(torch.matmul(a, b.transpose(0, 1)), b) / a.shape[-1]
            else:  # cat
                y = torch.cat([a, b], dim=-1)
            live.append(y)
        outs = tuple(live[i] for i in self.outputs)
        return outs[0] if len(outs) == 1 else outs


def _flat(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def check_invariants(model: Program, x: torch.Tensor, dtype: torch.dtype, frontend: str,
                     training: bool) -> None:
    model.train(training)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = _flat(model(x))
        with torch.autocast("cpu", dtype=dtype):
            auto = _flat(model(x))
    amp = ac.convert(model, (x,) if frontend == "export" else None, dtype=dtype,
                     training=training, loss_scale=None)
    gm, plan = amp.graph_module, amp.plan

    gm.graph.lint()                                                                   # P4
    rec = runtime_dtypes(gm, x)
    with torch.no_grad():
        out = _flat(amp(x))

    # P5: outputs keep their dtype; P1: numbers
    assert [o.dtype for o in out] == [r.dtype for r in ref]
    n_low = sum(1 for d in plan.values() if d.precision == dtype and d.category not in SKIP_KINDS)
    for o, r, a in zip(out, ref, auto):
        ours, theirs = rel_err(o, r), rel_err(a, r)
        bound = max(3 * theirs, 2 * EPS[dtype] * max(n_low, 1))
        assert ours <= bound, f"error {ours:.3e} > {bound:.3e} (autocast {theirs:.3e}, {n_low} low ops)"

    # P2: plan precision is the runtime precision
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, d in plan.items():
        if name not in nodes or d.category in SKIP_KINDS or d.precision is None \
                or d.rule == "R0:passthrough" or not isinstance(rec.dtypes.get(name), torch.dtype):
            continue
        node = nodes[name]
        ins = [rec.dtypes[i.name] for i in node.all_input_nodes
               if isinstance(rec.dtypes.get(i.name), torch.dtype) and rec.dtypes[i.name].is_floating_point]
        assert rec.dtypes[name] == d.precision, f"{name} ({d.kind}, {d.rule}) ran in {rec.dtypes[name]}"
        if d.precision == torch.float32:
            promoted = d.kind in PROMOTING and torch.float32 in ins
            bad = [i for i in ins if i != torch.float32]
            assert not bad or promoted, f"fp32 node {name} ({d.kind}) read {ins}"

    # P3: casts
    casts = [n for n in gm.graph.nodes if n.meta.get("amp_cast")]
    for c in casts:
        src = c.args[0]
        assert not src.meta.get("amp_cast"), f"cast chain {src.name} -> {c.name}"
        have = rec.dtypes.get(src.name)
        if have is None and src.op == "get_attr":
            have = getattr(gm, str(src.target)) if "." not in str(src.target) else gm.get_parameter(str(src.target))
            have = have.dtype
        assert have != c.args[1], f"cast {c.name} keeps dtype {have}"
    keys = Counter((c.meta["amp_cast"]["source"], c.meta["amp_cast"]["dtype"]) for c in casts)
    assert max(keys.values(), default=1) == 1, f"value cast twice: {keys.most_common(1)}"

    # P6: the user's model is untouched
    after = model.state_dict()
    assert state.keys() == after.keys()
    for k, v in state.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    with torch.no_grad():
        again = _flat(model(x))
    assert all(torch.equal(a, r) for a, r in zip(again, ref))
    assert model.training == training


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=programs(), seed=st.integers(0, 2 ** 16), training=st.booleans())
def test_random_dags_keep_invariants(program, seed, training):
    width0, ops, outputs = program
    model = Program(width0, ops, outputs, seed)
    x = torch.randn(B, width0, generator=torch.Generator().manual_seed(seed))
    for dtype in DTYPES:
        for frontend in ("fx", "export"):
            check_invariants(model, x, dtype, frontend, training)
