"""Saved plans (``PrecisionPlan.from_json``): what the project writes is read back, everything
else is one ``PlanError`` that names the place in the file.

- every plan the project writes (each reference model in float16 and bfloat16, float64 models,
  calibration and tolerance metadata, ONNX conversions, the CLI's cast list) round-trips;
- edited precisions the passes would never write (int8 / float8 / float64 / the other low dtype
  on a linear), wrong keys, wrong types, null, a foreign format, oversize and 100k-deep nesting
  are refused by ``from_json``, by ``convert(plan=...)`` and by ``amp-compiler report`` (exit 2);
- a hypothesis fuzzer mutates valid plan JSON (values, keys, types, nesting, raw text) and
  checks that only ``PlanError`` is ever raised, and that what is accepted obeys the rules.

    pytest tests/test_plan_json.py                      # add --hypothesis-seed=N to replay
"""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amp_compiler as ac
import amp_compiler.passes.plan as plan_module
from amp_compiler.cli import main
from amp_compiler.commands import plan_with_casts
from amp_compiler.errors import AmpCompilerError, PlanError
from amp_compiler.models import NAMES, build
from amp_compiler.passes.plan import PrecisionPlan

from test_cli import assert_one_line_error


def _convert(name: str, dtype: str, *, double: bool = False, **kw):
    model, inputs = build(name, "tiny")
    if double:
        model = model.double()
        inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's warnings about the LSTM's flat weights
        return ac.convert(model, inputs, dtype=dtype, training=False, **kw)


@functools.lru_cache(maxsize=None)
def mlp_text(dtype: str = "float16") -> str:
    """What `amp-compiler convert mlp` writes into plan.json (cast list included)."""
    return plan_with_casts(_convert("mlp", dtype)).to_json(indent=1)


def _edited(text: str, edit) -> str:
    data = json.loads(text)
    edit(data)
    return json.dumps(data)


def _linear(data) -> dict:
    return data["nodes"]["linear"]


def assert_plan_rules(plan: PrecisionPlan) -> None:
    """What a plan must satisfy to drive casts: the precisions propagate's rules can give."""
    assert plan.low_dtype in (torch.float16, torch.bfloat16)
    for name, d in plan.items():
        if d.rule in ("R0:source", "R0:factory", "R0:passthrough"):
            assert d.precision is None or isinstance(d.precision, torch.dtype), name
        elif d.rule == "R0:float64":
            assert d.precision in (None, torch.float64), name
        elif d.rule.startswith("R0:"):
            assert d.precision is None, name
        else:
            assert d.precision in (None, plan.low_dtype, torch.float32), (name, d)


# -- what the project writes is read back ---------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_reference_plan_round_trips(name):
    for dtype in ("float16", "bfloat16"):
        plan = plan_with_casts(_convert(name, dtype))
        back = PrecisionPlan.from_json(plan.to_json(indent=1))
        assert dict(back.items()) == dict(plan.items())
        assert back.low_dtype == plan.low_dtype and back.meta == plan.meta
        assert_plan_rules(back)
    # float64 models stay float64 (rule R0:float64) inside a float16 plan
    plan = _convert(name, "float16", double=True).plan
    back = PrecisionPlan.from_json(plan.to_json())
    assert dict(back.items()) == dict(plan.items())
    if name != "mf":
        assert any(d.rule == "R0:float64" and d.precision == torch.float64 for d in back.values())


def test_a_training_conversion_from_a_saved_plan_switches_to_eval():
    """A saved plan names one mode's nodes (the training graph has dropout): ``eval()`` on a
    conversion made from it analyses the eval graph afresh instead of refusing the plan."""
    model, inputs = build("gpt", "tiny", with_targets=True, dropout=0.1)
    model.train()
    saved = ac.convert(model, inputs, dtype="float16").plan.to_json()
    again = ac.convert(model, inputs, dtype="float16", plan=saved)
    assert again.plan.to_json() == saved
    fresh = ac.convert(model, inputs, dtype="float16", training=False)
    with torch.no_grad():
        assert torch.equal(again.eval()(*inputs), fresh(*inputs))
    assert "dropout" in PrecisionPlan.from_json(saved).keys()  # the nodes eval's graph lacks
    assert "dropout" not in again.plan.keys()


