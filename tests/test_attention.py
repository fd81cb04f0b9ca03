"""Tests for passes/attention.py: explicit attention -> one scaled_dot_product_attention node.

Each pattern variant is checked on both graph flavours (torch-level fx, aten-level export):
structure (one sdpa node, the softmax and the mask's ones/tril/eq gone, impure nodes kept),
the returned AttentionMatch, and numbers against the un-rewritten graph (fp32, bf16, fp16,
gradients). Near-misses must leave the graph exactly as it was. The last tests run the
precision pipeline by hand (capture -> rewrite -> dataflow -> classify -> propagate ->
insert_casts) on the gpt and bert reference models in bf16 against fp32.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from amp_compiler.capture import build_dataflow, capture
from amp_compiler.models import build
from amp_compiler.passes.attention import AttentionMatch, rewrite_attention
from amp_compiler.passes.classify import classify
from amp_compiler.passes.insert_casts import insert_casts
from amp_compiler.passes.policy import policy_for
from amp_compiler.passes.propagate import propagate

C, NH, T, B = 32, 4, 8, 3
HD = C // NH
SDPA_TARGETS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


class Attn(nn.Module):
    """One self-attention layer whose every step can be spelled several ways (see forward)."""

    def __init__(self, *, scale: str = "mul_after", mask: str = "fill_buffer", kt: str = "t-2-1",
                 softmax: str = "F", p: float = 0.0, extra: str = "") -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.proj = nn.Linear(C, C)
        self.drop = nn.Dropout(p)
        self.sm = nn.Softmax(dim=-1)
        self.cfg = dict(scale=scale, mask=mask, kt=kt, softmax=softmax, extra=extra)
        self.register_buffer("tril", torch.tril(torch.ones(T, T)))
        self.register_buffer("causal_add", torch.full((T, T), float("-inf")).triu(1))
        self.register_buffer("scale_t", torch.tensor(HD ** -0.5))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (NH, HD)).transpose(1, 2)

    def forward(self, x: torch.Tensor, pad: torch.Tensor):
        cfg = self.cfg
        q, v = self._heads(self.q(x)), self._heads(self.v(x))
        if cfg["kt"] == "pre":  # the key computed already transposed, (B, nh, hd, T)
            kt = self.k(x).unflatten(-1, (NH, HD)).permute(0, 2, 3, 1)
        else:
            k = self._heads(self.k(x))
            if cfg["scale"] == "split":
                q, k = q * HD ** -0.25, k * HD ** -0.25
            if cfg["scale"] == "div_k":
                k = k / math.sqrt(HD)
            kt = {"t-2-1": lambda: k.transpose(-2, -1), "t-1-2": lambda: k.transpose(-1, -2),
                  "t23": lambda: k.transpose(2, 3), "permute": lambda: k.permute(0, 1, 3, 2),
                  }[cfg["kt"]]()
        if cfg["scale"] == "mul_q":
            q = q * (1.0 / math.sqrt(HD))
        att = q @ kt
        if cfg["scale"] == "mul_after":
            att = att * (1.0 / math.sqrt(HD))
        elif cfg["scale"] == "rmul_after":
            att = 0.1 * att
        elif cfg["scale"] == "div_after":
            att = att / math.sqrt(HD)
        elif cfg["scale"] == "tensor":
            att = att * self.scale_t
        mask = cfg["mask"]
        if mask == "fill_buffer":
            att = att.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        elif mask == "fill_ones":
            att = att.masked_fill(torch.ones(T, T, device=x.device).tril() == 0, float("-inf"))
        elif mask == "add_causal":
            att = att + self.causal_add
        elif mask == "padding":
            att = att + pad
        elif mask == "fill_anticausal":
            att = att.masked_fill(self.tril.t() == 0, float("-inf"))
        elif mask == "fill_finite":
            att = att.masked_fill(self.tril[:T, :T] == 0, -1e4)
        elif mask == "fill_runtime":
            att = att.masked_fill(pad == 0, float("-inf"))
        if cfg["scale"] == "after_mask":
            att = att * 0.5
        if cfg["extra"] == "scores_twice":
            att = att + att.mean(-1, keepdim=True)
        sm = cfg["softmax"]
        probs = {"F": lambda: F.softmax(att, dim=-1), "torch": lambda: torch.softmax(att, -1),
                 "method": lambda: att.softmax(-1), "dim3": lambda: att.softmax(dim=3),
                 "dim2": lambda: att.softmax(dim=2), "module": lambda: self.sm(att)}[sm]()
        y = self.drop(probs) @ v
        out = self.proj(y.transpose(1, 2).flatten(2))
        if cfg["extra"] == "return_probs":
            return out, probs
        return out


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g).to(dtype)
    pad = torch.zeros(B, 1, 1, T)
    pad[1, ..., T - 3:] = -10000.0  # the second sequence's last 3 keys are padding
    return x, pad.to(dtype)


def make(flavour: str, model: nn.Module, ex: tuple) -> fx.GraphModule:
    """'fx': the front end's tracer; 'plain': torch.fx.symbolic_trace; 'export': torch.export."""
    if flavour == "plain":
        return fx.symbolic_trace(model)
    gm, source = capture(model, ex if flavour == "export" else None)
    assert source == ("export" if flavour == "export" else "fx")
    return gm


