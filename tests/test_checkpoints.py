"""Checkpoints and weights of a converted module, the way users handle them.

1. ``amp.state_dict()`` has the user model's keys (same set, same order), nested modules prefix
   them, and checkpoints load strictly both ways (``model`` <-> ``amp``), for training and
   inference conversions, both capture paths, fp16 and bf16, and after ``amp.eval()`` swapped
   a training module's graph. An inference module whose user model is gone gives its folded
   low-precision copies and still loads.
2. Stale weights: an inference module refolds the copies of weights changed in place since
   folding at its next call; ``amp.refresh()`` refolds everything (needed after ``w.data = ...``).
3. ``.half()``, ``.to(dtype)`` and friends raise ``UnsupportedOperationError`` and touch no
   weight; device moves work.
4. Pickling (``torch.save(amp)``) raises at once, naming ``amp_compiler.save``.

Models: a small conv + batch-norm + MLP model written here, the LSTM reference model (its
folded copy is a whole low-precision module, rule F3), and Hugging Face GPT-2 from a small
default config (tied LM head, default dropout and attention), called with keywords.

    python -m pytest -q tests/test_checkpoints.py
"""

from __future__ import annotations

import copy
import gc
import io
import logging
import pickle
import weakref

import pytest
import torch
from torch import nn

import amp_compiler as ac
from amp_compiler.errors import UnsupportedOperationError
from amp_compiler.models import build

from conftest import DTYPES, EPS, FP32_BOUND_EPS, assert_unchanged, fetch, rel_err, snapshot

CAPTURES = ("fx", "export")
MODES = (False, True)


