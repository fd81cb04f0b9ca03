"""Tests for amp_compiler/capture/shapes.py and keyword inputs: every input dimension dynamic by default,
batch-1 examples widened for the capture, a user's ``dynamic_shapes`` passed through (None:
static), a ``ShapeError`` at call time that names the input and the dimension a capture fixed,
and ``convert(model, example_kwargs=...)`` with ``amp(**batch)`` returning the model's own
output class.

The helpers are checked directly on their contracts; convert() is checked on small modules
(symbolic placeholder sizes, calls at other batch sizes and lengths, the error's wording) and
on a tiny Hugging Face GPT-2 converted at batch 1 x 8 tokens and called at 3 x 12 with padding,
against fp32 within a few machine epsilons of the low dtype.

    python -m pytest -q tests/test_shapes.py --durations=10
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim

import amp_compiler as ac
from amp_compiler.capture.shapes import (InputsError, ShapeError, default_dynamic_shapes, explain_shape_error,
                                 widen_batch)
from conftest import EPS, rel_err

DTYPES = (torch.float16, torch.bfloat16)
C = 16
# tolerance of converted-vs-fp32 comparisons on the small modules: the error of a couple of
# roundings to the low dtype (a linear and its output), with room for the accumulation order
BOUND_EPS = 4


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed))


def _symbolic(gm: fx.GraphModule, name: str) -> list[bool]:
    """Per dimension of placeholder ``name``: is it still a free size symbol?"""
    val = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name).meta["val"]
    return [isinstance(s, torch.SymInt) and not s.node.expr.is_number for s in val.shape]


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).softmax(-1)


class PositionTable(nn.Module):
    """A fixed-size position table: the sequence length is fixed to 8 by the model itself."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, C) * 0.1)
        self.a = nn.Linear(C, C)

    def forward(self, x):
        return self.a(x + self.pos)


class BatchOfOne(nn.Module):
    """Reshapes by its own length: only a batch of 1 fits, so the widened capture fails and
    the example is captured as given."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(C, C)

    def forward(self, x):
        return self.a(x).reshape(x.size(1), C)


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(C, C)

    def forward(self, *, x, bias=None):
        y = self.a(x)
        return y if bias is None else y + bias


class Mixed(nn.Module):
    """A positional input and a keyword-only one, both batched."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(C, C)

    def forward(self, x, *, gate):
        return self.a(x) * torch.sigmoid(gate)


# -- the helpers -------------------------------------------------------------------------------

def test_default_dynamic_shapes_every_dimension_auto_by_parameter_name():
    def forward(ids, mask=None, *rest, **extra):
        pass

    ids, mask = torch.zeros(4, 9, dtype=torch.long), torch.ones(4, 9)
    spec = default_dynamic_shapes(forward, (ids, mask, (torch.zeros(4, 3), torch.zeros(1, 5))),
                                  {"labels": torch.zeros(4, 9), "scalar": torch.tensor(2.0)})
    assert spec["ids"] == {0: Dim.AUTO, 1: Dim.AUTO}
    assert spec["mask"] == {0: Dim.AUTO, 1: Dim.AUTO}
    # *rest: a tuple of entries, one per extra positional input (a tuple of two tensors here);
    # sizes 0 and 1 get no entry (torch.export specialises them anyway)
    assert spec["rest"] == (({0: Dim.AUTO, 1: Dim.AUTO}, {1: Dim.AUTO}),)
    assert spec["extra"] == {"labels": {0: Dim.AUTO, 1: Dim.AUTO}, "scalar": None}


def test_widen_batch_repeats_batch_one_inputs_only():
    x, ids = _x(1, 8, C), torch.randint(0, 9, (1, 8))
    (args, kwargs) = widen_batch((x,), {"ids": ids, "scale": torch.tensor(0.5), "flag": True})
    assert args[0].shape == (2, 8, C) and torch.equal(args[0][0], x[0]) and torch.equal(args[0][1], x[0])
    assert kwargs["ids"].shape == (2, 8) and torch.equal(kwargs["ids"], ids.repeat(2, 1))
    assert kwargs["scale"].shape == () and kwargs["flag"] is True  # 0-dim and non-tensors untouched
    assert widen_batch((_x(3, 8, C),), {}) is None                 # nothing at batch 1
    assert widen_batch((x, _x(4, C)), {}) is None                  # inputs disagree on dimension 0


