"""``convert_onnx`` on the files users have: dynamo exports (opset 18, batch dynamic) of Hugging
Face GPT-2, BERT (with a padded ``attention_mask``) and Llama, default architecture and attention
implementation, eval mode, 2 layers of width 64), against onnxconverter-common
and NVIDIA ModelOpt AutoCast on the same file, in ONNX Runtime's CPU provider.

What is asserted, per model:
- the attention runs low with no Cast (rule O6 clamps the ``finfo.min`` mask, R5 keeps the Softmax
  low), GPT-2's tanh GELU too (O7): no Cast reads or feeds a Softmax, Pow or Tanh;
- the float Casts left are the borders of the fp32 residual stream (4 per layer) plus at most 4:
  the looked-up rows up, the mask down (once), the head's input down, the output up;
- error vs torch fp32 below onnxconverter-common's and ModelOpt's, on a batch other than the
  exported one;
- the file is no larger than onnxconverter-common's plus 5% where the embedding table is tied
  (GPT-2: O8 stores it once), and with ``embedding_tables="low"`` for every model.

The hand-built graphs check the rules' limits: a mask that reaches something other than a
Softmax is not clamped (O4 keeps its reader fp32), a cube that does not feed a Tanh stays R2.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxconverter_common import float16 as occ

from amp_compiler.bench.onnx_files import Positional, _batch_of, export_fp32
from amp_compiler.errors import ConfigError
from amp_compiler.onnx.convert import convert_onnx

LAYERS = 2  # the suite's tiny configurations
F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def _library_model(name: str) -> tuple[torch.nn.Module, tuple]:
    """Default-architecture configs, 2 layers of width 64 and a vocabulary of 1000 (its table
    64000 values: a real table, beyond cast placement's small-initializer limit)."""
    import transformers as T

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, 32), generator=g)
    text = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64)
    if name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=1000, n_embd=64, n_layer=LAYERS, n_head=4,
                                               n_positions=64, bos_token_id=0, eos_token_id=0))
        return Positional(model.eval(), ("input_ids",)), (ids,)
    if name == "bert":
        mask = torch.ones_like(ids)
        mask[-1, 16:] = 0  # padding: the mask matters
        model = T.BertForSequenceClassification(T.BertConfig(**text))
        return Positional(model.eval(), ("input_ids", "attention_mask")), (ids, mask)
    model = T.LlamaForCausalLM(T.LlamaConfig(**text, num_key_value_heads=2))
    return Positional(model.eval(), ("input_ids",)), (ids,)


@pytest.fixture(scope="module")
def files():
    out = {}
    for name in ("gpt2", "bert", "llama"):
        model, inputs = _library_model(name)
        out[name] = (model, inputs, export_fp32(model, inputs, dynamo=True))
    return out


def _run(model: onnx.ModelProto, inputs, ort_no_crash) -> np.ndarray:
    import onnxruntime as ort

    ort_no_crash(model, inputs)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: a.numpy() for i, a in zip(s.get_inputs(), inputs)})[0]


def _rel(out: np.ndarray, ref: torch.Tensor) -> float:
    out, ref = np.asarray(out, np.float64), ref.double().numpy()
    return float(np.abs(out - ref).max() / np.abs(ref).max()) if np.isfinite(out).all() else float("inf")


def _casts(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == "Cast"]