def test_calibration_and_tolerance_metadata_round_trip():
    model, inputs = build("mlp", "tiny")
    batches = [(torch.randn_like(inputs[0]),) for _ in range(2)]
    amp = ac.convert(model.eval(), inputs, dtype="float16", calibration=batches, tolerance=0.5)
    assert {"range_findings", "tolerance"} <= set(amp.plan.meta)
    back = PrecisionPlan.from_json(amp.plan.to_json())
    assert dict(back.items()) == dict(amp.plan.items()) and back.meta == amp.plan.meta


def test_onnx_plans_round_trip(tmp_path):
    pytest.importorskip("amp_compiler.onnx.convert")
    from test_cli import _tiny_onnx

    src = tmp_path / "fp32.onnx"
    _tiny_onnx(src)
    for dtype in ("float16", "bfloat16"):
        _, plan = ac.convert_onnx(str(src), dtype=dtype, return_plan=True)
        back = PrecisionPlan.from_json(plan.to_json())
        assert dict(back.items()) == dict(plan.items()) and back.device_type == "cuda"


def test_dynamo_plans_round_trip():
    model, inputs = build("mlp", "tiny")
    amp = ac.convert(model.eval(), inputs, capture="dynamo")
    amp(*inputs)  # the dynamo capture plans each graph when it first runs
    back = PrecisionPlan.from_json(amp.plan.to_json())
    assert dict(back.items()) == dict(amp.plan.items()) and back.meta["graphs"] == 1


def test_sources_keep_any_stored_dtype():
    """An int8 buffer or an fp8 weight is recorded as stored (R0:source): not a defect."""
    def edit(data):
        node = next(d for d in data["nodes"].values() if d["rule"] == "R0:source"
                    and d["category"] == "param")
        node["precision"] = "float8_e4m3fn"

    plan = PrecisionPlan.from_json(_edited(mlp_text(), edit))
    assert torch.float8_e4m3fn in {d.precision for d in plan.values()}


# -- what it never writes is refused, naming the place ----------------------------------------------

@pytest.mark.parametrize("precision", ["int8", "float8_e4m3fn", "float64", "bfloat16", "ones",
                                       "__class__", ""])
def test_edited_precision_on_a_linear_is_refused(precision):
    text = _edited(mlp_text("float16"), lambda d: _linear(d).update(precision=precision))
    with pytest.raises(PlanError) as e:
        PrecisionPlan.from_json(text, source="plan.json")
    msg = str(e.value)
    assert msg.startswith("plan.json: nodes['linear'].precision: "), msg
    assert repr(precision) in msg
    if precision in ("int8", "float64", "bfloat16"):
        assert msg.endswith("is not float16, float32 or '-'"), msg


