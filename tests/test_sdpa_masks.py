"""Tests for passes/sdpa_masks.py: SDPA masks built from sizes are folded (S1, S2), masks that
stay are made contiguous where their key axis is strided (S3), and anything else is left alone.

Small modules call ``F.scaled_dot_product_attention`` with one mask each, the sequence length
read from the input (``T = x.size(1)``, symbolic in the export graph). For each: the SDPA
node's arguments after capture (``attn_mask`` gone, ``is_causal=True``, a ``contiguous``
node), the remark's rule, and the graph's output against the model's at another batch and
length. Near-misses (a bias that is not a mask, a causal-looking mask with fewer queries than
keys, a triangle that is causal only at the example's length, a mask read from an input) must
keep their mask. ``size_only_values`` is checked directly and through the attention rewrite's
causal-mask test on a symbolic length. Real models: BERT without an attention mask (S1), BERT
with a padding mask (kept), GPT-2 (S2), each against fp32 and autocast.

    python -m pytest -q tests/test_sdpa_masks.py --durations=10
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import amp_compiler as ac
from amp_compiler.capture import capture
from amp_compiler.passes.attention import rewrite_attention
from amp_compiler.passes.sdpa_masks import fold_sdpa_masks, size_only_values
from conftest import EPS, autocast_error_or_skip, rel_err, runtime_dtypes

DTYPES = (torch.float16, torch.bfloat16)
C, NH = 16, 2
HD = C // NH


def _sdpa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and "scaled_dot_product_attention" in str(n.target)]


def _mask_arg(node: fx.Node):
    """The node's attn_mask, wherever it is passed (4th positional or keyword)."""
    if len(node.args) > 3:
        return node.args[3]
    return node.kwargs.get("attn_mask")


def _is_causal(node: fx.Node) -> bool:
    return bool(node.args[5]) if len(node.args) > 5 else bool(node.kwargs.get("is_causal", False))


def _sdpa_rules(remarks) -> list[str]:
    """The S rules that fired (a mask left as it is is a missed remark)."""
    return [r.rule for r in remarks if r.pass_name == "sdpa_masks" and not r.missed]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Attn(nn.Module):
    """One SDPA call; ``mask`` picks how its attn_mask is built (see forward)."""

    def __init__(self, mask: str, *, scale: float | None = None) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.out = nn.Linear(C, C)
        self.mask, self.scale = mask, scale

    def forward(self, x, pad):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, NH, HD).permute(2, 0, 3, 1, 4)
        kind = self.mask
        pos = torch.arange(T)
        if kind == "causal_bool":
            m = torch.ones(T, T).tril().bool()
        elif kind == "causal_compare":              # transformers' spelling: kv_idx <= q_idx
            m = (pos[None, :] <= pos[:, None])[None, None].expand(B, 1, T, T)
        elif kind == "causal_additive":
            m = torch.full((T, T), float("-inf")).triu(1)
        elif kind == "causal_finfo":                # additive, finfo.min above the diagonal
            m = torch.zeros(T, T).masked_fill(pos[None, :] > pos[:, None], torch.finfo(torch.float32).min)
        elif kind == "all_bool":
            m = torch.ones(B, 1, T, T, dtype=torch.bool)
        elif kind == "all_additive":
            m = torch.zeros(T, T)
        elif kind == "alibi":                       # a bias, not a mask
            m = (pos[None, :] - pos[:, None]).float() * 0.5
        elif kind == "alibi_causal":                # a bias with a causal mask inside
            m = ((pos[None, :] - pos[:, None]).float() * 0.5).masked_fill(
                pos[None, :] > pos[:, None], float("-inf"))
        elif kind == "soft_causal":                 # -5 above the diagonal: a bias, masks nothing
            m = torch.full((T, T), -5.0).triu(1)
        elif kind == "ones_float":                  # 1.0 / 0.0 added to scores: not a mask
            m = torch.ones(T, T).tril()
        elif kind == "anticausal":                  # the future only
            m = torch.ones(T, T).triu().bool()
        elif kind == "causal_at_8":                 # causal only when T == 8
            m = torch.ones(T, T).tril(diagonal=T - 8).bool()
        elif kind == "padding":                     # value-dependent, key axis contiguous
            m = pad[:, None, None, :].bool()
        elif kind == "padding_strided":             # value-dependent, key axis stride 0
            m = pad[:, None, :, None].bool().expand(B, 1, T, T)
        else:
            raise ValueError(kind)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=self.scale)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class CrossAttn(nn.Module):
    """Queries from x, keys and values from memory (another length): a lower triangle of
    Tq x Tk is not the causal mask of a square attention and must stay a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(C, C), nn.Linear(C, 2 * C)

    def forward(self, x, memory):
        B, Tq, _ = x.shape
        Tk = memory.size(1)
        q = self.q(x).view(B, Tq, NH, HD).transpose(1, 2)
        k, v = self.kv(memory).view(B, Tk, 2, NH, HD).permute(2, 0, 3, 1, 4)
        m = torch.ones(Tq, Tk).tril().bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(B, Tq, C)


def _inputs(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and a padding mask (row r right-padded by r % 3 positions; row 0 never)."""
    x = torch.randn(b, t, C, generator=_g(seed))
    lengths = t - torch.arange(b) % 3
    pad = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return x, pad


