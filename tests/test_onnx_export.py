"""Tests for ``amp_compiler.onnx.export``: export_onnx, onnx_session and verify_onnx (``.session``).

Every reference model (tiny presets) is converted with example inputs (torch.export front end),
exported, loaded in ONNX Runtime (CPU provider) and compared with the AmpModule.

Tolerance: max relative error (max|ort - ref| / max|ref|) <= 4 * 2**-11 ~= 2e-3. Both sides
compute the same float16 plan, but ONNX Runtime rounds to float16 at different points (it runs
float16 nodes that lack a CPU float16 kernel through float32 and fuses nodes), so the two differ
by a few float16 roundings of the output scale; 2**-11 is float16's unit roundoff. Measured:
3e-4 .. 7.3e-4 across the models.

Every file written is opened and run first in a child ONNX Runtime (conftest ``ort_no_crash``)
before this process opens it: a file that crashes ONNX Runtime fails its test, naming the signal.
"""

from __future__ import annotations

import copy
import os

import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import amp_compiler as ac
from amp_compiler.errors import AmpCompilerError, ConfigError, OnnxError
from amp_compiler.models import build
from amp_compiler.onnx.export import export_onnx
from amp_compiler.onnx.io import OnnxFileExistsError
from amp_compiler.onnx.session import onnx_session, verify_onnx
from amp_compiler.passes.infra import PassResult
from amp_compiler.passes.insert_casts import PROMOTING
from amp_compiler.passes.size_cache import SizeCache

MODELS = ("mlp", "resnet", "gpt", "bert", "lstm", "mf")
TOL = 4 * 2.0 ** -11
MATRIX_OPS = {"MatMul", "Gemm", "Conv", "LSTM"}
_ONNX_OF = {torch.float32: TensorProto.FLOAT, torch.int64: TensorProto.INT64}


@pytest.fixture(scope="module", autouse=True)
def _reuse_exporter_registry():
    """Test speed only: the dynamo exporter rebuilds its torchlib registry (~3 s, independent of
    the model) on every call; these tests export ~15 times, so one registry per opset is kept.
    Nothing here changes what is exported. Does nothing where the private hook is absent."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:
        yield
        return
    original = ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return
    cache: dict = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original.__func__(cls, *args, **kwargs)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(ONNXRegistry, "from_torchlib", classmethod(from_torchlib))
    yield
    mp.undo()


def _eval_model(name: str, **kw):
    model, inputs = build(name, "tiny", **kw)
    return model.eval(), inputs


def _float_casts(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Cast nodes between two float dtypes (the ones the plan put there)."""
    types = _types(model)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    return [n for n in model.graph.node if n.op_type == "Cast" and types.get(n.input[0]) in floats
            and n.attribute[0].i in floats]


def _promoted_operands(amp) -> int:
    """(op, operand) pairs where an fp32 elementwise op reads a low-precision value uncast."""
    plan, n = amp.plan, 0
    for node in amp.graph_module.graph.nodes:
        d = plan.get(node.name)
        if d is None or d.precision != torch.float32 or d.kind not in PROMOTING:
            continue
        n += sum(1 for src in node.all_input_nodes if not src.meta.get("amp_cast")
                 and src.name in plan and plan[src.name].precision == plan.low_dtype)
    return n


