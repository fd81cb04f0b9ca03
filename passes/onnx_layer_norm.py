"""onnx_layer_norm (ONNX rewrite, rule O11 of ``convert_onnx``): decomposed LayerNorms fused.

Exporters before opset 17 (and hand-written norms) spell ``nn.LayerNorm`` as nine ops. Written
out, its ``Pow`` is an R2 deny op, so in a low plan every norm is an fp32 island with Casts at
its borders; as one ``LayerNormalization`` (opset >= 17, ``stash_type=1``: mean and variance in
float32 whatever the input type) it runs low with none, and ONNX Runtime runs one kernel.

Rule N1: the pattern, over the last axis only, every intermediate read by the pattern alone:

    1.  m = ReduceMean(x, axes=[-1])          (axes an attribute, or an input from opset 18)
    2.  d = Sub(x, m)
    3.  p = Pow(d, 2) or Mul(d, d)
    4.  v = ReduceMean(p, axes=[-1])
    5.  s = Sqrt(Add(v, eps))                 (eps a scalar initializer)
    6.  n = Div(d, s)
    7.  y = Mul(n, gamma), then optionally Add(y, beta): 1-D initializers become the node's Scale
        and B (Scale has no default, so a norm without an affine gamma is left written out).

becomes ``LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)`` writing the last output of
the pattern. Models below opset 17 are left as they are (``convert_onnx(opset=17)`` first).

    >>> fused = fuse_layer_norms(model).facts
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from .infra import PassResult, Remark, result
from .onnx_cast_placement import value_readers
from .onnx_graph import opset_of
from .rules import Rule

MIN_OPSET = 17
# what a fused node's Decision adds to its reason
FUSED_NOTE = ("O11: fused from its written-out form (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, "
              "Div, Mul, Add): one LayerNormalization computes in fp32 inside (stash_type=1)")


def _last_axis_only(node: onnx.NodeProto, inits: dict) -> bool:
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1 and node.input[1] in inits:
        axes = numpy_helper.to_array(inits[node.input[1]]).reshape(-1).tolist()
    keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
    return axes == [-1] and keep == 1


def _scalar(name: str, inits: dict) -> float | None:
    t = inits.get(name)
    if t is None:
        return None
    a = numpy_helper.to_array(t)
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def fuse_layer_norms(model: onnx.ModelProto) -> PassResult:
    """Rule N1 (pattern steps 1-7) on the top-level graph, in place; one remark per fused node,
    ``facts`` their names."""
    if (opset_of(model) or 0) < MIN_OPSET:
        return result(model, facts=[])
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    fused: list[str] = []
    changed = True
    while changed:
        changed = False
        nodes = list(g.node)
        readers = value_readers(nodes)

        def only(value: str, op_types: tuple[str, ...]):
            """The single reader of ``value`` if it is one of ``op_types`` and ``value`` is not
            a graph output."""
            rs = readers.get(value, [])
            return rs[0] if len(rs) == 1 and rs[0].op_type in op_types and value not in outputs else None

        for mean in nodes:
            match = _match(mean, readers, only, inits, outputs)
            if match is None:
                continue
            x, eps, gamma, beta, last, dead = match
            name = f"{mean.name or 'layer_norm'}_fused"
            inputs = [x, gamma, beta] if beta else [x, gamma]
            g.node.insert(list(g.node).index(mean),
                          helper.make_node("LayerNormalization", inputs, [last], name=name,
                                           axis=-1, epsilon=eps))
            for n in dead:
                g.node.remove(n)
            fused.append(name)
            changed = True
            break
    if fused:  # the removed intermediates' value_info describes nothing any more
        made = {o for n in g.node for o in n.output}
        keep = [v for v in g.value_info if v.name in made]
        del g.value_info[:]
        g.value_info.extend(keep)
    return result(model, [Remark("onnx_layer_norm", Rule.N1_LAYER_NORM, n, FUSED_NOTE) for n in fused],
                  facts=fused)


def _match(mean, readers, only, inits, outputs):
    """(x, eps, gamma, beta, output, nodes to remove) when ``mean`` starts rules L1-L7."""
    if mean.op_type != "ReduceMean" or mean.domain not in ("", "ai.onnx") or not _last_axis_only(mean, inits):
        return None
    x = mean.input[0]
    sub = only(mean.output[0], ("Sub",))
    if sub is None or list(sub.input) != [x, mean.output[0]]:
        return None
    d = sub.output[0]
    d_readers = list({r.output[0]: r for r in readers.get(d, [])}.values())  # Mul(d, d) reads it twice
    if len(d_readers) != 2 or d in outputs:
        return None
    square = next((r for r in d_readers if r.op_type in ("Pow", "Mul")), None)
    div = next((r for r in d_readers if r.op_type == "Div"), None)
    if square is None or div is None or list(div.input)[0] != d:
        return None
    if square.op_type == "Pow" and _scalar(square.input[1], inits) != 2.0:
        return None
    if square.op_type == "Mul" and list(square.input) != [d, d]:
        return None
    var = only(square.output[0], ("ReduceMean",))
    if var is None or not _last_axis_only(var, inits):
        return None
    add = only(var.output[0], ("Add",))
    eps = None if add is None else _scalar(next((i for i in add.input if i != var.output[0]), ""), inits)
    sqrt = None if add is None else only(add.output[0], ("Sqrt",))
    if eps is None or sqrt is None or list(div.input)[1] != sqrt.output[0] or \
            only(sqrt.output[0], ("Div",)) is not div:
        return None
    dead, last = [mean, sub, square, var, add, sqrt, div], div.output[0]
    gamma = beta = None
    mul = only(last, ("Mul",))
    if mul is not None:
        other = next((i for i in mul.input if i != last), None)
        if other in inits and len(inits[other].dims) == 1:
            gamma, last = other, mul.output[0]
            dead.append(mul)
            plus = only(last, ("Add",))
            other = None if plus is None else next((i for i in plus.input if i != last), None)
            if other in inits and len(inits[other].dims) == 1 and list(inits[other].dims) == list(inits[gamma].dims):
                beta, last = other, plus.output[0]
                dead.append(plus)
    if gamma is None:  # Scale is required: ones of the normalised axis's size, which we cannot know
        return None
    return x, eps, gamma, beta, last, dead
