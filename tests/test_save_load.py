"""amp_compiler.save / amp_compiler.load: one file with the plan, the weights and the loss scaler
state, read back into a fresh model of the same architecture.

- round trips: a small nn.Module captured by fx (no examples) and by torch.export, a Hugging
  Face GPT-2 (default config at tiny sizes, default attention and dropout) trained in float16
  and run for inference in bfloat16; the loaded module has the saved plan (the same JSON), the
  saved weights (a fresh model with other random weights receives them, tied names stay
  tied), the saved loss scale and growth tracker, and gives the original's outputs;
- without ``safetensors`` the weights are ``torch.save``d and read with ``weights_only=True``;
- the write is atomic: a failure mid-write leaves the previous file (or none) and no
  temporary files;
- typed, actionable errors: missing file, not our file, newer format, dtype mismatch, another
  architecture, a plan that does not match the graph, a TorchDynamo-captured module.

Outputs are compared bitwise (``torch.equal``): the loaded module runs the same graph with the
same casts on the same weights and the same kernels in the same process (one thread), and the
dropout masks come from the same seed, so every bit is reproduced; any difference would mean a
different plan, cast or weight, which a tolerance would hide.

    python -m pytest -q tests/test_save_load.py
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings
import zipfile

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import amp_compiler as ac  # noqa: E402
import amp_compiler.loading as loading  # noqa: E402
import amp_compiler.saving as saving  # noqa: E402
from amp_compiler.errors import ConfigError, SavedFileError  # noqa: E402

T = pytest.importorskip("transformers", reason="pip install transformers (nothing is downloaded)")


# -- models -------------------------------------------------------------------------------------

class Small(nn.Module):
    """fx-traceable; LayerNorm and a residual so the plan has fp32_acc and infer decisions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 8)
        self.register_buffer("offset", torch.randn(8))

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x)))) + x + self.offset


class OtherForward(Small):
    """Same weights as Small, another graph: a saved plan of Small does not fit it."""

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x))) + self.offset


def _gpt2_config():
    return T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)


def _gpt2(seed: int, config=None) -> nn.Module:
    torch.manual_seed(seed)
    return T.GPT2LMHeadModel(config or _gpt2_config())


def _ids(seed: int, b: int = 2, t: int = 8) -> torch.Tensor:
    return torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(seed))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' config notes and torch.export's
        return fn(*args, **kwargs)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def gpt2_train():
    """GPT-2 trained in float16 for a step, its scale moved off the default."""
    model = _gpt2(0).train()
    ids = _ids(0)
    # labels are the ids themselves, the same tensor, as many training loops pass them
    amp = _quiet(ac.convert, model, example_kwargs={"input_ids": ids, "labels": ids},
                 dtype="float16", training=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp(input_ids=ids, labels=ids).loss.backward()
    amp.scaler.step(opt)
    amp.scaler.update()
    opt.zero_grad()
    amp.scaler.update(2.0 ** 10)  # as overflow backoffs would: not the default 2**16
    return model, amp


@pytest.fixture(scope="module")
def gpt2_infer():
    model = _gpt2(1).eval()
    ids = _ids(1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    amp = _quiet(ac.convert, model, example_kwargs=batch, dtype="bfloat16", training=False)
    return model, amp, batch


# -- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["inference-bf16", "training-fp16"])
def test_fx_module_round_trip_needs_no_examples(tmp_path, training):
    torch.manual_seed(0)
    model = Small()
    dtype = "float16" if training else "bfloat16"
    amp = ac.convert(model, dtype=dtype, training=training)
    assert amp.source == "fx"
    path = ac.save(amp, tmp_path / "small.amp")
    torch.manual_seed(1)
    fresh = Small()
    assert not _same_state(fresh, model)

    loaded = ac.load(path, fresh)

    assert loaded.plan.to_json() == amp.plan.to_json()
    assert loaded.source == "fx" and loaded.training == training and loaded.folded == (not training)
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), amp(x))
    if training:  # fp32 master weights: the fresh model now holds exactly the original's
        assert _same_state(fresh, model)
    manifest, _, _ = loading.read(path)
    assert manifest["capture"] == "fx" and manifest["inputs"] is None
    assert manifest["model_class"] == "Small"