def test_a_source_rule_cannot_relabel_a_linear():
    text = _edited(mlp_text(), lambda d: _linear(d).update(rule="R0:source", precision="int8"))
    with pytest.raises(PlanError, match=r"nodes\['linear'\]\.rule: R0:source is for inputs"):
        PrecisionPlan.from_json(text)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d.pop("meta"), "missing 'meta'"),
    (lambda d: d.update(format="amp_compiler.plan/2"), "'format' is 'amp_compiler.plan/2'"),
    (lambda d: d.update(low_dtype="float32"), "low_dtype: 'float32' is not float16 or bfloat16"),
    (lambda d: d.update(low_dtype=None), "low_dtype: None is not float16 or bfloat16"),
    (lambda d: d.update(device_type=["cpu"]), "device_type: expected a device type string, got list"),
    (lambda d: d.update(nodes=None), "nodes: expected a JSON object"),
    (lambda d: d.update(meta=[]), "meta: expected a JSON object"),
    (lambda d: d["meta"].update(casts={}), "meta['casts']: expected a JSON list"),
    (lambda d: d["meta"]["casts"][0].pop("consumers"), "meta['casts'][0]: missing 'consumers'"),
    (lambda d: d["meta"]["casts"][0].update(consumers=[1]), "meta['casts'][0].consumers[0]"),
    (lambda d: d["meta"].update(rewrite_attention="yes"), "meta['rewrite_attention']: expected"),
    (lambda d: _linear(d).update(precision=None), "nodes['linear'].precision: expected a string, got NoneType"),
    (lambda d: _linear(d).update(bogus=1), "nodes['linear']: unknown key 'bogus'"),
    (lambda d: _linear(d).pop("reason"), "nodes['linear']: missing 'reason'"),
    (lambda d: _linear(d).update(category="fast"), "nodes['linear'].category: 'fast' is not one of"),
    (lambda d: _linear(d).update(rule="whatever"), "nodes['linear'].rule: 'whatever' is not a rule id"),
    (lambda d: _linear(d).update(rule="R0:magic"), "'R0:magic' is not a rule this version writes"),
    (lambda d: d["nodes"].update(linear=[1, 2]), "nodes['linear']: expected an object"),
])
def test_malformed_plans_name_the_place(edit, needle):
    with pytest.raises(PlanError) as e:
        PrecisionPlan.from_json(_edited(mlp_text(), edit), source="p.json")
    assert str(e.value).startswith("p.json: ") and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "nested more than 16 levels"),
    ('{"format": "amp_compiler.plan/1", "meta": ' + "{\"a\": " * 100_000 + "1" + "}" * 100_001,
     "nested more than 16 levels"),
    ('"' + "\\\"[" * 50_000 + '"', "not a plan written by"),  # brackets inside a string are text
    ("", "not valid JSON"),
    ("{", "not valid JSON"),
    ("null", "expected a JSON object"),
    ("[]", "expected a JSON object"),
    ('{"nodes": 3}', "not a plan written by PrecisionPlan.to_json"),
    ("1" * 5000, "not valid JSON"),  # past Python's int-parsing limit
    (b"\xff\xfe", "not UTF-8"),
])
def test_unreadable_text_is_a_plan_error(text, needle):
    with pytest.raises(PlanError, match=needle):
        PrecisionPlan.from_json(text)


def test_size_bounds(monkeypatch):
    text = mlp_text()
    monkeypatch.setattr(plan_module, "MAX_PLAN_CHARS", len(text) - 1)
    with pytest.raises(PlanError, match="characters is over"):
        PrecisionPlan.from_json(text)
    monkeypatch.setattr(plan_module, "MAX_PLAN_CHARS", len(text))
    monkeypatch.setattr(plan_module, "MAX_PLAN_NODES", 3)
    with pytest.raises(PlanError, match=r"nodes: \d+ nodes is over the 3"):
        PrecisionPlan.from_json(text)


def test_plan_error_is_a_value_error_and_exported():
    assert issubclass(PlanError, AmpCompilerError) and issubclass(PlanError, ValueError)
    assert ac.PlanError is PlanError and "PlanError" in ac.__all__


def test_convert_refuses_an_edited_plan():
    model, inputs = build("mlp", "tiny")
    text = _edited(mlp_text(), lambda d: _linear(d).update(precision="int8"))
    with pytest.raises(PlanError, match=r"nodes\['linear'\]\.precision: 'int8'"):
        ac.convert(model.eval(), inputs, plan=text)
    # the unedited plan still converts, with the saved decisions
    amp = ac.convert(model.eval(), inputs, plan=mlp_text())
    assert amp.plan["linear"].precision == torch.float16