def _captured(kind: str, **kw):
    torch.manual_seed(0)
    model = Attn(kind, **kw).eval()
    gm, _ = capture(model, _inputs(2, 8, 0))
    (node,) = _sdpa_nodes(gm)
    return model, gm, node


def _same_outputs(model, gm, *, b: int = 3, t: int = 11, seed: int = 1) -> None:
    x, pad = _inputs(b, t, seed)
    with torch.no_grad():
        ref, out = model(x, pad), gm(x, pad)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (out - ref).abs().max()


# -- S1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["all_bool", "all_additive"])
def test_s1_all_kept_mask_dropped(kind):
    model, gm, node = _captured(kind)
    assert _mask_arg(node) is None
    assert not _is_causal(node)
    assert _sdpa_rules(gm.meta["amp_rewrites"]) == ["S1:mask-all-kept"]
    # the mask's construction is gone with it
    assert not [n for n in gm.graph.nodes if "ones" in n.name or "zeros" in n.name]
    _same_outputs(model, gm)


# -- S2 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["causal_bool", "causal_compare", "causal_additive", "causal_finfo"])
def test_s2_size_only_causal_mask_becomes_is_causal(kind):
    model, gm, node = _captured(kind)
    assert _mask_arg(node) is None
    assert _is_causal(node)
    assert _sdpa_rules(gm.meta["amp_rewrites"]) == ["S2:mask-causal"]
    assert not [n for n in gm.graph.nodes if n.name.startswith(("tril", "triu", "ones", "full"))]
    _same_outputs(model, gm)
    _same_outputs(model, gm, b=2, t=4, seed=2)


