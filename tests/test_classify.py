"""classify pass: op kind -> policy category (C1-C3) and keep_fp32 / force_low resolution (C4).

Each test captures a real graph (a small hand-built module, or a tiny reference model), runs
``classify`` on its DataflowGraph, and checks the categories and the nodes each override entry
selected; the override tests also check that convert() honours them in the plan.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amp_compiler as ac
from amp_compiler.errors import ConfigError
from amp_compiler.capture import build_dataflow, capture
from amp_compiler.models import build
from amp_compiler.passes.classify import classify
from amp_compiler.passes.policy import CATEGORIES, policy_for

from conftest import DTYPES, eval_conversion, nodes_of


class Mix(nn.Module):
    """One op of each category: linear, exp, add, view, softmax, lgamma (in no table)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc1(x)
        a = h + torch.exp(h)
        p = F.softmax(a.view(-1, 8), -1)
        return self.fc2(self.ln(torch.lgamma(p)))


def _graph(model: nn.Module, example_inputs=None):
    gm, _ = capture(model, example_inputs)
    return build_dataflow(gm)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_policy_tables_give_the_documented_categories(device, dtype):
    policy = policy_for(device, dtype)
    assert policy.low_dtype == dtype
    expected = {"linear": "allow", "matmul": "allow", "conv": "allow", "exp": "deny",
                "cross_entropy": "deny", "sum": "deny", "softmax": "fp32_acc",
                "layer_norm": "fp32_acc", "add": "infer", "gelu": "infer", "view": "clear",
                "relu": "clear", "no_such_op": "unknown"}
    assert {k: policy.category(k) for k in expected} == expected
    assert set(policy.table.values()) <= set(CATEGORIES)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_each_node_gets_its_kinds_category(frontend):
    model = Mix().eval()
    graph = _graph(model, (torch.randn(4, 8),) if frontend == "export" else None)
    cls = classify(graph, policy_for("cpu", torch.float16))
    by_kind = {}
    for v in graph.vertices():
        by_kind.setdefault(v.kind, set()).add(cls.categories[v.name])
    assert by_kind["linear"] == {"allow"}
    assert by_kind["exp"] == {"deny"}
    assert by_kind["softmax"] == {"fp32_acc"}
    assert by_kind["layer_norm"] == {"fp32_acc"}
    assert by_kind["add"] == {"infer"}
    assert by_kind["view"] == {"clear"}
    assert by_kind["lgamma"] == {"unknown"}  # C2: in no table
    assert by_kind["param"] == {"param"} and by_kind["input"] == {"input"}
    assert cls.keep_fp32 == {} and cls.force_low == {}


def test_integer_and_boolean_values_are_non_float():
    # gpt: positions (arange int64) and the causal mask (eq -> bool); bert: positions built by
    # cumsum over an integer tensor: C3 wins over cumsum's deny entry
    for name, kinds in (("gpt", {"factory", "compare"}), ("bert", {"cumsum", "sub", "factory"})):
        amp = eval_conversion(name, torch.bfloat16, "export")[2]
        graph = amp._dataflow  # the graph the plan was made from
        cls = classify(graph, policy_for("cpu", torch.bfloat16))
        ints = [v for v in graph.vertices() if v.role == "compute" and v.dtype is not None
                and not v.dtype.is_floating_point]
        assert {v.kind for v in ints} >= kinds, name
        for v in ints:
            assert cls.categories[v.name] == "non_float", (name, v.name, v.kind)
        # and the plan gives them no precision: they are never cast
        for v in ints:
            assert amp.plan[v.name].precision is None and amp.plan[v.name].rule.startswith("R0:non-float")
        # traced sizes (SymInt, no dtype) too
        shapes = [v.name for v in graph.vertices() if v.kind == "shape"]
        assert all(cls.categories[n] == "non_float" for n in shapes)


def test_fx_path_does_not_call_integer_position_ids_float():
    # without recorded dtypes the front end cannot know input_ids is an integer tensor, but it
    # must not claim that ones_like(input_ids) and what is computed from it are floats
    model, _ = build("bert", "tiny")
    graph = _graph(model.eval())
    for name in ("ones_like", "cumsum", "sub"):  # positions = ones_like(ids).cumsum(-1) - 1
        assert graph.vertex(name).is_float is not True, name
    assert graph.vertex("zeros_like").is_float is not True


# -- C4: overrides ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_graph():
    model, inputs, amp = eval_conversion("gpt", torch.bfloat16, "export")
    return model, inputs, amp._dataflow


def _resolve(graph, **overrides):
    return classify(graph, policy_for("cpu", torch.bfloat16), **overrides)