class ConvNet(nn.Module):
    """conv -> batch norm -> relu -> pool -> MLP, with a persistent buffer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)
        self.register_buffer("temperature", torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.max_pool2d(h, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(h))) / self.temperature


def convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet()
    with torch.no_grad():  # batch-norm statistics that are not the defaults
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def convert(model: nn.Module, capture: str, dtype: torch.dtype, training: bool):
    return ac.convert(model.train(training), (X,) if capture == "export" else None, dtype=dtype,
                      training=training)


def bound(dtype: torch.dtype) -> float:
    return FP32_BOUND_EPS * EPS[dtype]


def eval_outputs(amp, model: nn.Module, *inputs):
    """(amp's, the fp32 model's) eval-mode outputs; both modules keep their modes."""
    amp_mode, model_mode = amp.training, model.training
    amp.eval()
    model.eval()
    try:
        with torch.no_grad():
            return amp(*inputs), model(*inputs)
    finally:
        amp.train(amp_mode)
        model.train(model_mode)


def folded(amp) -> list:
    return amp.graph_module.meta.get("amp_folded", [])


# -- 1. the user model's keys ---------------------------------------------------------------------

@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("training", MODES, ids=["inference", "training"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_dict_has_the_model_keys_and_values(capture, training, dtype):
    model = convnet()
    amp = convert(model, capture, dtype, training)
    assert list(amp.state_dict()) == list(model.state_dict())
    ours, theirs = amp.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    if training:  # the user's own tensors: the fp32 master weights
        assert all(ours[k] is theirs[k] for k in theirs)
    else:  # folded copies stand in for the fp32 originals, the model alive: its tensors
        assert folded(amp) and all(ours[k] is theirs[k] for k in theirs)
        assert not any(k.startswith("_amp_") for k in amp.state_dict())
    assert not any(isinstance(v, nn.Parameter) for v in amp.state_dict().values())


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("training", MODES, ids=["inference", "training"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_checkpoints_load_strictly_both_ways(capture, training, dtype):
    model = convnet()
    amp = convert(model, capture, dtype, training)
    other = convnet(seed=7)  # the checkpoint: other weights, other statistics
    amp.load_state_dict(other.state_dict())  # strict
    for k, v in other.state_dict().items():
        assert torch.equal(amp.state_dict()[k], v), k
    for rec in folded(amp):  # the copies the module computes with, refreshed by the load itself
        expected = other.state_dict()[rec.source].to(dtype)
        assert torch.equal(fetch(amp.graph_module, rec.copy), expected)
    out, ref = eval_outputs(amp, other, X)
    assert rel_err(out, ref) <= bound(dtype)
    # and back: a fresh fp32 model loads amp's checkpoint strictly, bit for bit
    fresh = convnet(seed=3)
    fresh.load_state_dict(amp.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in other.state_dict().items())
    # a plain torch.save / torch.load of the state dict round-trips
    buffer = io.BytesIO()
    torch.save(amp.state_dict(), buffer)
    buffer.seek(0)
    convnet(seed=5).load_state_dict(torch.load(buffer, weights_only=True))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("training", MODES, ids=["inference", "training"])
def test_a_parent_module_prefixes_the_keys_and_loads_them(capture, training):
    model = convnet()
    amp = convert(model, capture, torch.bfloat16, training)
    parent = nn.Sequential(amp)
    keys = list(parent.state_dict())
    assert keys == ["0." + k for k in model.state_dict()]
    assert list(parent.state_dict(prefix="module.")) == ["module." + k for k in keys]
    other = convnet(seed=7)
    parent.load_state_dict({"0." + k: v for k, v in other.state_dict().items()})
    out, ref = eval_outputs(amp, other, X)
    assert rel_err(out, ref) <= bound(torch.bfloat16)
    # wrong keys are named the way the user wrote them
    broken = {"0." + k: v for k, v in other.state_dict().items() if k != "fc1.weight"}
    broken["0.extra"] = torch.ones(1)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0\.fc1\.weight"'):
        parent.load_state_dict(broken)
    result = parent.load_state_dict(broken, strict=False)
    assert result.missing_keys == ["0.fc1.weight"] and result.unexpected_keys == ["0.extra"]
    with pytest.raises(RuntimeError, match=r"size mismatch for fc2\.weight"):
        amp.load_state_dict({**other.state_dict(), "fc2.weight": torch.zeros(3, 3)})


@pytest.mark.parametrize("capture", CAPTURES)
def test_training_module_switched_to_eval_keeps_the_keys(capture):
    model = convnet()
    amp = convert(model, capture, torch.float16, True)
    amp.eval()  # the eval graph is swapped in: same keys, same shared tensors
    assert list(amp.state_dict()) == list(model.state_dict())
    assert all(amp.state_dict(keep_vars=True)[k] is v
               for k, v in model.state_dict(keep_vars=True).items())
    other = convnet(seed=7)
    amp.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert rel_err(amp(X), other.eval()(X)) <= bound(torch.float16)
    amp.train()
    assert list(amp.state_dict()) == list(model.state_dict())
    amp.eval().freeze()  # folded now: still the model's keys, and loads refresh the copies
    assert folded(amp) and list(amp.state_dict()) == list(model.state_dict())
    third = convnet(seed=9)
    amp.load_state_dict(third.state_dict())
    with torch.no_grad():
        assert rel_err(amp(X), third.eval()(X)) <= bound(torch.float16)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inference_module_without_its_model_gives_the_low_copies(capture, dtype):
    model = convnet()
    keys = list(model.state_dict())
    amp = convert(model, capture, dtype, False)
    with torch.no_grad():
        before = amp(X)
    watch = weakref.ref(model.fc1.weight)
    del model
    gc.collect()
    assert watch() is None  # rule F2: no fp32 copy of a folded weight kept, not even for this
    state = amp.state_dict()
    assert list(state) == keys
    low = {k for k, v in state.items() if v.dtype == dtype}
    assert {"fc1.weight", "fc2.weight"} <= low
    fresh = convnet(seed=3)
    fresh.load_state_dict(state)  # upcast into an fp32 model, strictly
    out, ref = eval_outputs(amp, fresh, X)
    assert torch.equal(out, before) and rel_err(out, ref) <= bound(dtype)
    # loading casts straight into the copies: the module computes with the new weights
    other = convnet(seed=7)
    amp.load_state_dict(other.state_dict())
    out, ref = eval_outputs(amp, other, X)
    assert rel_err(out, ref) <= bound(dtype)
    assert torch.equal(amp.state_dict()["fc1.weight"], other.fc1.weight.detach().to(dtype))


@pytest.mark.parametrize("capture", CAPTURES)
def test_folded_module_copies_load_and_refresh(capture):
    """The LSTM's folded copy is a whole low-precision module (rule F3): keys and loads still
    go by the user's names."""
    model, inputs = build("lstm", "tiny")
    amp = ac.convert(model.eval(), inputs if capture == "export" else None, dtype=torch.float16,
                     training=False)
    assert list(amp.state_dict()) == list(model.state_dict())
    other, _ = build("lstm", "tiny")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    amp.load_state_dict(other.state_dict())
    out, ref = eval_outputs(amp, other, *inputs)
    assert rel_err(out, ref) <= bound(torch.float16)
    twin, _ = build("lstm", "tiny")
    twin.load_state_dict(amp.state_dict())
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in other.state_dict().items())