def first(out):
    return out[0] if isinstance(out, tuple) else out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def assert_grads_close(got: dict, want: dict, tol: float) -> None:
    """Every gradient within ``tol`` of the largest one: the key bias's gradient is zero up to
    rounding (softmax ignores a per-row constant), so its own relative error is noise."""
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        err = (got[name] - want[name]).abs().max().item() / scale
        assert err < tol, (name, err)


def sdpa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def op_names(gm: fx.GraphModule) -> set[str]:
    names = set()
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            t = n.target
            names.add(t if isinstance(t, str) else getattr(t, "__name__", str(t)).split(".")[0])
    return names


def rewritten(flavour: str, model: nn.Module, ex: tuple):
    """(original gm, rewritten gm, matches), both captured from ``model``."""
    gm = make(flavour, model, ex)
    ref = copy.deepcopy(gm)
    return ref, gm, rewrite_attention(gm).facts


class Zoo(nn.Module):
    """Attention layers in sequence, one per variant: one capture covers many variants."""

    def __init__(self, layers: list[Attn]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, pad: torch.Tensor):
        extras = []
        for layer in self.layers:
            x = layer(x, pad)
            if isinstance(x, tuple):
                x, probs = x
                extras.append(probs)
        return (x, *extras) if extras else x


def zoo(configs: list[dict], *, seed: int = 0) -> Zoo:
    torch.manual_seed(seed)
    return Zoo([Attn(**cfg) for cfg in configs])


# name: (Attn kwargs, causal, has_mask, scale on fx graphs, scale on export graphs); export
# graphs record q's last size, so SDPA's default 1/sqrt(hd) is left implicit there (A5)
DEFAULT = 1 / math.sqrt(HD)
VARIANTS = {
    "nanogpt_buffer": (dict(), True, False, DEFAULT, None),
    "ones_tril": (dict(mask="fill_ones"), True, False, DEFAULT, None),
    "div_after": (dict(scale="div_after"), True, False, DEFAULT, None),
    "rmul_custom_scale": (dict(scale="rmul_after"), True, False, 0.1, 0.1),
    "mul_q_before": (dict(scale="mul_q", kt="t-1-2"), True, False, DEFAULT, None),
    "div_k_before": (dict(scale="div_k"), True, False, DEFAULT, None),
    "split_q_k": (dict(scale="split"), True, False, DEFAULT, None),
    "no_scale": (dict(scale="none"), True, False, 1.0, 1.0),
    "scale_after_mask": (dict(scale="after_mask"), True, False, 0.5, 0.5),
    "additive_causal": (dict(mask="add_causal", softmax="torch"), True, False, DEFAULT, None),
    "padding_mask": (dict(mask="padding", softmax="method", scale="div_after"), False, True,
                     DEFAULT, None),
    "no_mask": (dict(mask="none"), False, False, DEFAULT, None),
    "transpose_2_3": (dict(kt="t23"), True, False, DEFAULT, None),
    "permute": (dict(kt="permute"), True, False, DEFAULT, None),
    "key_pre_transposed": (dict(kt="pre"), True, False, DEFAULT, None),
    "softmax_module": (dict(softmax="module"), True, False, DEFAULT, None),
}