def _modelopt(source: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    from modelopt.onnx.autocast import convert_to_mixed_precision

    path = tmp_path / "fp32.onnx"
    onnx.save(source, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_to_mixed_precision(str(path), keep_io_types=True)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_attention_and_gelu_run_low_and_only_the_residual_stream_casts(name, files):
    _, _, source = files[name]
    ours, plan = convert_onnx(source, return_plan=True)
    onnx.checker.check_model(ours, full_check=True)
    g = ours.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for v in n.input:
            readers.setdefault(v, []).append(n)
    for c in _casts(ours):
        before = producer.get(c.input[0])
        assert before is None or before.op_type not in ("Softmax", "Pow", "Tanh"), before.name
        assert all(r.op_type not in ("Softmax", "Pow", "Tanh") for r in readers.get(c.output[0], []))
    softmax = [n.name for n in g.node if n.op_type == "Softmax"]
    assert softmax and all(plan[s].precision == torch.float16 for s in softmax)
    masks = [d for d in plan.values() if d.rule == "O6:mask"]
    assert len(masks) >= 1 and all("clamped to -65504" in d.reason for d in masks)
    if name == "gpt2":
        cubes = [d for d in plan.values() if d.rule == "O7:gelu-cube"]
        assert len(cubes) == LAYERS and all(d.precision == torch.float16 for d in cubes)
    float_casts = [c for c in _casts(ours) if c.attribute[0].i in (F16, F32)]
    assert len(float_casts) <= 4 * LAYERS + 4


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_error_below_onnxconverter_common_and_modelopt_at_other_batches(name, files, tmp_path, ort_no_crash):
    """Mean over four batches of 16 (exported at 4: the batch is dynamic) of the max relative
    error: one batch's maximum over BERT's 2 logits a row is too noisy to rank converters."""
    pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt is a dev dependency")
    model, inputs, source = files[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = {"ours": convert_onnx(source),
                     "onnxconverter-common": occ.convert_float_to_float16(source, keep_io_types=True),
                     "ModelOpt": _modelopt(source, tmp_path)}
    g = torch.Generator().manual_seed(1)
    errors: dict[str, list[float]] = {k: [] for k in converted}
    for _ in range(4):
        batch = tuple(torch.randint(0, 1000, (16, 32), generator=g) if i == 0 else t
                      for i, t in enumerate(_batch_of(inputs, 16)))
        with torch.no_grad():
            ref = model(*batch).float()
        for k, m in converted.items():
            errors[k].append(_rel(_run(m, batch, ort_no_crash), ref))
    mean = {k: float(np.mean(v)) for k, v in errors.items()}
    print(f"\n{name}: mean max rel error " + ", ".join(f"{k} {v:.3e}" for k, v in mean.items()))
    assert 0 < mean["ours"] < 2.0 ** -10
    assert mean["ours"] < 0.95 * min(mean["onnxconverter-common"], mean["ModelOpt"])


def test_a_tied_table_is_stored_once_in_float16(files):
    """GPT-2's input embedding and LM head share one table (O8 "shared", the default): one fp16
    initializer of the vocabulary's shape, no fp32 copy; the file is onnxconverter-common's
    size within 5%. ``embedding_tables="fp32"`` stores it twice (the earlier behaviour)."""
    _, _, source = files["gpt2"]
    vocab = next(t for t in source.graph.initializer if "lm_head" in t.name or "wte" in t.name)

    def tables(m):
        return [t for t in m.graph.initializer if list(t.dims) == list(vocab.dims)]

    ours, plan = convert_onnx(source, return_plan=True)
    assert [t.data_type for t in tables(ours)] == [F16]
    lookup = [d for d in plan.values() if d.rule == "O8:low-table"]
    assert len(lookup) == 1 and "also read by" in lookup[0].reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = occ.convert_float_to_float16(source, keep_io_types=True)
    assert len(ours.SerializeToString()) <= 1.05 * len(theirs.SerializeToString())
    twice = convert_onnx(source, embedding_tables="fp32")
    assert sorted(t.data_type for t in tables(twice)) == sorted([F16, F32])
    assert len(twice.SerializeToString()) > len(ours.SerializeToString())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_low_embedding_tables_shrink_the_file_at_one_rounding(name, files, ort_no_crash):
    """``embedding_tables="low"``: every Gather table fp16, the file within 5% of
    onnxconverter-common's, the error at most one fp16 rounding away from the default's."""
    model, inputs, source = files[name]
    with torch.no_grad():
        ref = model(*inputs).float()
    default = convert_onnx(source)
    low = convert_onnx(source, embedding_tables="low")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = occ.convert_float_to_float16(source, keep_io_types=True)
    assert len(low.SerializeToString()) <= 1.05 * len(theirs.SerializeToString())
    assert len(low.SerializeToString()) < len(default.SerializeToString())
    big = [t for t in low.graph.initializer if np.prod(t.dims) >= 1000 * 64]
    assert big and all(t.data_type == F16 for t in big)
    e_default, e_low = _rel(_run(default, inputs, ort_no_crash), ref), _rel(_run(low, inputs, ort_no_crash), ref)
    assert e_default <= e_low < e_default + 2.0 ** -11


def test_embedding_tables_takes_three_values():
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                            [helper.make_tensor_value_info("x", F32, [2])],
                                            [helper.make_tensor_value_info("y", F32, [2])]))
    with pytest.raises(ConfigError, match="embedding_tables must be one of 'shared', 'low', 'fp32'"):
        convert_onnx(m, embedding_tables="half")


# -- the rules' limits, on hand-built graphs ----------------------------------------------------------

def _graph(nodes, inits, shape=(2, 4)):
    x = helper.make_tensor_value_info("x", F32, list(shape))
    y = helper.make_tensor_value_info("y", F32, list(shape))
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                             opset_imports=[helper.make_opsetid("", 18)])