def test_cli_report_of_an_edited_plan_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(_edited(mlp_text(), lambda d: _linear(d).update(precision="int8")))
    code = main(["report", str(path)])
    assert_one_line_error(code, capsys.readouterr().err,
                          f"{path}: nodes['linear'].precision: 'int8' is not float16, float32 or '-'")
    path.write_text("[" * 100_000)
    code = main(["report", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, "nested more than 16 levels")


# -- the fuzzer -----------------------------------------------------------------------------------

# names that getattr(torch, name) resolves to something that is not a usable precision
_TORCH_NAMES = ["int8", "uint8", "float8_e4m3fn", "float64", "complex64", "bool", "float16",
                "bfloat16", "float32", "-", "half", "ones", "Tensor", "__class__", "nn", ""]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.sampled_from(_TORCH_NAMES) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def _locations(data) -> list[tuple]:
    """(container, key) for every value in the tree, without recursion."""
    out, stack = [], [data]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((node, k))
            stack.append(v)
    return out


@functools.lru_cache(maxsize=None)
def _bases() -> tuple[str, ...]:
    return (mlp_text("float16"), mlp_text("bfloat16"),
            _convert("mlp", "bfloat16", double=True).plan.to_json())


@st.composite
def mutated_plans(draw):
    data = json.loads(draw(st.sampled_from(_bases())))
    if draw(st.booleans()):
        # half the examples edit only the field that decides casts, so that well-formed plans
        # with a wrong precision are common (random edits mostly break the structure instead)
        names = sorted(data["nodes"])
        for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)):
            data["nodes"][name]["precision"] = draw(st.sampled_from(_TORCH_NAMES))
        return json.dumps(data)
    for _ in range(draw(st.integers(1, 3))):
        places = _locations(data)
        # a quarter of the edits hit the top level, which holds few of the locations
        top = [(data, k) for k in data] if isinstance(data, dict) and data else []
        container, key = draw(st.sampled_from(top if top and draw(st.booleans()) else places))
        what = draw(st.sampled_from(["value", "dtype", "delete", "add", "nest", "root"]))
        if what == "value":
            container[key] = draw(_JSON)
        elif what == "dtype":
            container[key] = draw(st.sampled_from(_TORCH_NAMES))
        elif what == "delete":
            del container[key]
        elif what == "add" and isinstance(container, dict):
            container[draw(st.sampled_from(["kind", "precision", "x", "nodes", "meta"]))] = draw(_JSON)
        elif what == "nest":
            value = container[key]
            for _ in range(draw(st.integers(1, 40))):
                value = draw(st.sampled_from([[value], {"k": value}]))
            container[key] = value
        elif what == "root":
            data = draw(_JSON)
            break
    text = json.dumps(data)
    how = draw(st.sampled_from(["as is", "truncate", "insert", "deep"]))
    if how == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(alphabet='[]{}",:\\ 0an-', max_size=6)) + text[at:]
    elif how == "deep":
        depth = draw(st.integers(10, 5000))
        text = "[" * depth + text + "]" * draw(st.sampled_from([depth, 0]))
    return text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_plans())
def test_fuzzed_plans_raise_only_plan_error(text):
    try:
        plan = PrecisionPlan.from_json(text, source="fuzz.json")
    except PlanError as e:
        assert str(e).startswith("fuzz.json: ") and "\n" not in str(e)
        return
    assert_plan_rules(plan)
    again = PrecisionPlan.from_json(plan.to_json())
    assert dict(again.items()) == dict(plan.items()) and again.meta == plan.meta


def test_fuzzer_reaches_both_outcomes():
    """The fuzzer is only worth running if its mutations are sometimes accepted (a harmless
    edit of a reason) and sometimes refused: check one of each from its own vocabulary."""
    base = json.loads(mlp_text())
    harmless = copy.deepcopy(base)
    harmless["nodes"]["linear"]["reason"] = "[bold]edited[/]"
    assert PrecisionPlan.from_json(json.dumps(harmless))["linear"].reason == "[bold]edited[/]"
    nested = copy.deepcopy(base)
    nested["nodes"]["linear"]["kind"] = [[["linear"]]]
    with pytest.raises(PlanError):
        PrecisionPlan.from_json(json.dumps(nested))