def test_export_module_round_trip_rebuilds_positional_examples(tmp_path):
    torch.manual_seed(0)
    model = Small()
    x = torch.randn(3, 8)
    amp = _quiet(ac.convert, model, (x,), dtype="bfloat16", training=True)
    path = ac.save(amp, tmp_path / "small.amp")
    manifest, _, _ = loading.read(path)
    assert manifest["inputs"] == {"args": [{"shape": [3, 8], "dtype": "float32", "input": 0}],
                                  "kwargs": {}}
    torch.manual_seed(5)
    fresh = Small()
    loaded = _quiet(ac.load, path, fresh)
    assert loaded.source == "export"
    assert loaded.plan.to_json() == amp.plan.to_json()
    assert _same_state(fresh, model)
    assert torch.equal(loaded(torch.ones(5, 8)), amp(torch.ones(5, 8)))  # batch still dynamic


def test_training_module_saved_in_eval_mode_loads_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = Small()
    amp = ac.convert(model, dtype="float16", training=True)
    amp.eval()  # validation between training steps
    path = ac.save(amp, tmp_path / "small.amp")
    manifest, plan, _ = loading.read(path)
    assert manifest["training"] is True and manifest["mode"] == "eval"
    loaded = ac.load(path, Small())
    assert not loaded.training and not loaded.folded
    x = torch.randn(2, 8)
    assert torch.equal(loaded(x), amp(x))
    loaded.train()
    amp.train()
    assert loaded.plan.to_json() == amp.plan.to_json() == plan.to_json()