def _scores(nodes_after, mask_values):
    """x @ w (low) + mask, then ``nodes_after`` making y."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    mask = numpy_helper.from_array(np.array(mask_values, np.float32), "mask")
    return _graph([helper.make_node("MatMul", ["x", "w"], ["s"]),
                   helper.make_node("Add", ["s", "mask"], ["m"]), *nodes_after], [w, mask])


def test_o6_clamps_a_softmax_mask_exactly(ort_no_crash):
    fmin = float(np.finfo(np.float32).min)
    model = _scores([helper.make_node("Softmax", ["m"], ["p"], axis=-1),
                     helper.make_node("MatMul", ["p", "w"], ["y"])],
                    [[0, 0, fmin, fmin], [0, fmin, fmin, fmin]])
    ours, plan = convert_onnx(model, return_plan=True)
    assert plan["Add_1"].rule == "O6:mask" and plan["Add_1"].precision == torch.float16
    x = torch.randn(2, 4)
    ref = _run(model, (x,), ort_no_crash)
    out = _run(ours, (x,), ort_no_crash)
    assert (out[:, 2:] == 0).all() and (ref[:, 2:] == 0).all()  # masked weights exactly 0
    np.testing.assert_allclose(out, ref, rtol=2.0 ** -10, atol=2.0 ** -12)


def test_o6_leaves_a_mask_that_reaches_something_else_to_o4(ort_no_crash):
    fmin = float(np.finfo(np.float32).min)
    model = _scores([helper.make_node("Relu", ["m"], ["y"])], [[0, 0, fmin, fmin], [0, fmin, fmin, fmin]])
    _, plan = convert_onnx(model, return_plan=True)
    assert plan["Add_1"].rule == "O4:init-range" and plan["Add_1"].precision == torch.float32
    # a positive value beyond float16's range is not a mask fill either
    model = _scores([helper.make_node("Softmax", ["m"], ["y"], axis=-1)], [[0, 0, 1e6, fmin], [0] * 4])
    _, plan = convert_onnx(model, return_plan=True)
    assert plan["Add_1"].rule == "O4:init-range"


def _gelu_tanh(tail: bool):
    """0.5 x (1 + tanh(0.7978845608 (x + 0.044715 x^3))) over x @ w; ``tail``: the cube also
    leaves the chain (an output of its own), so it no longer only feeds the Tanh."""
    c = {k: numpy_helper.from_array(np.array(v, np.float32), k)
         for k, v in {"three": 3.0, "k": 0.044715, "s": 0.7978845608, "one": 1.0, "half": 0.5}.items()}
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Pow", ["h", "three"], ["h3"]),
             helper.make_node("Mul", ["h3", "k"], ["a"]), helper.make_node("Add", ["h", "a"], ["b"]),
             helper.make_node("Mul", ["b", "s"], ["t0"]), helper.make_node("Tanh", ["t0"], ["t"]),
             helper.make_node("Add", ["t", "one"], ["u"]), helper.make_node("Mul", ["h", "half"], ["v"]),
             helper.make_node("Mul", ["v", "u"], ["g"]), helper.make_node("MatMul", ["g", "w"], ["y"])]
    if tail:
        nodes.append(helper.make_node("Mul", ["h3", "half"], ["y3"]))
    m = _graph(nodes, [w, *c.values()])
    if tail:
        m.graph.output.append(helper.make_tensor_value_info("y3", F32, [2, 4]))
    return m


def test_o7_the_gelu_cube_runs_low_and_its_overflow_is_the_exact_limit(ort_no_crash):
    model = _gelu_tanh(tail=False)
    ours, plan = convert_onnx(model, return_plan=True)
    pow_ = next(n.name for n in ours.graph.node if n.op_type == "Pow")
    assert plan[pow_].rule == "O7:gelu-cube" and plan[pow_].precision == torch.float16
    assert len(_casts(ours)) == 2  # the graph's input and output only
    x = torch.tensor([[-300.0, -50.0, 0.5, 50.0], [300.0, -1.0, 2.0, 41.0]])  # 41^3 > 65504
    ref, out = _run(model, (x,), ort_no_crash), _run(ours, (x,), ort_no_crash)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=2.0 ** -9, atol=2.0 ** -12)


def test_o7_a_cube_read_elsewhere_stays_fp32():
    _, plan = convert_onnx(_gelu_tanh(tail=True), return_plan=True)
    pow_ = next(k for k, d in plan.items() if d.kind == "pow")
    assert plan[pow_].rule == "R2:deny" and plan[pow_].precision == torch.float32


def _rotary(scale: float):
    """(x @ w) * table @ w, table = Cos(inv_freq * positions) * scale: computed from
    initializers only, as HF Llama's rotary phases are in a static export."""
    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
             numpy_helper.from_array(np.linspace(0.1, 1.0, 4, dtype=np.float32), "inv_freq"),
             numpy_helper.from_array(np.array([[0.0], [1.0]], np.float32), "pos"),
             numpy_helper.from_array(np.array(scale, np.float32), "scale")]
    return _graph([helper.make_node("Mul", ["pos", "inv_freq"], ["phase"]),
                   helper.make_node("Cos", ["phase"], ["cos"]),
                   helper.make_node("Mul", ["cos", "scale"], ["table"]),
                   helper.make_node("MatMul", ["x", "w"], ["h"]),
                   helper.make_node("Mul", ["h", "table"], ["r"]),
                   helper.make_node("MatMul", ["r", "w"], ["y"])], inits)