def test_explain_shape_error_reads_both_torch_messages():
    new = AssertionError("Guard failed: ids.size()[1] == 16")
    old = RuntimeError("Expected input at *args[0].shape[1] to be equal to 16, but got 24")
    for exc, name in ((new, "ids"), (old, "*args[0]")):
        err = explain_shape_error(exc)
        assert isinstance(err, ShapeError) and isinstance(err, ac.AmpCompilerError)
        assert isinstance(err, ValueError)
        text = str(err)
        assert f"`{name}`" in text and "dimension 1" in text and "16" in text
        assert "dynamic_shapes" in text
    assert explain_shape_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


# -- convert(): dynamic by default ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_one_example_runs_at_other_batches_and_lengths(dtype):
    torch.manual_seed(0)
    model = Plain().eval()
    amp = ac.convert(model, (_x(1, 8, C),), dtype=dtype)
    assert _symbolic(amp.graph_module, "x") == [True, True, False]  # C is fixed by the linear
    for b, t in ((1, 8), (3, 12), (5, 2)):
        x = _x(b, t, C, seed=b * t)
        with torch.no_grad():
            ref, out = model(x), amp(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) <= BOUND_EPS * EPS[dtype], (b, t)


def test_dimension_the_model_fixes_gives_a_shape_error_naming_it():
    torch.manual_seed(0)
    model = PositionTable().eval()
    amp = ac.convert(model, (_x(1, 8, C),), dtype=torch.bfloat16)
    assert _symbolic(amp.graph_module, "x")[0], "the batch should stay dynamic"
    assert amp(_x(3, 8, C)).shape == (3, 8, C)
    with pytest.raises(ShapeError) as info:
        amp(_x(3, 12, C))
    text = str(info.value)
    assert "`x`" in text and "dimension 1" in text and "8" in text
    assert "dynamic_shapes" in text


def test_dynamic_shapes_none_is_static():
    torch.manual_seed(0)
    model = Plain().eval()
    amp = ac.convert(model, (_x(2, 8, C),), dtype=torch.bfloat16, dynamic_shapes=None)
    assert _symbolic(amp.graph_module, "x") == [False, False, False]
    assert amp(_x(2, 8, C, seed=1)).shape == (2, 8, C)
    with pytest.raises(ShapeError, match=r"`x` dimension 0 was fixed to 2"):
        amp(_x(3, 8, C))