def test_gpt2_training_fp16_round_trip(tmp_path, gpt2_train):
    model, amp = gpt2_train
    path = ac.save(amp, tmp_path / "gpt2.amp")
    fresh = _gpt2(7).train()
    assert not _same_state(fresh, model)

    loaded = _quiet(ac.load, path, fresh)

    # the same decisions
    assert loaded.plan.to_json() == amp.plan.to_json()
    # the saved fp32 master weights, tied names tied again (they are the same Parameter)
    assert _same_state(fresh, model)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    # the scaler: the moved scale and growth tracker, not a fresh scaler's 2**16
    assert amp.scaler.get_scale() == 2.0 ** 10
    assert loaded.scaler.state_dict() == amp.scaler.state_dict()
    assert loaded.scaler.get_scale() == 2.0 ** 10
    # the same outputs (dropout on: the same seed draws the same masks) and gradients
    ids = _ids(3, 3, 11)  # another batch size and sequence length
    torch.manual_seed(123)
    ours = loaded(input_ids=ids, labels=ids)
    torch.manual_seed(123)
    theirs = amp(input_ids=ids, labels=ids)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)
    ours.loss.backward()
    theirs.loss.backward()
    try:
        for (name, p), q in zip(fresh.named_parameters(), model.parameters()):
            assert torch.equal(p.grad, q.grad), name
    finally:
        fresh.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
    manifest, _, weights = loading.read(path)
    assert manifest["model_class"] == "GPT2LMHeadModel"
    assert manifest["weights"]["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert weights["lm_head.weight"] is weights["transformer.wte.weight"]
    # the example inputs: the same tensor twice, said so (a re-capture needs it: see saving)
    kwargs = manifest["inputs"]["kwargs"]
    assert kwargs["input_ids"] == {"shape": [2, 8], "dtype": "int64", "input": 0}
    assert kwargs["labels"] == {"shape": [2, 8], "dtype": "int64", "input": 1, "same_as": 0}


def test_gpt2_inference_bf16_round_trip(tmp_path, gpt2_infer):
    model, amp, batch = gpt2_infer
    path = ac.save(amp, tmp_path / "gpt2.amp")
    fresh = _gpt2(8).eval()
    loaded = _quiet(ac.load, path, fresh)
    assert loaded.plan.to_json() == amp.plan.to_json()
    assert loaded.folded and not loaded.training and loaded.scaler is None
    assert torch.equal(loaded(**batch).logits, amp(**batch).logits)
    ids = _ids(4, 1, 5)
    other = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(loaded(**other).logits, amp(**other).logits)
    # the weights the module computes from: the model's fp32 tensors (alive here), received
    _, _, weights = loading.read(path)
    assert _same_state(fresh, model)
    assert all(torch.equal(weights[k], t) for k, t in model.state_dict().items())


def test_inference_module_without_its_model_saves_the_folded_copies(tmp_path):
    model = _gpt2(2).eval()
    ids = _ids(2)
    amp = _quiet(ac.convert, model, example_kwargs={"input_ids": ids}, dtype="bfloat16",
                 training=False)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    del model  # the fp32 originals of the folded weights are gone; the bf16 copies remain
    gc.collect()
    path = ac.save(amp, tmp_path / "gpt2.amp")
    _, _, weights = loading.read(path)
    low = {k for k, t in weights.items() if t.dtype == torch.bfloat16}
    assert low and all(k.endswith(("weight", "bias")) for k in low)
    assert all(torch.equal(t, original[k].to(t.dtype)) for k, t in weights.items())
    fresh = _gpt2(3).eval()
    loaded = _quiet(ac.load, path, fresh)
    # the model receives the copies upcast; folding them again gives the same bits
    assert torch.equal(loaded(input_ids=ids).logits, amp(input_ids=ids).logits)
    assert loaded.plan.to_json() == amp.plan.to_json()


def test_either_state_dict_key_format_saves_the_same_weights(tmp_path, monkeypatch, gpt2_train):
    """AmpModule.state_dict() keys: the user model's own, or the graph module's prefixed with
    ``graph_module.`` (nn.Module's default, as earlier versions gave): the same file."""
    from amp_compiler.module import AmpModule

    _, amp = gpt2_train
    first = loading.read(ac.save(amp, tmp_path / "a.amp"))[2]
    monkeypatch.setattr(AmpModule, "state_dict", nn.Module.state_dict)  # the graph module's keys
    assert all(k.startswith("graph_module.") for k in amp.state_dict())
    second = loading.read(ac.save(amp, tmp_path / "b.amp"))[2]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_user_examples_replace_the_rebuilt_ones(tmp_path, gpt2_infer):
    _, amp, _ = gpt2_infer
    path = ac.save(amp, tmp_path / "gpt2.amp")
    ids = _ids(9, 2, 8)
    loaded = _quiet(ac.load, path, _gpt2(9).eval(),
                    example_kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert loaded.plan.to_json() == amp.plan.to_json()


def test_weights_only_torch_file_without_safetensors(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Small()
    amp = ac.convert(model, dtype="float16", training=True)
    with_st = ac.save(amp, tmp_path / "st.amp")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    path = ac.save(amp, tmp_path / "pt.amp")
    with zipfile.ZipFile(path) as zf:
        assert "weights.pt" in zf.namelist() and "weights.safetensors" not in zf.namelist()
        assert json.loads(zf.read("manifest.json"))["weights"]["format"] == "torch"
        zf.extract("weights.pt", tmp_path)
    plain = torch.load(tmp_path / "weights.pt", weights_only=True)  # tensors only, no code
    assert plain.keys() == model.state_dict().keys()
    fresh = Small()
    loaded = ac.load(path, fresh)
    assert _same_state(fresh, model)
    x = torch.randn(2, 8)
    assert torch.equal(loaded(x), amp(x))
    # a safetensors file needs the package: said so
    with pytest.raises(SavedFileError, match="pip install safetensors"):
        ac.load(with_st, Small())


# -- atomic write -------------------------------------------------------------------------------

def test_failed_write_leaves_the_previous_file_and_no_temporaries(tmp_path, monkeypatch):
    torch.manual_seed(0)
    amp = ac.convert(Small(), dtype="float16", training=True)
    path = tmp_path / "small.amp"
    ac.save(amp, path)
    before = path.read_bytes()

    def half_then_fail(zf, tensors, fmt, stage):
        with zf.open("weights.bin", "w") as f:
            f.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "_write_weights", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        ac.save(amp, path)
    assert path.read_bytes() == before
    with pytest.raises(OSError, match="No space"):
        ac.save(amp, tmp_path / "new.amp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.amp"]


def test_saved_file_gets_ordinary_permissions(tmp_path):
    amp = ac.convert(Small(), dtype="float16", training=True)
    path = ac.save(amp, tmp_path / "small.amp")
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not a temporary file's 0600


def test_failed_fsync_leaves_nothing(tmp_path, monkeypatch):
    torch.manual_seed(0)
    amp = ac.convert(Small(), dtype="float16", training=True)

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(saving.os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        ac.save(amp, tmp_path / "small.amp")
    assert list(tmp_path.iterdir()) == []


# -- errors -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    torch.manual_seed(0)
    amp = ac.convert(Small(), dtype="float16", training=True)
    return ac.save(amp, tmp_path_factory.mktemp("saved") / "small.amp")


def _rewrite(src: str, dst, edit) -> None:
    """A copy of ``src`` with its manifest edited."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "manifest.json":
                manifest = json.loads(data)
                edit(manifest)
                data = json.dumps(manifest)
            zout.writestr(name, data)


def test_missing_file(tmp_path):
    with pytest.raises(SavedFileError, match="does not exist"):
        ac.load(tmp_path / "nope.amp", Small())


def test_not_an_amp_compiler_file(tmp_path):
    text = tmp_path / "weights.pt"
    torch.save(Small().state_dict(), text)  # a zip too, but torch's
    with pytest.raises(SavedFileError, match="not a file amp_compiler.save wrote"):
        ac.load(text, Small())
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(SavedFileError, match="not a zip archive"):
        ac.load(junk, Small())
    with pytest.raises(SavedFileError, match="is a folder"):
        ac.load(tmp_path, Small())


def test_newer_format_version(tmp_path, small_file):
    newer = tmp_path / "newer.amp"
    _rewrite(small_file, newer, lambda m: m.update(format_version=99, amp_compiler_version="9.0"))
    with pytest.raises(SavedFileError, match=r"amp_compiler 9\.0 in save format 99.*upgrade"):
        ac.load(newer, Small())


def test_dtype_mismatch(tmp_path, small_file):
    with pytest.raises(ConfigError, match="saved as float16, not bfloat16"):
        ac.load(small_file, Small(), dtype="bfloat16")
    assert ac.load(small_file, Small(), dtype=torch.float16).low_dtype == torch.float16
    # a manifest that disagrees with its own plan
    odd = tmp_path / "odd.amp"
    _rewrite(small_file, odd, lambda m: m.update(dtype="bfloat16"))
    with pytest.raises(SavedFileError, match="manifest says bfloat16, the plan float16"):
        ac.load(odd, Small())


def test_other_architecture_names_the_keys(tmp_path, gpt2_train):
    _, amp = gpt2_train
    path = ac.save(amp, tmp_path / "gpt2.amp")
    deeper = _gpt2(0, T.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(SavedFileError, match=r"missing \('transformer\.h\.2\..*same architecture"):
        ac.load(path, deeper)
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())  # untouched
    with pytest.raises(SavedFileError, match=r"from a GPT2LMHeadModel, this model is a Small"):
        ac.load(path, Small())
    wider = _gpt2(0, T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=120, n_positions=64))
    with pytest.raises(SavedFileError, match=r"another shape \(transformer\.wte\.weight: saved "
                                             r"\(100, 32\), model \(120, 32\)"):
        ac.load(path, wider)


def test_plan_that_does_not_match_the_graph(small_file):
    with pytest.raises(ConfigError, match="saved plan does not match this model's graph"):
        ac.load(small_file, OtherForward())


def test_fx_file_refuses_examples(small_file):
    with pytest.raises(ConfigError, match="fx capture"):
        ac.load(small_file, Small(), example_inputs=(torch.randn(2, 8),))


def test_dynamo_module_cannot_be_saved(tmp_path):
    amp = ac.convert(Small(), capture="dynamo", dtype="bfloat16", training=False)
    with pytest.raises(SavedFileError, match="TorchDynamo"):
        ac.save(amp, tmp_path / "small.amp")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_what_is_not_an_amp_module(tmp_path):
    with pytest.raises(ConfigError, match="AmpModule"):
        ac.save(Small(), tmp_path / "small.amp")
    with pytest.raises(SavedFileError, match="does not exist"):
        ac.save(ac.convert(Small(), dtype="float16"), tmp_path / "no" / "small.amp")