def _types(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


@pytest.mark.parametrize("name", MODELS)
def test_export_matches_amp_module(name, tmp_path, ort_no_crash):
    model, inputs = _eval_model(name)
    amp = ac.convert(model, inputs)
    # the casts of a forward, and those the size cache runs once per shape (an LSTM's zero
    # initial state cast low): the exporter traces both
    forward_casts = amp.cast_count()
    casts_before = forward_casts + sum(
        1 for m in amp.graph_module.modules() if isinstance(m, SizeCache)
        for n in m.fn.graph.nodes if n.meta.get("amp_cast"))
    with torch.no_grad():
        before = amp(*inputs)

    path = export_onnx(amp, inputs, tmp_path / f"{name}.onnx")
    assert path == str(tmp_path / f"{name}.onnx") and os.path.isfile(path)
    assert os.listdir(tmp_path) == [f"{name}.onnx"]  # no temporary left behind
    onnx_model = onnx.load(path)
    onnx.checker.check_model(onnx_model, full_check=True)
    ort_no_crash(path, inputs)  # before this process opens it: a crash would end the test run

    # numbers: ORT matches the AmpModule and fp32 within the float16 tolerance, also at another
    # batch size (the batch dimension is dynamic)
    session = onnx_session(path)
    assert session.get_providers()[0] in ("CUDAExecutionProvider", "CPUExecutionProvider")
    vs_amp = verify_onnx(path, amp, inputs, session=session)
    vs_fp32 = verify_onnx(path, model, inputs, session=session)
    _, other_batch = build(name, "tiny", batch=3, seed=4)
    vs_amp_b3 = verify_onnx(path, amp, other_batch, session=session)
    print(f"\nexport {name}: rel err vs AmpModule {vs_amp['max_rel']:.2e} (batch 3: "
          f"{vs_amp_b3['max_rel']:.2e}), vs fp32 {vs_fp32['max_rel']:.2e}")
    assert vs_amp["max_rel"] <= TOL and vs_amp_b3["max_rel"] <= TOL
    assert vs_fp32["max_rel"] <= TOL

    # structure: the plan's casts are explicit Cast nodes, weights are stored float16, once
    g = onnx_model.graph
    casts = _float_casts(onnx_model)
    fp16_inits = [t for t in g.initializer if t.data_type == TensorProto.FLOAT16]
    assert (len(casts) > 0) == (casts_before > 0)
    # exporter CSE may merge equal casts, never add one -- except where insert_casts (I7) left
    # a low operand of an fp32 add/mul to type promotion: ONNX has none, so that is a Cast there
    assert len(casts) <= casts_before + _promoted_operands(amp)
    has_low = bool(amp.plan.low_nodes())
    assert (len(fp16_inits) > 0) == has_low
    blobs = [t.raw_data or numpy_helper.to_array(t).tobytes() for t in fp16_inits]
    assert len(set(zip(blobs, (tuple(t.dims) for t in fp16_inits)))) == len(fp16_inits)
    types = _types(onnx_model)
    for node in g.node:  # the plan puts every matrix op in float16 (R1)
        if node.op_type in MATRIX_OPS:
            assert types[node.input[0]] == TensorProto.FLOAT16, node.name
            assert types[node.input[1]] == TensorProto.FLOAT16, node.name

    # keep_io_types=True: inputs and outputs keep the dtypes torch sees
    assert [i.type.tensor_type.elem_type for i in g.input] == [_ONNX_OF[t.dtype] for t in inputs]
    assert [o.type.tensor_type.elem_type for o in g.output] == [TensorProto.FLOAT]

    # the user's AmpModule is unchanged
    assert amp.cast_count() == forward_casts and not amp.training
    with torch.no_grad():
        torch.testing.assert_close(amp(*inputs), before, rtol=0, atol=0)


def test_training_amp_module_exports_eval_graph_and_stays_training(tmp_path, ort_no_crash):
    model, inputs = build("mlp", "tiny")
    amp = ac.convert(model, inputs, training=True, loss_scale=None)
    assert amp.training and not amp.folded
    params = {k: v.clone() for k, v in model.state_dict().items()}

    path = export_onnx(amp, inputs, tmp_path / "mlp.onnx")

    assert amp.training and not amp.folded  # mode restored, nothing folded in the user's module
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    g = onnx.load(path).graph
    assert all(t.data_type == TensorProto.FLOAT16 for t in g.initializer)  # folded in the copy
    ort_no_crash(path, inputs)
    assert verify_onnx(path, model, inputs)["max_rel"] <= TOL


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_keep_io_types_false_gives_fp16_io(name, tmp_path, ort_no_crash):
    model, inputs = _eval_model(name)
    amp = ac.convert(model, inputs)
    path = export_onnx(amp, inputs, tmp_path / "m.onnx", keep_io_types=False)
    g = onnx.load(path).graph
    expected_in = [TensorProto.FLOAT16 if t.is_floating_point() else _ONNX_OF[t.dtype] for t in inputs]
    assert [i.type.tensor_type.elem_type for i in g.input] == expected_in
    assert [o.type.tensor_type.elem_type for o in g.output] == [TensorProto.FLOAT16]
    # the casts that converted the I/O are gone, not doubled
    producers = {o: n for n in g.node for o in n.output}
    assert producers[g.output[0].name].op_type != "Cast"
    assert not any(n.op_type == "Cast" and n.input[0] in {i.name for i in g.input} for n in g.node)
    ort_no_crash(path, inputs)
    session = onnx_session(path)
    assert [i.type for i in session.get_outputs()] == ["tensor(float16)"]
    # one more float16 rounding (of the output) than the float32-output file
    assert verify_onnx(path, model, inputs, session=session)["max_rel"] <= TOL + 2.0 ** -11


def test_refuses_to_overwrite_and_overwrites_when_asked(tmp_path):
    model, inputs = _eval_model("mlp")
    amp = ac.convert(model, inputs)
    target = tmp_path / "mlp.onnx"
    target.write_bytes(b"not a model")
    with pytest.raises(OnnxFileExistsError, match="overwrite=True") as info:
        export_onnx(amp, inputs, target)
    assert isinstance(info.value, AmpCompilerError) and isinstance(info.value, FileExistsError)
    assert target.read_bytes() == b"not a model"
    export_onnx(amp, inputs, target, overwrite=True)
    onnx.checker.check_model(onnx.load(str(target)))
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx"]


def test_no_partial_file_when_export_fails(tmp_path):
    model, inputs = _eval_model("mlp")
    amp = ac.convert(model, inputs)
    target = tmp_path / "bad.onnx"
    with pytest.raises(OnnxError, match="torch.onnx.export"):
        export_onnx(amp, (torch.randn(4, 5),), target)  # wrong feature size: the exporter fails
    assert os.listdir(tmp_path) == []


def test_no_partial_file_when_writing_fails(tmp_path, monkeypatch):
    model, inputs = _eval_model("mlp")
    amp = ac.convert(model, inputs)
    target = tmp_path / "half.onnx"

    def failing_save(proto, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(proto.SerializeToString()[:100])  # a truncated file, then the disk "fills"
        raise OSError("No space left on device")

    monkeypatch.setattr("amp_compiler.onnx.io.onnx.save_model", failing_save)
    with pytest.raises(OSError, match="No space"):
        export_onnx(amp, inputs, target)
    assert os.listdir(tmp_path) == []


def test_bad_arguments_raise_typed_errors(tmp_path):
    model, inputs = _eval_model("mlp")
    with pytest.raises(ConfigError, match="convert_onnx"):
        export_onnx(model, inputs, tmp_path / "m.onnx")
    amp = ac.convert(model, inputs)
    with pytest.raises(OnnxError, match="does not exist"):
        export_onnx(amp, inputs, tmp_path / "missing" / "m.onnx")
    with pytest.raises(OnnxError, match="folder"):
        export_onnx(amp, inputs, tmp_path)


def test_verify_onnx_reports_overflow_as_infinite(tmp_path, ort_no_crash):
    # the Flatten after the Linear makes ONNX Runtime CPU store the float16 value (it runs a
    # lone float16 Gemm in float32 and would otherwise hand back the float32 result)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Flatten(0)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    x = torch.full((2, 4), 3e4)  # each output 1.2e5: beyond float16's 65504, fine in fp32
    amp = ac.convert(model, (x,))
    path = export_onnx(amp, (x,), tmp_path / "m.onnx")
    ort_no_crash(path, (x,))
    result = verify_onnx(path, model, (x,))
    assert result["max_abs"] == float("inf") and result["max_rel"] == float("inf")
    assert torch.isfinite(model(x)).all()
    assert verify_onnx(path, model, (x / 1e3,))["max_rel"] <= TOL


# -- legalisation: ops whose ONNX schema has no bfloat16 before opset 22 ----------------------------

class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(x)))
        return self.fc(self.conv2(h).mean((2, 3)))