class Tied(nn.Module):
    """A tied head (one tensor, two keys) and a layer forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight
        self.unused = nn.Linear(2, 2)

    def forward(self, idx):
        return self.head(torch.relu(self.body(self.emb(idx))))


def test_amp_module_takes_the_model_for_keys_the_graph_does_not_hold():
    """fx keeps only what forward reads: an unused layer and the second name of a tied weight
    are not in the graph module. Given the model, AmpModule keeps its exact keys."""
    from amp_compiler.module import AmpModule

    torch.manual_seed(0)
    model = Tied().eval()
    amp = ac.convert(model, dtype=torch.bfloat16, training=False)
    def wrap(model):
        return AmpModule(amp.graph_module, amp.plan, dataflow=amp._dataflow, casts=amp._casts,
                         low_dtype=amp.low_dtype, training=False, folded=True, source=amp.source,
                         model=model)

    assert set(wrap(None).state_dict()) < set(model.state_dict())  # what the graph alone tells
    assert list(amp.state_dict()) == list(model.state_dict())  # convert() passes the model
    whole = wrap(model)
    assert list(whole.state_dict()) == list(model.state_dict())
    torch.manual_seed(1)
    other = Tied()
    whole.load_state_dict(other.state_dict())
    idx = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        assert rel_err(whole(idx), other.eval()(idx)) <= bound(torch.bfloat16)
    twin = Tied()
    twin.load_state_dict(whole.state_dict())
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in other.state_dict().items())


def test_a_checkpoint_with_the_graph_module_keys_still_loads():
    """``amp.state_dict()`` used to give ``graph_module.*`` keys (and ``_amp_*`` copies):
    checkpoints written then load as they were written."""
    amp = convert(convnet(), "fx", torch.float16, False)
    other = convert(convnet(seed=7), "fx", torch.float16, False)
    old = {"graph_module." + k: v for k, v in other.graph_module.state_dict().items()}
    amp.load_state_dict(old)
    with torch.no_grad():
        assert torch.equal(amp.eval()(X), other.eval()(X))


@pytest.mark.parametrize("training", MODES, ids=["inference", "training"])
def test_fx_conversion_keeps_unused_and_tied_keys(training):
    torch.manual_seed(0)
    model = Tied().train(training)
    amp = ac.convert(model, dtype=torch.bfloat16, training=training)
    assert list(amp.state_dict()) == list(model.state_dict())


# -- 2. stale weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_changed_in_place_are_refolded_at_the_next_call(capture, dtype, caplog):
    model = convnet().eval()
    amp = convert(model, capture, dtype, False)
    with torch.no_grad():
        before = amp(X)
        model.fc2.weight.mul_(2)  # what an optimizer step or a manual edit does
        model.fc1.bias.add_(0.25)
    with caplog.at_level(logging.INFO, logger="amp_compiler"), torch.no_grad():
        out = amp(X)
        amp(X)
        model.fc2.weight.mul_(0.5)
        out2 = amp(X)
        ref2 = model(X)
    with torch.no_grad():
        model.fc2.weight.mul_(2)
        ref = model(X)
    assert not torch.equal(out, before)
    assert rel_err(out, ref) <= bound(dtype)
    assert rel_err(out2, ref2) <= bound(dtype)
    told = [r for r in caplog.records if "refolded" in r.getMessage()]
    assert len(told) == 1 and "2 low-precision weight copies" in told[0].getMessage()


@pytest.mark.parametrize("capture", CAPTURES)
def test_replaced_data_needs_refresh(capture):
    """``w.data = new`` swaps the storage without moving the version counter: the module cannot
    notice, and ``refresh()`` (documented) refolds everything from the live originals."""
    model = convnet().eval()
    amp = convert(model, capture, torch.float16, False)
    with torch.no_grad():
        before = amp(X)
    model.fc2.weight.data = torch.randn_like(model.fc2.weight)
    with torch.no_grad():
        assert torch.equal(amp(X), before)  # not noticed, as documented
        assert amp.refresh() == len(folded(amp)) > 0
        assert rel_err(amp(X), model(X)) <= bound(torch.float16)
    # once the model is gone there is nothing to refold from
    del model
    gc.collect()
    assert amp.refresh() == 0


def test_training_module_has_nothing_to_refresh():
    model = convnet()
    amp = convert(model, "fx", torch.bfloat16, True)
    assert amp.refresh() == 0 and not folded(amp)


# -- 3. precision is the plan's ------------------------------------------------------------------

DTYPE_CALLS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "float": lambda m: m.float(),
    "double": lambda m: m.double(),
    "to(dtype)": lambda m: m.to(torch.float16),
    "to(dtype=)": lambda m: m.to(dtype=torch.float64),
    "to(device, dtype)": lambda m: m.to("cpu", torch.bfloat16),
    "to(tensor)": lambda m: m.to(torch.zeros(1, dtype=torch.float16)),
    "type": lambda m: m.type(torch.float16),
}


@pytest.mark.parametrize("call", DTYPE_CALLS)
@pytest.mark.parametrize("training", MODES, ids=["inference", "training"])
def test_dtype_methods_raise_and_touch_no_weight(call, training):
    model = convnet()
    amp = convert(model, "fx", torch.bfloat16, training)
    user = snapshot(model)
    own = {k: (v.dtype, v.clone()) for k, v in amp.graph_module.state_dict().items()}
    with pytest.raises(UnsupportedOperationError,
                       match=r"precision is set by its plan.*amp_compiler\.convert\(model, dtype="):
        DTYPE_CALLS[call](amp)
    assert isinstance(UnsupportedOperationError("x"), ac.AmpCompilerError)
    assert_unchanged(model, user)
    now = amp.graph_module.state_dict()
    assert {k: v.dtype for k, v in now.items()} == {k: d for k, (d, _) in own.items()}
    assert all(torch.equal(now[k], v) for k, (_, v) in own.items())


@pytest.mark.parametrize("training", MODES, ids=["inference", "training"])
def test_device_moves_keep_working(training):
    model = convnet()
    amp = convert(model, "export", torch.float16, training)
    out, _ = eval_outputs(amp, model, X)
    for move in (lambda m: m.to("cpu"), lambda m: m.cpu(), lambda m: m.to(torch.device("cpu")),
                 lambda m: m.to(device="cpu", non_blocking=True), lambda m: m.to(X)):
        assert move(amp) is amp
    again, _ = eval_outputs(amp, model, X)
    assert torch.equal(again, out)
    if training:
        amp.eval()  # the other mode's graph is moved too (device moves reach _other_modes)
        amp.cpu()
        amp.train()


# -- 4. pickling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("training", MODES, ids=["inference", "training"])
def test_pickling_fails_at_once_naming_save(capture, training):
    amp = convert(convnet(), capture, torch.float16, training)
    buffer = io.BytesIO()
    with pytest.raises(UnsupportedOperationError, match=r"amp_compiler\.save\(amp, path\)"):
        torch.save(amp, buffer)
    with pytest.raises(UnsupportedOperationError, match="cannot be pickled"):
        pickle.dumps(nn.Sequential(amp))
    # copies still work: shallow shares everything, deep copies the weights
    assert copy.copy(amp).graph_module is amp.graph_module
    twin = copy.deepcopy(amp)
    assert list(twin.state_dict()) == list(amp.state_dict())


# -- Hugging Face GPT-2 -------------------------------------------------------------------------

def gpt2(seed: int):
    T = pytest.importorskip("transformers", reason="pip install transformers")
    torch.manual_seed(seed)
    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                          n_positions=64, bos_token_id=1, eos_token_id=2,
                                          pad_token_id=0))


IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("training", MODES, ids=["inference", "training"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt2_checkpoints(training, dtype):
    model = gpt2(0).train(training)
    batch = {"input_ids": IDS, "labels": IDS}
    amp = ac.convert(model, example_kwargs=batch, dtype=dtype, training=training)
    # the tied LM head is listed under both of its names, as the model lists it
    assert list(amp.state_dict()) == list(model.state_dict())
    assert "lm_head.weight" in amp.state_dict()
    other = gpt2(1)
    amp.load_state_dict(other.state_dict())
    amp.eval()
    other.eval()
    with torch.no_grad():
        ref = other(input_ids=IDS).logits
        out = amp(**batch).logits
        assert rel_err(out, ref) <= bound(dtype)
        if not training:
            # the folded copies' originals are the user's tensors (the load wrote them): an
            # in-place change to the tied head / embedding is refolded at the next call
            assert torch.equal(model.lm_head.weight, other.lm_head.weight)
            model.eval().lm_head.weight.mul_(1.5)
            assert rel_err(amp(**batch).logits, model(input_ids=IDS).logits) <= bound(dtype)
            assert rel_err(amp(**batch).logits, ref) > 0.1
    fresh = gpt2(2)
    fresh.load_state_dict(amp.state_dict())
    # the values amp holds: the loaded checkpoint (then, for inference, the head scaled)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in amp.state_dict().items())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in other.state_dict().items()
               if training or k not in ("lm_head.weight", "transformer.wte.weight"))
    with pytest.raises(UnsupportedOperationError):
        amp.half()