def test_o10_a_table_computed_from_initializers_does_not_hold_its_readers_fp32(ort_no_crash):
    model = _rotary(1.0)
    ours, plan = convert_onnx(model, return_plan=True)
    cos = next(n.name for n in ours.graph.node if n.op_type == "Cos")
    assert plan[cos].rule == "O10:constant-table" and "max|x| 1 " in plan[cos].reason
    rotate = next(k for k, d in plan.items() if d.kind == "mul" and d.precision == torch.float16)
    assert plan[rotate].rule == "R3:between-low"
    assert len(_casts(ours)) == 3  # input down, output up, the table down once
    x = torch.randn(2, 4)
    np.testing.assert_allclose(_run(ours, (x,), ort_no_crash), _run(model, (x,), ort_no_crash),
                               rtol=2.0 ** -9, atol=2.0 ** -11)


def test_o10_leaves_a_table_beyond_the_low_range_and_a_moved_weight_alone():
    big, plan = convert_onnx(_rotary(1e5), return_plan=True)  # 1e5 > 65504 / 4
    table = next(n.name for n in big.graph.node if n.output[0] == "table")
    assert plan[table].rule != "O10:constant-table"  # the phases and their Cos still are (max 1)
    reader = next(k for k, d in plan.items() if d.rule == "R3:fp32-input")
    assert plan[reader].kind == "mul" and plan[reader].precision == torch.float32
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    moved = _graph([helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])], [w])
    ours, plan = convert_onnx(moved, return_plan=True)
    assert not [d for d in plan.values() if d.rule.startswith("O10")]
    assert [t.data_type for t in ours.graph.initializer] == [F16]  # W4 stores the weight low