NEAR_MISSES = {
    "softmax_dim2": dict(softmax="dim2"),                 # softmax over another axis
    "anticausal_fill": dict(mask="fill_anticausal"),      # a masked_fill mask that is not causal
    "finite_fill": dict(mask="fill_finite"),              # causal positions filled with -1e4
    "runtime_fill": dict(mask="fill_runtime"),            # a masked_fill mask known at run time
    "tensor_scale": dict(scale="tensor"),                 # scores scaled by a tensor
    "probs_returned": dict(extra="return_probs"),         # the probabilities are an output
    "scores_read_twice": dict(extra="scores_twice"),      # the scores have a second user
    "scale_after_additive": dict(mask="padding", scale="after_mask"),  # would scale the mask
}


@pytest.fixture(scope="module", params=["fx", "export"])
def variant_graphs(request):
    """Every variant in one Zoo, captured in one flavour, before and after the rewrite."""
    model = zoo([VARIANTS[name][0] for name in VARIANTS]).eval()
    ex = inputs()
    ref, gm, matches = rewritten(request.param, model, ex)
    return request.param, ref, gm, matches, ex


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_is_matched(variant_graphs, variant):
    flavour, ref, gm, matches, _ = variant_graphs
    assert len(matches) == len(VARIANTS)  # one per layer, in graph (= layer) order
    m = matches[list(VARIANTS).index(variant)]
    _, causal, has_mask, fx_scale, export_scale = VARIANTS[variant]
    assert isinstance(m, AttentionMatch)
    assert (m.causal, m.has_mask, m.dropout_p) == (causal, has_mask, 0.0)
    expected_scale = fx_scale if flavour == "fx" else export_scale
    if expected_scale is None:
        assert m.scale is None
    else:
        assert m.scale == pytest.approx(expected_scale, rel=1e-12)
    node = next(n for n in gm.graph.nodes if n.name == m.sdpa_node)
    assert node.target in SDPA_TARGETS and m.sdpa_node.startswith("softmax")
    assert node.kwargs.get("is_causal", False) is causal
    assert ("attn_mask" in node.kwargs) is has_mask
    assert node.kwargs.get("scale") == m.scale
    # the pattern's nodes are gone, the new node took the softmax's name
    live = {n.name for n in gm.graph.nodes}
    assert not (set(m.matched_nodes) - {m.sdpa_node}) & live
    roles = [next(n for n in ref.graph.nodes if n.name == name) for name in m.matched_nodes]
    assert sum("softmax" in str(n.target).lower() or n.op == "call_module" for n in roles) == 1


def test_variants_compute_the_same(variant_graphs):
    flavour, ref, gm, matches, ex = variant_graphs
    assert len(sdpa_nodes(gm)) == len(VARIANTS)
    # no softmax, masked_fill, mask builders or explicit matmuls are left anywhere
    assert not {"softmax", "masked_fill", "tril", "eq", "ones", "matmul"} & op_names(gm)
    assert not any(n.op == "call_module" and n.target.endswith(".sm") for n in gm.graph.nodes)
    # impure nodes outside the patterns (export's guards call) are kept
    matched = {name for m in matches for name in m.matched_nodes}
    impure = [n.name for n in ref.graph.nodes
              if n.op != "output" and n.is_impure() and n.name not in matched]
    assert impure or flavour == "fx"
    assert set(impure) <= {n.name for n in gm.graph.nodes}
    assert rel_err(gm(*ex), ref(*ex)) < 1e-5