def _conv_export(dtype, tmp_path):
    torch.manual_seed(0)
    model, x = _ConvNet().eval(), torch.randn(2, 3, 8, 8)
    amp = ac.convert(model, (x,), dtype=dtype)
    # opset 18 (torch 2.6's default): Conv and MaxPool accept bfloat16 only from opset 22
    return model, x, amp, onnx.load(export_onnx(amp, (x,), tmp_path / f"{dtype}.onnx", opset=18))


def test_bf16_export_computes_convs_in_float32_and_passes_the_checker(tmp_path, ort_no_crash):
    model, x, amp, m = _conv_export(torch.bfloat16, tmp_path)
    ort_no_crash(m, (x,))  # ONNX Runtime's CPU EP may refuse bfloat16 nodes; it must not crash
    onnx.checker.check_model(m, full_check=True)
    types, g = _types(m), m.graph
    inits = {t.name: t for t in g.initializer}
    by_op: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        by_op.setdefault(node.op_type, []).append(node)
    reasons = {n.name: p.value for n in g.node for p in n.metadata_props if p.key == "amp_compiler.reason"}
    convs = by_op["Conv"]
    assert len(convs) == 2 and set(reasons) == {n.name for n in convs + by_op["MaxPool"]}
    assert all("no tensor(bfloat16)" in reasons[n.name] and "float32" in reasons[n.name] for n in convs)
    for conv in convs:
        assert all(types[v] == TensorProto.FLOAT for v in conv.input), conv.name
        for v in conv.input[1:]:  # weights converted in the file, not cast at every run
            assert v in inits and inits[v].data_type == TensorProto.FLOAT
    # the converted weights are the plan's bfloat16 weights, exactly
    w = numpy_helper.to_array(inits[convs[0].input[1]])
    assert torch.equal(torch.from_numpy(w.copy()), model.conv.weight.detach().bfloat16().float())
    # the first Conv reads the float32 input itself: no Cast to bf16 and straight back; nor
    # does the second Conv read MaxPool's result through a bf16 round trip: no Cast of a Cast
    assert convs[0].input[0] == g.input[0].name
    cast_outputs = {n.output[0] for n in by_op["Cast"]}
    assert not [n.name for n in by_op["Cast"] if n.input[0] in cast_outputs]
    assert convs[1].input[0] == by_op["MaxPool"][0].output[0]
    # everything else keeps the plan: the Linear computes in bfloat16, the output is float32
    gemm = (by_op.get("Gemm") or by_op["MatMul"])[0]
    assert types[gemm.input[0]] == types[gemm.input[1]] == TensorProto.BFLOAT16
    assert amp.plan["conv2d"].precision == torch.bfloat16  # the module's own plan is untouched
    assert [o.type.tensor_type.elem_type for o in g.output] == [TensorProto.FLOAT]