def test_override_by_op_kind_selects_every_node_of_that_kind(gpt_graph):
    _, _, graph = gpt_graph
    softmaxes = [v.name for v in graph.vertices() if v.kind == "softmax"]
    assert len(softmaxes) == 2  # one per block
    cls = _resolve(graph, keep_fp32=("softmax",))
    assert cls.keep_fp32 == {n: "softmax" for n in softmaxes}


def test_override_by_node_name(gpt_graph):
    _, _, graph = gpt_graph
    # "softmax" is both a kind and the first softmax node's name: the kind wins, "node:" picks one
    cls = _resolve(graph, keep_fp32=("node:softmax",))
    assert cls.keep_fp32 == {"softmax": "node:softmax"}
    # a name that is no kind selects that node alone
    cls = _resolve(graph, force_low=("softmax_1",))
    assert cls.force_low == {"softmax_1": "softmax_1"}


def test_override_by_module_path_glob(gpt_graph):
    _, _, graph = gpt_graph
    cls = _resolve(graph, keep_fp32=("transformer.h.*.ln_1",))
    expected = {v.name for v in graph.vertices() if v.role == "compute"
                and v.module_path in ("transformer.h.0.ln_1", "transformer.h.1.ln_1")}
    assert set(cls.keep_fp32) == expected
    assert {graph.vertex(n).kind for n in cls.keep_fp32} == {"layer_norm"} and len(expected) == 2
    # a module path covers everything under it: the whole attention of block 0
    cls = _resolve(graph, keep_fp32=("transformer.h.0.attn",))
    selected = {graph.vertex(n).kind for n in cls.keep_fp32}
    assert {"linear", "matmul", "softmax", "masked_fill"} <= selected
    assert all(graph.vertex(n).module_path.startswith("transformer.h.0.attn") for n in cls.keep_fp32)


def test_override_by_module_class(gpt_graph):
    _, _, graph = gpt_graph
    cls = _resolve(graph, keep_fp32=(nn.LayerNorm,), force_low=[nn.Embedding])
    layer_norms = {v.name for v in graph.vertices() if v.kind == "layer_norm"}
    assert len(layer_norms) == 5  # ln_1, ln_2 per block, ln_f
    assert set(cls.keep_fp32) == layer_norms
    assert set(cls.keep_fp32.values()) == {"torch.nn.modules.normalization.LayerNorm"}
    embeddings = {v.name for v in graph.vertices() if v.kind == "embedding"}
    assert len(embeddings) == 2 and set(cls.force_low) == embeddings  # tokens, positions


def test_overrides_reach_the_plan(gpt_graph):
    model, inputs, _ = gpt_graph
    amp = ac.convert(model, inputs, dtype="bfloat16", keep_fp32=("transformer.h.*.attn.c_attn",),
                     force_low=(nn.LayerNorm,))
    for n in nodes_of(amp.plan, "linear"):
        d = amp.plan[n]
        if n in ("linear", "linear_4"):  # the two c_attn projections
            assert (d.precision, d.rule) == (torch.float32, "R6:keep_fp32")
            assert "transformer.h.*.attn.c_attn" in d.reason
        else:
            assert d.precision == torch.bfloat16
    for n in nodes_of(amp.plan, "layer_norm"):
        assert (amp.plan[n].precision, amp.plan[n].rule) == (torch.bfloat16, "R6:force_low")


def test_a_string_override_may_be_given_alone(gpt_graph):
    _, _, graph = gpt_graph
    assert set(_resolve(graph, keep_fp32="softmax").keep_fp32) == {"softmax", "softmax_1"}


@pytest.mark.parametrize("entry, suggestion", [
    ("sofmax", "'softmax'"),
    ("transformer.ln_g", "'transformer.ln_f'"),
    ("transformer.h.*.ln1", "'transformer.h."),
])
def test_unknown_override_raises_config_error_with_did_you_mean(gpt_graph, entry, suggestion):
    model, inputs, graph = gpt_graph
    with pytest.raises(ConfigError, match="Did you mean") as info:
        _resolve(graph, keep_fp32=(entry,))
    msg = str(info.value)
    assert repr(entry) in msg and suggestion in msg and "keep_fp32" in msg


def test_convert_reports_unknown_overrides(gpt_graph):
    model, inputs, _ = gpt_graph
    with pytest.raises(ConfigError, match="force_low entry 'sofmax'.*Did you mean 'softmax'"):
        ac.convert(model, inputs, dtype="bfloat16", force_low=["sofmax"])