@pytest.mark.parametrize("flavour", ["fx", "plain", "export"])
def test_near_misses_are_left_alone(flavour):
    model = zoo(list(NEAR_MISSES.values())).eval()
    gm = make(flavour, model, inputs())
    before = gm.code
    matches = rewrite_attention(gm).facts
    assert matches == [], [m.matched_nodes for m in matches]
    assert gm.code == before
    assert not sdpa_nodes(gm)


def test_softmax_dim3_needs_a_recorded_rank():
    """dim=3 is the last axis only when the rank is known: export records it, fx does not."""
    torch.manual_seed(0)
    model = Attn(softmax="dim3").eval()
    ex = inputs()
    assert rewrite_attention(make("fx", model, ex)).facts == []
    ref, gm, matches = rewritten("export", model, ex)
    assert len(matches) == 1 and matches[0].causal
    assert rel_err(gm(*ex), ref(*ex)) < 1e-6


def test_plain_symbolic_trace_with_module_leaves():
    """fx.symbolic_trace keeps nn.Softmax / nn.Dropout as call_module nodes."""
    torch.manual_seed(0)
    model = Attn(softmax="module", p=0.0).eval()
    ex = inputs()
    ref, gm, matches = rewritten("plain", model, ex)
    assert [(m.causal, m.dropout_p) for m in matches] == [(True, 0.0)]
    assert not any(n.op == "call_module" and n.target in ("sm", "drop") for n in gm.graph.nodes)
    assert rel_err(gm(*ex), ref(*ex)) < 1e-6
    # an nn.Dropout module with p > 0 reads its training flag at run time: not matched
    model = Attn(p=0.2).train()
    assert rewrite_attention(fx.symbolic_trace(model)).facts == []


@pytest.mark.parametrize("flavour", ["fx", "export"])
def test_dropout_in_training_moves_into_sdpa(flavour):
    torch.manual_seed(0)
    model = Attn(p=0.3).train()
    ex = inputs()
    ref, gm, matches = rewritten(flavour, model, ex)
    assert [(m.causal, m.dropout_p) for m in matches] == [(True, 0.3)]
    (node,) = sdpa_nodes(gm)
    assert node.kwargs["dropout_p"] == 0.3
    assert not any("dropout" in str(n.target) and n.args and n.args[0].name.startswith("softmax")
                   for n in gm.graph.nodes if n.op == "call_function" and n is not node)
    # On CPU, SDPA's math kernel draws its dropout mask like F.dropout on the probabilities:
    # with the same seed the outputs agree, and differ from a different seed's.
    torch.manual_seed(7)
    out = gm(*ex)
    torch.manual_seed(7)
    want = ref(*ex)
    assert rel_err(out, want) < 1e-6
    torch.manual_seed(8)
    assert rel_err(gm(*ex), want) > 1e-3
    # eval mode: the dropout is dropped
    model.eval()
    ref, gm, matches = rewritten(flavour, model, ex)
    assert matches[0].dropout_p == 0.0 and "dropout_p" not in sdpa_nodes(gm)[0].kwargs
    assert rel_err(gm(*ex), ref(*ex)) < 1e-6


NUMERIC_VARIANTS = ["nanogpt_buffer", "padding_mask", "additive_causal", "split_q_k"]