def test_legaliser_leaves_a_valid_fp16_export_untouched(tmp_path, ort_no_crash):
    from amp_compiler.onnx.legalise import legalise_types

    model, x, amp, m = _conv_export(torch.float16, tmp_path)
    ort_no_crash(m, (x,))
    before = m.SerializeToString()
    assert legalise_types(m) == [] and m.SerializeToString() == before
    assert not any(p.key == "amp_compiler.reason" for n in m.graph.node for p in n.metadata_props)
    types = _types(m)
    assert all(types[v] == TensorProto.FLOAT16 for n in m.graph.node if n.op_type == "Conv" for v in n.input)
    assert verify_onnx(tmp_path / "torch.float16.onnx", model, (x,))["max_rel"] <= TOL


def test_legaliser_copies_a_shared_initializer_and_casts_computed_values_once():
    from onnx import helper

    from amp_compiler.onnx.legalise import legalise_types

    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    w = numpy_helper.from_array(torch.randn(4, 4).numpy(), "w")
    w = ac.passes.onnx_graph.convert_tensor(w, bf16)[0]
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], to=bf16, name="cast_in"),
        helper.make_node("MatMul", ["xb", "w"], ["h"], name="mm"),      # bf16 allowed
        helper.make_node("Sin", ["h"], ["s"], name="sin"),              # no bf16 before opset 22
        helper.make_node("Cos", ["h"], ["c"], name="cos"),              # shares h's cast
        helper.make_node("Einsum", ["s", "w"], ["e"], equation="ij,jk->ik", name="einsum"),  # no bf16 at 22 either
        helper.make_node("Add", ["e", "c"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f32, [2, 4])],
                              [helper.make_tensor_value_info("y", bf16, [2, 4])], initializer=[w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError), match="bfloat16"):
        onnx.checker.check_model(m, full_check=True)
    records = legalise_types(m)
    onnx.checker.check_model(m, full_check=True)
    assert [(r.node, r.was, r.now) for r in records] == [("sin", bf16, f32), ("cos", bf16, f32),
                                                         ("einsum", bf16, f32)]
    g, types = m.graph, _types(m)
    casts_of = [n.input[0] for n in g.node if n.op_type == "Cast"]
    assert casts_of.count("h") == 1  # one Cast of h, shared by Sin and Cos
    inits = {t.name: t.data_type for t in g.initializer}
    assert inits["w"] == bf16  # MatMul still reads the bf16 weight; Einsum reads a float32 copy
    einsum = next(n for n in g.node if n.op_type == "Einsum")
    assert inits[einsum.input[1]] == f32 and types[einsum.input[0]] == f32
    # Einsum reads Sin's float32 result itself: the cast back, read by nobody else, is gone
    assert einsum.input[0] == next(n for n in g.node if n.op_type == "Sin").output[0] != "s"
    assert "s" not in {o for n in g.node for o in n.output}
    assert types["c"] == types["e"] == types["y"] == bf16  # the rest of the graph keeps its types
    assert [n.name for n in g.node if n.op_type == "MatMul"] == ["mm"] and types["xb"] == bf16