def test_override_of_a_wrong_type_raises_config_error(gpt_graph):
    _, _, graph = gpt_graph
    with pytest.raises(ConfigError, match="entries must be"):
        _resolve(graph, keep_fp32=(3,))
    with pytest.raises(ConfigError, match="matches no"):
        _resolve(graph, keep_fp32=("blocks.*.nothing",))  # a path nothing is near


def test_a_kind_or_class_the_model_lacks_warns_and_is_ignored(gpt_graph):
    """A recipe shared across models (force_low=("add", "layer_norm")) must not fail on a model
    without one of them; a misspelt kind still fails, with its suggestion."""
    from amp_compiler.errors import UnusedOverrideWarning

    model, inputs, graph = gpt_graph
    with pytest.warns(UnusedOverrideWarning, match="'conv'.*no op of that kind"):
        got = _resolve(graph, keep_fp32=("conv", "softmax"))
    assert set(got.keep_fp32) == set(_resolve(graph, keep_fp32=("softmax",)).keep_fp32)
    with pytest.warns(UnusedOverrideWarning, match="Conv2d.*no module of that class"):
        assert _resolve(graph, keep_fp32=(nn.Conv2d,)).keep_fp32 == {}
    with pytest.warns(UnusedOverrideWarning):
        amp = ac.convert(model, inputs, dtype="bfloat16", force_low=("conv", "layer_norm"))
    assert all(d.rule == "R6:force_low" for d in amp.plan.values() if d.kind == "layer_norm")
    with pytest.raises(ConfigError, match="Did you mean 'conv'"):
        _resolve(graph, keep_fp32=("convv",))


def test_override_entries_take_one_string_or_class_as_one_entry():
    from amp_compiler.passes.classify import override_entries

    assert override_entries("softmax") == ("softmax",)
    assert override_entries(torch.nn.LayerNorm) == (torch.nn.LayerNorm,)
    assert override_entries(["softmax", "node:fc1"]) == ("softmax", "node:fc1")
    assert override_entries(()) == ()


# -- C4: node-name regexes ("re:<pattern>", re.search semantics) ----------------------------

def test_override_by_node_name_regex_searches_every_compute_node(gpt_graph):
    _, _, graph = gpt_graph
    compute = [v.name for v in graph.vertices() if v.role == "compute"]
    # anchored: exactly the names the pattern spans
    cls = _resolve(graph, keep_fp32=(r"re:^linear_[14]$",))
    assert cls.keep_fp32 == {"linear_1": r"re:^linear_[14]$", "linear_4": r"re:^linear_[14]$"}
    # unanchored: re.search, so "max" is found inside "softmax" and "softmax_1"
    cls = _resolve(graph, force_low=("re:max",))
    assert set(cls.force_low) == {n for n in compute if "max" in n}
    assert {"softmax", "softmax_1"} <= set(cls.force_low)
    # only compute nodes: the inputs / parameters a pattern also matches are not selected
    sources = [v.name for v in graph.vertices() if v.role != "compute"]
    cls = _resolve(graph, keep_fp32=("re:.",))
    assert set(cls.keep_fp32) == set(compute) and not set(cls.keep_fp32) & set(sources)


def test_bad_or_unused_regex_override(gpt_graph):
    from amp_compiler.errors import UnusedOverrideWarning

    _, _, graph = gpt_graph
    with pytest.raises(ConfigError, match=r"keep_fp32 entry 're:linear\(' is not a valid regular"):
        _resolve(graph, keep_fp32=("re:linear(",))
    with pytest.warns(UnusedOverrideWarning, match=r"force_low entry 're:\^no_such_node'.*matches nothing"):
        cls = _resolve(graph, force_low=("re:^no_such_node", "softmax"))
    assert set(cls.force_low) == {"softmax", "softmax_1"}  # the other entries still apply


def test_regex_overrides_reach_the_torch_plan(gpt_graph):
    model, inputs, _ = gpt_graph
    amp = ac.convert(model, inputs, dtype="bfloat16", keep_fp32=(r"re:^linear(_4)?$",),
                     force_low=("re:^layer_norm$",))
    for n in nodes_of(amp.plan, "linear"):
        d = amp.plan[n]
        if n in ("linear", "linear_4"):
            assert (d.precision, d.rule) == (torch.float32, "R6:keep_fp32") and "re:^linear" in d.reason
        else:
            assert d.precision == torch.bfloat16
    assert (amp.plan["layer_norm"].precision, amp.plan["layer_norm"].rule) == (torch.bfloat16, "R6:force_low")
    assert amp(*inputs).dtype == model(*inputs).dtype