@pytest.mark.parametrize("flavour", ["fx", "export"])
def test_gradients_match(flavour):
    model = zoo([VARIANTS[name][0] for name in NUMERIC_VARIANTS]).train()
    x, pad = inputs()
    ref, gm, matches = rewritten(flavour, model, (x, pad))
    assert len(matches) == len(NUMERIC_VARIANTS)
    w = torch.randn(B, T, C, generator=torch.Generator().manual_seed(3))
    grads = []
    for g in (ref, gm):
        xg = x.clone().requires_grad_(True)
        params = dict(g.named_parameters())
        for p in params.values():
            p.grad = None
        (g(xg, pad) * w).sum().backward()
        grads.append({"x": xg.grad.clone(), **{n: p.grad.clone() for n, p in params.items()}})
    assert len(grads[0]) == 1 + 8 * len(NUMERIC_VARIANTS)  # x, q/k/v/proj weights and biases
    assert_grads_close(grads[1], grads[0], 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("flavour", ["fx", "export"])
def test_low_precision_matches_fp32_as_well_as_the_explicit_graph(flavour, dtype, tol):
    model = zoo([VARIANTS[name][0] for name in NUMERIC_VARIANTS]).eval()
    want = model(*inputs())
    low = copy.deepcopy(model).to(dtype)
    ex = inputs(dtype)
    ref, gm, matches = rewritten(flavour, low, ex)
    assert len(matches) == len(NUMERIC_VARIANTS)
    out = gm(*ex)
    assert out.dtype == dtype
    fused, explicit = rel_err(out, want), rel_err(ref(*ex), want)
    assert fused < tol
    assert fused <= 1.5 * explicit + 1e-3, (fused, explicit)


@pytest.fixture(scope="module")
def gpt_export():
    model, ex = build("gpt", "tiny")
    model.eval()
    gm, source = capture(model, ex)
    assert source == "export"
    return model, ex, gm


@pytest.fixture(scope="module")
def bert_tiny():
    model, ex = build("bert", "tiny")
    model.eval()
    return model, ex, {"fx": capture(model)[0], "export": capture(model, ex)[0]}


def test_gpt_export_graph(gpt_export):
    model, ex, captured = gpt_export
    gm, ref = copy.deepcopy(captured), copy.deepcopy(captured)
    before = {n.name: n for n in gm.graph.nodes}
    dead_before = {name for name, n in before.items() if not n.users and n.op != "output"}
    matches = rewrite_attention(gm).facts
    assert [m.sdpa_node for m in matches] == ["softmax", "softmax_1"]  # one per layer
    assert all(m.causal and m.scale is None and not m.has_mask for m in matches)
    assert not op_names(gm) & {"softmax", "masked_fill", "tril", "eq", "ones", "matmul"}
    live = {n.name for n in gm.graph.nodes}
    # nodes outside the patterns' ancestry stay, dead or impure (unused weight, guards call)
    assert "_guards_fn" in live and dead_before <= live
    # A9: meta["val"] on the new node, equal to the replaced matmul's value; dataflow reads it
    dataflow = build_dataflow(gm)
    for m in matches:
        node = next(n for n in gm.graph.nodes if n.name == m.sdpa_node)
        old = before[m.matched_nodes[-1]].meta["val"]
        assert node.meta["val"].dtype == old.dtype and node.meta["val"].shape == old.shape
        assert "nn_module_stack" in node.meta
        vertex = dataflow.vertex(m.sdpa_node)
        assert (vertex.kind, vertex.dtype) == ("sdpa", torch.float32)
        assert vertex.module_path.endswith("attn")
    assert rel_err(first(gm(*ex)), first(ref(*ex))) < 1e-5
    # the batch stays dynamic after the rewrite
    wide = torch.randint(0, 256, (5, ex[0].shape[1]), generator=torch.Generator().manual_seed(2))
    assert rel_err(first(gm(wide)), model(wide)) < 1e-5
    # a second run finds nothing left to rewrite and changes nothing
    code = gm.code
    assert rewrite_attention(gm).facts == [] and gm.code == code


@pytest.mark.parametrize("flavour", ["fx", "export"])
def test_bert_padding_mask(bert_tiny, flavour):
    model, ex, captured = bert_tiny
    gm, ref = copy.deepcopy(captured[flavour]), copy.deepcopy(captured[flavour])
    matches = rewrite_attention(gm).facts
    assert len(matches) == 2
    assert all(not m.causal and m.has_mask for m in matches)
    masks = {n.kwargs["attn_mask"].name for n in sdpa_nodes(gm)}
    assert len(masks) == 1  # both layers read the one additive mask built from attention_mask
    assert rel_err(first(gm(*ex)), first(ref(*ex))) < 1e-5
    grads = []
    for g in (ref, gm):
        for p in g.parameters():
            p.grad = None
        first(g(*ex)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None})
    assert len(grads[0]) > 10
    assert_grads_close(grads[1], grads[0], 1e-5)