def test_s2_keeps_the_other_sdpa_arguments():
    model, gm, node = _captured("causal_bool", scale=0.3)
    assert _is_causal(node)
    scale = node.args[6] if len(node.args) > 6 else node.kwargs.get("scale")
    assert scale == pytest.approx(0.3)
    _same_outputs(model, gm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_s2_converted_matches_fp32_and_autocast(dtype):
    torch.manual_seed(0)
    model = Attn("causal_bool").eval()
    amp = ac.convert(model, _inputs(2, 8, 0), dtype=dtype)
    (node,) = _sdpa_nodes(amp.graph_module)
    assert _is_causal(node) and _mask_arg(node) is None
    assert amp.plan[node.name].precision == dtype
    x, pad = _inputs(3, 13, 3)
    rec = runtime_dtypes(amp.graph_module, x, pad)
    assert rec.dtypes[node.name] == dtype
    with torch.no_grad():
        ref, out = model(x, pad), amp(x, pad)
    ours = rel_err(out, ref)
    theirs = autocast_error_or_skip(ours, lambda: model(x, pad), dtype, ref)
    assert ours <= max(1.1 * theirs, 2 * EPS[dtype]), (ours, theirs)


# -- near-misses: the mask stays -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["alibi", "alibi_causal", "soft_causal", "ones_float", "anticausal", "causal_at_8"])
def test_size_only_values_that_are_not_all_kept_or_causal_stay(kind):
    model, gm, node = _captured(kind)
    assert isinstance(_mask_arg(node), fx.Node), "the mask was dropped"
    assert not _is_causal(node)
    assert _sdpa_rules(gm.meta["amp_rewrites"]) == []
    _same_outputs(model, gm)


def test_fewer_queries_than_keys_not_causal():
    torch.manual_seed(0)
    model = CrossAttn().eval()
    x, mem = torch.randn(2, 5, C, generator=_g(0)), torch.randn(2, 8, C, generator=_g(1))
    gm, _ = capture(model, (x, mem))
    (node,) = _sdpa_nodes(gm)
    assert isinstance(_mask_arg(node), fx.Node)
    assert not _is_causal(node)
    assert _sdpa_rules(gm.meta["amp_rewrites"]) == []
    x2, mem2 = torch.randn(3, 4, C, generator=_g(2)), torch.randn(3, 9, C, generator=_g(3))
    assert torch.allclose(gm(x2, mem2), model(x2, mem2), rtol=1e-5, atol=1e-6)


def test_padding_mask_from_an_input_stays_as_it_is():
    """A mask read from an input's values is never folded; its key axis is contiguous, so S3
    has nothing to do either."""
    model, gm, node = _captured("padding")
    mask = _mask_arg(node)
    assert isinstance(mask, fx.Node) and mask.target != "contiguous"
    assert not _is_causal(node)
    assert _sdpa_rules(gm.meta["amp_rewrites"]) == []
    _same_outputs(model, gm)


# -- S3 ------------------------------------------------------------------------------------------

def test_s3_strided_value_dependent_mask_made_contiguous():
    model, gm, node = _captured("padding_strided")
    mask = _mask_arg(node)
    assert isinstance(mask, fx.Node) and mask.op == "call_method" and mask.target == "contiguous"
    assert mask.meta["val"].stride()[-1] == 1
    (source,) = mask.all_input_nodes
    assert source.meta["val"].stride()[-1] == 0, "the mask before S3 should have had a stride-0 key axis"
    assert _sdpa_rules(gm.meta["amp_rewrites"]) == ["S3:mask-contiguous"]
    assert not _is_causal(node)
    _same_outputs(model, gm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_s3_mask_stays_boolean_in_a_low_precision_plan(dtype):
    torch.manual_seed(0)
    model = Attn("padding_strided").eval()
    amp = ac.convert(model, _inputs(2, 8, 0), dtype=dtype)
    (node,) = _sdpa_nodes(amp.graph_module)
    mask = _mask_arg(node)
    assert mask.target == "contiguous"
    x, pad = _inputs(3, 9, 4)
    rec = runtime_dtypes(amp.graph_module, x, pad)
    assert rec.dtypes[mask.name] == torch.bool
    assert rec.dtypes[node.name] == dtype
    with torch.no_grad():
        ref, out = model(x, pad), amp(x, pad)
    assert rel_err(out, ref) <= 4 * EPS[dtype]


# -- size_only_values ----------------------------------------------------------------------------

class ExplicitCausal(nn.Module):
    """nanoGPT's written-out attention with the causal mask built from the traced length."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, NH, HD).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(HD))
        att = att.masked_fill(torch.ones(T, T).tril() == 0, float("-inf"))
        return (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)


def test_size_only_values_evaluates_a_mask_at_several_lengths():
    torch.manual_seed(0)
    model = ExplicitCausal().eval()
    gm, _ = capture(model, (torch.randn(2, 8, C),))
    fill = next(n for n in gm.graph.nodes if n.name.startswith("masked_fill"))
    scores, mask = fill.args[0], fill.args[1]
    probes = size_only_values(mask, [scores])
    assert probes is not None and len(probes) >= 2
    lengths = set()
    for value, (shape,) in probes:
        t = shape[-1]
        lengths.add(t)
        assert shape[-2] == t and value.shape == (t, t)
        assert torch.equal(value, torch.ones(t, t).tril() == 0)  # True above the diagonal
    assert len(lengths) == len(probes), "every probe should try another length"
    # a value read from an input's data (the scores) is not size-only
    assert size_only_values(scores, [scores]) is None


def test_attention_rewrite_sees_a_symbolic_length_causal_mask():
    """passes/attention.py decides "causal" for a mask built from the symbolic length through
    size_only_values: the fused node gets is_causal=True and works at other lengths."""
    torch.manual_seed(0)
    model = ExplicitCausal().eval()
    gm, _ = capture(model, (torch.randn(2, 8, C),))
    (match,) = rewrite_attention(gm).facts
    assert match.causal and not match.has_mask
    (node,) = _sdpa_nodes(gm)
    assert _is_causal(node) and _mask_arg(node) is None
    for b, t in ((3, 5), (1, 12)):
        x = torch.randn(b, t, C, generator=_g(t))
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_fold_sdpa_masks_is_idempotent():
    """A second run finds nothing more to fold (is_causal set, masks gone or contiguous)."""
    for kind in ("causal_bool", "all_bool", "padding_strided"):
        _, gm, _ = _captured(kind)
        assert fold_sdpa_masks(gm).taken == [], kind


# -- real models -----------------------------------------------------------------------------------

VOCAB = 96


def _ids(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=_g(seed))


def _padding(b: int, t: int) -> torch.Tensor:
    lengths = t - torch.arange(b) % 3
    return (torch.arange(t)[None, :] < lengths[:, None]).long()


@pytest.fixture(scope="module")
def bert():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64, pad_token_id=0)
    return tr.BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def gpt2():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tr.GPT2LMHeadModel(cfg).eval()


def _check_numbers(model, amp, batch: dict, dtype, attr: str = "logits") -> None:
    with torch.no_grad():
        ref = getattr(model(**batch), attr)
        out = getattr(amp(**batch), attr)
    ours = rel_err(out, ref)
    theirs = autocast_error_or_skip(ours, lambda: getattr(model(**batch), attr), dtype, ref)
    assert ours <= max(1.1 * theirs, 2 * EPS[dtype]), (ours, theirs)


def test_bert_without_attention_mask_drops_it(bert):
    """Called with ids only, BERT builds an all-ones mask from the ids' shape: S1 drops it in
    every layer."""
    dtype = torch.bfloat16
    amp = ac.convert(bert, example_kwargs={"input_ids": _ids(2, 8, 0)}, dtype=dtype)
    nodes = _sdpa_nodes(amp.graph_module)
    assert len(nodes) == bert.config.num_hidden_layers
    assert all(_mask_arg(n) is None and not _is_causal(n) for n in nodes)
    assert _sdpa_rules_rows(amp) == ["S1:mask-all-kept"] * len(nodes)
    _check_numbers(bert, amp, {"input_ids": _ids(3, 12, 1)}, dtype)


def test_bert_padding_mask_kept(bert):
    dtype = torch.float16
    kw = {"input_ids": _ids(2, 8, 0), "attention_mask": _padding(2, 8)}
    amp = ac.convert(bert, example_kwargs=kw, dtype=dtype)
    nodes = _sdpa_nodes(amp.graph_module)
    assert len(nodes) == bert.config.num_hidden_layers
    assert all(isinstance(_mask_arg(n), fx.Node) and not _is_causal(n) for n in nodes)
    assert not [r for r in _sdpa_rules_rows(amp) if r.startswith(("S1", "S2"))]
    batch = {"input_ids": _ids(3, 12, 2), "attention_mask": _padding(3, 12)}
    _check_numbers(bert, amp, batch, dtype)
    # the padded positions really are masked: changing the ids there changes nothing
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    with torch.no_grad():
        assert torch.equal(amp(**batch).logits, amp(**other).logits)


def test_gpt2_causal_mask_becomes_is_causal(gpt2):
    dtype = torch.bfloat16
    amp = ac.convert(gpt2, example_kwargs={"input_ids": _ids(2, 8, 0)}, dtype=dtype)
    nodes = _sdpa_nodes(amp.graph_module)
    assert len(nodes) == gpt2.config.n_layer
    assert all(_is_causal(n) and _mask_arg(n) is None for n in nodes)
    assert _sdpa_rules_rows(amp) == ["S2:mask-causal"] * len(nodes)
    _check_numbers(gpt2, amp, {"input_ids": _ids(3, 13, 1)}, dtype)


def _sdpa_rules_rows(amp) -> list[str]:
    return [row[1] for row in amp.plan.meta["rewrites"] if row[0] == "sdpa_masks"]