class _LayerScaled(torch.nn.Module):
    """fp32 layer scale times a low-precision branch: rule I7 leaves the mul mixed-dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.fc = torch.nn.Linear(8, 8)
        self.scale = torch.nn.Parameter(torch.full((8, 1, 1), 0.5))

    def forward(self, x):
        x = self.conv(x)
        return x + self.scale * self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_type_promotion_is_made_explicit_before_export(tmp_path, ort_no_crash):
    from torch.fx.passes.shape_prop import ShapeProp

    from amp_compiler.onnx.export import _inference_graph, explicit_promotions

    x = torch.randn(2, 3, 16, 16)
    amp = ac.convert(_LayerScaled().eval(), (x,), dtype="float16")
    code = amp.graph_module.code

    def mixed(gm):
        ShapeProp(gm).propagate(x)
        return [n.name for n in gm.graph.nodes if n.op == "call_function" and len({
            a.meta["tensor_meta"].dtype for a in n.all_input_nodes
            if "tensor_meta" in a.meta and a.meta["tensor_meta"].dtype.is_floating_point}) > 1]

    assert mixed(copy.deepcopy(amp.graph_module))  # I7: the fp32 mul reads the fp16 branch
    explicit = explicit_promotions(_inference_graph(amp), (x,))
    assert not mixed(explicit)
    assert amp.graph_module.code == code  # the AmpModule's own graph is not touched
    with torch.no_grad():
        assert torch.equal(explicit(x), amp(x))  # a cast does what the promotion did
    path = export_onnx(amp, (x,), tmp_path / "scaled.onnx")
    ort_no_crash(path, (x,))
    assert verify_onnx(path, amp, (x,))["max_rel"] < 1e-3


# -- ONNX Runtime must not crash on our files (passes.onnx_transposes W9) -----------------------------

def _transformer_encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=2).eval(), torch.randn(2, 10, 32)


def _moved_by_w9(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node
            if any(p.key == "amp_compiler.reason" and p.value.startswith("W9") for p in n.metadata_props)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transformer_encoder_file_does_not_crash_onnx_runtime(dtype, tmp_path, ort_no_crash, monkeypatch):
    """nn.MultiheadAttention(batch_first=True) transposes its input before the in-projection;
    ONNX Runtime 1.32 (CPU EP, default options) died with SIGSEGV opening that export. The
    Transpose now sits below the MatMul (W9): same Casts, same node count, same values."""
    from onnx.reference import ReferenceEvaluator

    from amp_compiler.passes.onnx_transposes import transpose_hazards

    model, x = _transformer_encoder()
    amp = ac.convert(model, (x,), dtype=dtype, training=False)
    path = export_onnx(amp, (x,), tmp_path / "te.onnx")
    results = ort_no_crash(path, (x,))  # killed by SIGSEGV before W9
    m = onnx.load(path)
    assert transpose_hazards(m) == []
    moved = _moved_by_w9(m)  # one per layer: the in-projection's input
    assert len(moved) == 2 and {n.op_type for n in moved} == {"Transpose"}

    # the file as it was without W9 (never opened in ONNX Runtime here)
    with monkeypatch.context() as mp:
        mp.setattr("amp_compiler.onnx.export.sink_transposes", lambda model: PassResult(model, False, (), ([], [])))
        before = onnx.load(export_onnx(amp, (x,), tmp_path / "before.onnx"))
    assert len(transpose_hazards(before)) == 2 and not _moved_by_w9(before)

    def count(proto, op):
        return sum(n.op_type == op for n in proto.graph.node)

    assert count(m, "Cast") == count(before, "Cast") > 0
    assert len(m.graph.node) == len(before.graph.node)
    if dtype == torch.float16:  # the ONNX reference evaluator has no bfloat16 (numpy has none)
        feeds = {m.graph.input[0].name: x.numpy()}
        ours, theirs = (ReferenceEvaluator(p).run(None, feeds)[0] for p in (m, before))
        assert ours.dtype == theirs.dtype and (ours == theirs).all()  # by the ONNX spec: equal
        assert verify_onnx(path, model, (x,))["max_rel"] <= TOL
    else:  # the CPU EP has no bfloat16 MatMul: it refuses the file (it did not crash above)
        for r in results:
            if r.provider == "CUDAExecutionProvider" and r.status == "ok":
                session = onnx_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
                assert verify_onnx(path, model, (x,), session=session)["max_rel"] <= 4 * 2.0 ** -8