def _amp_pipeline(gm: fx.GraphModule, *, rewrite: bool):
    """convert()'s stages by hand, with the attention rewrite between capture and dataflow."""
    matches = rewrite_attention(gm).facts if rewrite else []
    dataflow = build_dataflow(gm)
    policy = policy_for("cpu", torch.bfloat16)
    plan = propagate(dataflow, classify(dataflow, policy), policy)
    insert_casts(gm, dataflow, plan)
    return gm, plan, matches


def test_end_to_end_gpt_bf16_against_fp32(gpt_export):
    model, ex, captured = gpt_export
    _check_end_to_end(model, ex, captured)


def test_end_to_end_bert_bf16_against_fp32(bert_tiny):
    model, ex, captured = bert_tiny
    _check_end_to_end(model, ex, captured["export"])


def _check_end_to_end(model, ex, captured):
    want = first(model(*ex))
    gm, plan, matches = _amp_pipeline(copy.deepcopy(captured), rewrite=True)
    base, _, _ = _amp_pipeline(copy.deepcopy(captured), rewrite=False)
    assert len(matches) == 2
    for m in matches:
        d = plan[m.sdpa_node]
        assert (d.kind, d.category, d.precision) == ("sdpa", "allow", torch.bfloat16)
    assert not any(d.kind == "softmax" for d in plan.values())
    for node in sdpa_nodes(gm):  # every floating input (the padding mask too) arrives in bf16
        for a in (*node.args, node.kwargs.get("attn_mask")):
            if isinstance(a, fx.Node):
                cast = a.meta.get("amp_cast")
                dtype = cast["dtype"] if cast is not None else plan[a.name].precision
                assert dtype == torch.bfloat16, a
    out = first(gm(*ex))
    assert out.dtype == torch.float32
    fused, explicit = rel_err(out, want), rel_err(first(base(*ex)), want)
    print(f"bf16 pipeline vs fp32: fused {fused:.2e}, explicit {explicit:.2e}")
    assert fused < 3e-2
    assert fused <= 1.5 * explicit + 1e-3, (fused, explicit)


def test_end_to_end_gpt_training_gradients_bf16():
    model, ex = build("gpt", "tiny", with_targets=True)
    model.train()
    gm, _ = capture(model, ex)
    gm, plan, matches = _amp_pipeline(gm, rewrite=True)
    assert len(matches) == 2  # dropout p=0 in training is dropped
    params = dict(model.named_parameters())
    model.zero_grad()
    model(*ex).backward()
    want = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    loss = first(gm(*ex))
    assert loss.dtype == torch.float32
    loss.backward()  # the captured graph holds the model's own parameters
    got = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert_grads_close(got, want, 3e-2)
    model.zero_grad()


def test_scale_on_q_by_a_tensor_is_part_of_q():
    """A4: ``q * t`` with a tensor t is simply the query; the scores' scale stays constant."""

    class TensorQ(Attn):
        def forward(self, x, pad):
            q = self._heads(self.q(x)) * self.scale_t
            k, v = self._heads(self.k(x)), self._heads(self.v(x))
            att = (q @ k.transpose(-2, -1)).masked_fill(self.tril == 0, float("-inf"))
            return self.proj((att.softmax(-1) @ v).transpose(1, 2).flatten(2))

    torch.manual_seed(0)
    model = TensorQ().eval()
    ex = inputs()
    ref, gm, matches = rewritten("export", model, ex)
    assert [(m.causal, m.scale) for m in matches] == [(True, 1.0)]
    (node,) = sdpa_nodes(gm)
    assert node.args[0].target is torch.ops.aten.mul.Tensor  # q * t stays as the query
    assert rel_err(gm(*ex), ref(*ex)) < 1e-6