def test_user_dynamic_shapes_passed_through():
    """The user's spec replaces the default: the batch varies, the length is what they fixed."""
    torch.manual_seed(0)
    model = Plain().eval()
    amp = ac.convert(model, (_x(2, 8, C),), dtype=torch.bfloat16,
                     dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
    assert _symbolic(amp.graph_module, "x") == [True, False, False]
    x = _x(5, 8, C, seed=1)
    with torch.no_grad():
        assert rel_err(amp(x), model(x)) <= BOUND_EPS * EPS[torch.bfloat16]
    with pytest.raises(ShapeError, match=r"`x` dimension 1 was fixed to 8"):
        amp(_x(5, 9, C))


def test_widened_capture_that_fails_falls_back_to_the_example(caplog):
    """A model that only runs at batch 1 still converts (the batch is then fixed to 1, and a
    call at batch 2 says so)."""
    torch.manual_seed(0)
    model = BatchOfOne().eval()
    with caplog.at_level(logging.INFO, logger="amp_compiler"):
        amp = ac.convert(model, (_x(1, 8, C),), dtype=torch.bfloat16)
    assert any("widened" in r.getMessage() for r in caplog.records)
    x = _x(1, 5, C, seed=1)
    with torch.no_grad():
        assert rel_err(amp(x), model(x)) <= BOUND_EPS * EPS[torch.bfloat16]
    with pytest.raises(ShapeError, match=r"dimension 0 was fixed to 1"):
        amp(_x(2, 5, C))


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.a = nn.Embedding(10, C), nn.Linear(C, C)

    def forward(self, ids):
        return self.a(self.emb(ids))


def test_unrelated_call_errors_are_not_turned_into_shape_errors():
    """Only torch.export's guard failures become ShapeErrors; an id out of the embedding's
    range raises what the model raises."""
    torch.manual_seed(0)
    model = Embed().eval()
    amp = ac.convert(model, (torch.randint(0, 10, (2, 8)),), dtype=torch.bfloat16)
    bad = torch.full((2, 8), 12)
    with pytest.raises(Exception) as own:
        model(bad)
    with pytest.raises(type(own.value)) as info:
        amp(bad)
    assert not isinstance(info.value, ShapeError)


# -- keyword inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keyword_only_forward_converts_from_example_kwargs(dtype):
    torch.manual_seed(0)
    model = KeywordOnly().eval()
    amp = ac.convert(model, example_kwargs={"x": _x(1, 8, C)}, dtype=dtype)
    x = _x(3, 12, C, seed=1)
    with torch.no_grad():
        ref, out = model(x=x), amp(x=x)
    assert out.shape == (3, 12, C)
    assert rel_err(out, ref) <= BOUND_EPS * EPS[dtype]


def test_positional_and_keyword_examples_together():
    torch.manual_seed(0)
    model = Mixed().eval()
    amp = ac.convert(model, (_x(1, 8, C),), example_kwargs={"gate": _x(1, 8, C, seed=1)},
                     dtype=torch.bfloat16)
    x, gate = _x(3, 6, C, seed=2), _x(3, 6, C, seed=3)
    with torch.no_grad():
        assert rel_err(amp(x, gate=gate), model(x, gate=gate)) <= BOUND_EPS * EPS[torch.bfloat16]


def test_missing_keyword_error_names_it():
    torch.manual_seed(0)
    model = KeywordOnly().eval()
    with pytest.raises(TypeError) as own:
        model()
    assert "'x'" in str(own.value)
    amp = ac.convert(model, example_kwargs={"x": _x(1, 8, C)}, dtype=torch.bfloat16)
    with pytest.raises(Exception) as info:
        amp()
    assert "x" in str(info.value)
    # as clear as the model's own error: a TypeError (or one of ours) that names the keyword
    assert isinstance(info.value, (TypeError, ac.AmpCompilerError)), \
        f"{type(info.value).__name__}: {info.value}"


class OptionalMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, C)

    def forward(self, x, mask=None):
        y = self.fc(x)
        return y if mask is None else y * mask


def test_the_same_inputs_spelled_another_way_are_rebound():
    """Captured positionally, called with keywords (Trainer's ``amp(**batch)``), and the other
    way round: the same inputs, so the call is re-bound to the captured spelling."""
    torch.manual_seed(0)
    model, x = OptionalMask().eval(), _x(2, 8, C)
    with torch.no_grad():
        ref = model(x)
        for amp in (ac.convert(model, (x,), dtype=torch.bfloat16),
                    ac.convert(model, example_kwargs={"x": x}, dtype=torch.bfloat16)):
            assert rel_err(amp(x=x), ref) <= 4 * EPS[torch.bfloat16]
            assert rel_err(amp(x), ref) <= 4 * EPS[torch.bfloat16]
            with pytest.raises(InputsError, match="mask"):  # another input: not the captured call
                amp(x, mask=torch.ones(C))


@pytest.fixture(scope="module")
def gpt2():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tr.GPT2LMHeadModel(cfg).eval()


def _batch(b: int, t: int, seed: int) -> dict:
    ids = torch.randint(3, 96, (b, t), generator=_g(seed))
    mask = (torch.arange(t)[None, :] < (t - torch.arange(b) % 3)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def test_gpt2_converted_at_batch_1_runs_at_3_by_12_and_returns_its_output_class(gpt2):
    dtype = torch.float16
    amp = ac.convert(gpt2, example_kwargs=_batch(1, 8, 0), dtype=dtype)
    assert _symbolic(amp.graph_module, "input_ids") == [True, True]
    batch = _batch(3, 12, 1)
    with torch.no_grad():
        ref, out = gpt2(**batch), amp(**batch)
    assert type(out) is type(ref)
    assert out.logits.shape == (3, 12, gpt2.config.vocab_size) and out.logits.dtype == torch.float32
    assert rel_err(out.logits, ref.logits) <= BOUND_EPS * EPS[dtype]
    # the ModelOutput behaves as the library's: attribute, key and index access agree
    assert torch.equal(out["logits"], out.logits) and torch.equal(out[0], out.logits)
