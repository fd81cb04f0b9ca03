"""fused_patterns (FX rewrite, right after capture): formulas that models spell out op by op
become the one torch op that computes them, before the plan is made.

Hugging Face writes GPT-2's activation and Llama's, T5's, Mistral's RMSNorm as chains of
elementwise ops. Eager PyTorch runs each as a kernel over the whole activation, forward and
backward, and autograd keeps several of their intermediate results for backward: on HF GPT-2
at 8 x 1024 the GELU chain alone is ~12% of the step's GPU time, and the unfused RMSNorm keeps
an fp32 copy of the normalised activation per norm. torch has one op for each formula (one
kernel forward and backward, which keeps its input only and computes in fp32 inside). Rules:

    P1  ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))`` (transformers'
        ``NewGELUActivation``, GPT-2's ``gelu_new``) is ``gelu(x, approximate="tanh")``, the same
        formula; every intermediate value read by the chain only;
    P2  ``x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps)`` is ``rms_norm(x, [H], None, eps)``,
        and with a following ``weight * (that)`` (1-D weight of size H, through a no-op cast
        to fp32) ``rms_norm(x, [H], weight, eps)``; only where ``x`` is fp32 as captured, so that
        the single op computes what the chain computed (in a low dtype the chain promotes to
        fp32 while ``rms_norm`` would not), and only where H is known at capture;
    P3  a chain that starts like a pattern but does not complete it is left as it is, with a
        remark saying which part did not match.
    P4  (training graphs, after the plan: ``fuse_gated_activation``) ``silu(a) * b``, the gated
        MLP of Llama, Mistral and Qwen, with ``silu(a)`` read by the product only, becomes
        ``runtime.silu_mul(a, b)``, which keeps ``a`` and ``b`` for backward and computes
        ``silu(a)`` again there instead of keeping it (autograd keeps all three): one tensor of
        the MLP's width less per layer (Llama at 8 x 1024 x 2816 in bf16: 46 MB a layer) for
        one more elementwise pass in backward. Inference graphs keep nothing: left as is.
    P5  (training graphs, after P4: ``recompute_activations``) an activation read only by the
        matrix product of the next linear layer -- ``linear(act(x), W, b)``, or
        ``addmm(b, act(x).view(-1, K), W)`` (Hugging Face's Conv1D, GPT-2) -- with ``act`` one
        of ``gelu`` (either approximation), ``relu``, ``silu`` or P4's ``silu_mul``, becomes
        ``runtime.activation_linear``: backward computes the activation again from ``x`` for
        the weight's gradient, so ``act(x)`` is not kept beside ``x`` (autograd keeps both:
        the activation's backward reads ``x``, the product's reads ``act(x)``). One MLP-wide
        tensor less per layer (ViT-B at 64 images: 77 MB a layer) for one elementwise pass in
        backward; the gradients are the same bits (the same ops on the same values). Only
        where the product is the activation's one reader (no cast between) and the capture
        recorded both values (not under fx symbolic tracing).
    P6  (training graphs, with P4 and P5: ``fuse_rotary``) ``x * cos + cat((-x2, x1), -1) * sin``
        with ``x1, x2`` the two halves of ``x``'s last dimension (Hugging Face's
        ``apply_rotary_pos_emb``, applied to q and to k), every intermediate read by the formula
        only, becomes ``runtime.rotary(x, cos, sin)``: the same forward ops, and autograd's
        gradient, bit for bit, as ``g * cos + turn(g * sin)`` in five kernels, where autograd
        runs nine through the cat, the neg and the two slices (zero-filled halves, then added);
        seven against eleven with fp32 phases (each product's gradient cast to x's dtype).
        (Computing it in fp32 and rounding once, one rounding fewer, measured 1.2x-1.3x the
        gradient error of HF Llama and Qwen2 against fp32: kept autograd's roundings.)

Numerics: the fused ops compute in fp32 inside (``opmath``) and round once; the chains they
replace round after every op in a low dtype, so a fused GELU is at least as accurate.

    >>> [r.rule for r in fuse_patterns(gm)][:1]
    ['P1:gelu-tanh']
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import runtime
from .graph import attribute
from .kinds import casts_to_fp32, node_arg, target_name
from .rules import Rule
from .infra import PassResult, Remark, result

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_MUL, _ADD = frozenset({"mul", "__mul__", "__rmul__"}), frozenset({"add", "__add__", "__radd__"})
_NOOP_CASTS = frozenset({"to", "_to_copy", "float", "type_as"})


def fuse_patterns(gm: fx.GraphModule) -> PassResult:
    """Rules P1-P3 on ``gm`` in place; one remark per fused or missed pattern."""
    remarks: list[Remark] = []
    for node in list(gm.graph.nodes):  # nothing is erased before the dead-code pass (_tidied)
        if node.op not in ("call_function", "call_method"):
            continue
        name = target_name(node)
        if name == "tanh":
            remarks += _gelu_tanh(gm, node)
        elif name == "rsqrt":
            remarks += _rms_norm(gm, node)
    return _tidied(gm, remarks)


def fuse_gated_activation(gm: fx.GraphModule) -> PassResult:
    """Rule P4 on a training graph in place (after casts are inserted: the two ops' dtypes are
    settled); one remark per gated product."""
    remarks = []
    for silu in [n for n in gm.graph.nodes if _is(n, {"silu"}) and not n.kwargs.get("inplace")]:
        if len(silu.users) != 1 or not _is(next(iter(silu.users)), _MUL):
            continue
        mul = next(iter(silu.users))
        other = next((o for o in _operands(mul) if o is not silu), None)
        if not isinstance(other, fx.Node) or "alpha" in mul.kwargs:
            continue
        a = node_arg(silu, 0, ("self", "input"), None)
        new = _replace(gm, mul, runtime.silu_mul, (a, other), {}, "silu_mul")
        remarks.append(Remark("fused_patterns", Rule.P4_SILU_MUL, new.name,
                              f"silu('{a.name}') * '{other.name}' keeps its two inputs for backward and "
                              "computes silu again there: the activation is not kept as well"))
    return _tidied(gm, remarks)


_ACTIVATIONS = frozenset({"gelu", "relu", "silu", "silu_mul"})
_FLATTENS = frozenset({"view", "reshape", "_unsafe_view"})


def recompute_activations(gm: fx.GraphModule) -> PassResult:
    """Rule P5 on a training graph in place (after casts are inserted and P4); one remark per
    activation whose output is no longer kept for backward."""
    remarks = []
    for act in [n for n in gm.graph.nodes if _is(n, _ACTIVATIONS) and not n.kwargs.get("inplace")]:
        found = _activation_product(act)
        if found is None:
            continue
        product, kind, transposed = found
        x = node_arg(act, 0, ("self", "input", "a"), None)
        gate = node_arg(act, 1, "b", None) if kind == "silu_mul" else None
        if transposed:  # addmm(bias, mat1, mat2)
            bias, weight = node_arg(product, 0, "self", None), node_arg(product, 2, "mat2", None)
        else:
            weight, bias = node_arg(product, 1, "weight", None), node_arg(product, 2, "bias", None)
        # the product node becomes the fused call: its name, which its plan decision names, and
        # its meta stay; the activation is left unread and goes
        product.target, product.kwargs = runtime.activation_linear, {}
        product.args = (x, gate, weight, bias, kind, transposed)
        name = product.name
        what = "silu(x) * gate" if kind == "silu_mul" else f"{kind}(x)"
        remarks.append(Remark("fused_patterns", Rule.P5_RECOMPUTE, name,
                              f"{what} ('{act.name}') over '{x.name}' is read only by '{name}': "
                              "backward computes it again from x, so it is not kept beside x"))
    return _tidied(gm, remarks)


def _activation_product(act: fx.Node):
    """(product node, activation kind, transposed) when ``act``'s only reader is a linear
    layer's input (through a flattening view for ``addmm``)."""
    name = target_name(act)
    kind = name
    if name == "gelu":
        approximate = node_arg(act, 1, "approximate", "none")
        kind = "gelu_tanh" if approximate == "tanh" else "gelu" if approximate == "none" else None
    if kind is None or len(act.users) != 1:
        return None
    reader = next(iter(act.users))
    if _is(reader, {"linear"}) and node_arg(reader, 0, "input", None) is act:
        product, transposed = reader, False
    elif _is(reader, _FLATTENS) and len(reader.users) == 1 and _flattens_to_rows(reader, act):
        product = next(iter(reader.users))
        if not (_is(product, {"addmm"}) and node_arg(product, 1, "mat1", None) is reader) \
                or "beta" in product.kwargs or "alpha" in product.kwargs:
            return None
        transposed = True
    else:
        return None
    if None in (_dtype(act), _dtype(product)):
        return None  # not recorded: fx symbolic capture
    return product, kind, transposed


def _flattens_to_rows(view: fx.Node, act: fx.Node) -> bool:
    """``view`` makes ``act``'s value 2-D, its last dimension kept: ``view(x, [-1, K])``."""
    shape = view.args[1] if len(view.args) == 2 else view.args[1:]
    size = _last_size(act)
    return isinstance(shape, (list, tuple)) and len(shape) == 2 and size is not None \
        and shape[-1] == size


def fuse_rotary(gm: fx.GraphModule) -> PassResult:
    """Rule P6 on a training graph in place; one remark per rotary embedding fused."""
    remarks = []
    for add in [n for n in gm.graph.nodes if _is(n, _ADD) and "alpha" not in n.kwargs]:
        found = _rotary(add)
        if found is None:
            continue
        x, cos, sin = found
        # the add becomes the fused call (its name and plan decision stay); the rest goes
        add.target, add.args, add.kwargs = runtime.rotary, (x, cos, sin), {}
        remarks.append(Remark("fused_patterns", Rule.P6_ROTARY, add.name,
                              f"'{x.name}' * '{cos.name}' + rotate_half('{x.name}') * '{sin.name}' "
                              "computes the same forward, and autograd's gradient without the "
                              "slices' zero-filled gradients (5 kernels instead of 9)"))
    return _tidied(gm, remarks)


def _rotary(add: fx.Node):
    """(x, cos, sin) when ``add`` is ``x * cos + cat((-x[..., h:], x[..., :h]), -1) * sin``."""
    a, b = _operands(add)
    for straight, turned in ((a, b), (b, a)):
        if not (_is(straight, _MUL) and _is(turned, _MUL) and len(straight.users) == 1
                and len(turned.users) == 1):
            continue
        for cat, sin in (_operands(turned), _operands(turned)[::-1]):
            if not _is(cat, {"cat"}) or len(cat.users) != 1 or not isinstance(sin, fx.Node):
                continue
            x = _rotated_half_of(cat)
            if x is None:
                continue
            s1, s2 = _operands(straight)
            cos = s2 if s1 is x else s1 if s2 is x else None
            if isinstance(cos, fx.Node) and cos is not x and sin is not x:
                return x, cos, sin
    return None


def _rotated_half_of(cat: fx.Node):
    """x when ``cat`` is ``cat((-x[..., h:], x[..., :h]), -1)`` with ``2h`` x's last size."""
    parts, dim = node_arg(cat, 0, "tensors", None), node_arg(cat, 1, "dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    neg, first = parts
    if not (_is(neg, {"neg"}) and len(neg.users) == 1 and _is(first, {"slice"})):
        return None
    second = node_arg(neg, 0, ("self", "input"), None)
    if not _is(second, {"slice"}):
        return None
    x = node_arg(first, 0, ("self", "input"), None)
    size, rank = _last_size(x) if isinstance(x, fx.Node) else None, _rank(x) if isinstance(x, fx.Node) else None
    if size is None or size % 2 or node_arg(second, 0, ("self", "input"), None) is not x \
            or dim not in (-1, rank - 1) or len(first.users) != 1 or len(second.users) != 1:
        return None
    half = size // 2
    spans = [(node_arg(s, 1, "dim", 0), node_arg(s, 2, "start", None), node_arg(s, 3, "end", None))
             for s in (first, second)]
    last = (-1, rank - 1)
    if spans[0][0] in last and spans[1][0] in last and spans[0][1] in (0, None) \
            and spans[0][2] == half and spans[1][1] == half and spans[1][2] is not None \
            and spans[1][2] >= size and node_arg(second, 4, "step", 1) == 1 and node_arg(first, 4, "step", 1) == 1:
        return x
    return None


def _tidied(gm: fx.GraphModule, remarks: list[Remark]) -> PassResult:
    """After a rewrite that fused something: the unread nodes gone and the code regenerated."""
    out = result(gm, remarks)
    if out.modified:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return out


# -- matching helpers ---------------------------------------------------------------------------

def _is(node, names) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") \
        and target_name(node) in names


def _operands(node: fx.Node) -> tuple:
    """A binary op's two operands, keywords too (``mul(self, other)``)."""
    return node_arg(node, 0, ("self", "input"), None), node_arg(node, 1, "other", None)


def _with_scalar(node, names, value: float, tol: float = 1e-6):
    """For a binary op ``node`` of ``names`` with one operand the number ``value``: the other
    operand, else None (commutative: the scalar on either side)."""
    if not _is(node, names) or "alpha" in node.kwargs:
        return None
    a, b = _operands(node)
    for tensor, scalar in ((a, b), (b, a)):
        if isinstance(tensor, fx.Node) and isinstance(scalar, (int, float)) \
                and math.isclose(float(scalar), value, rel_tol=tol, abs_tol=tol * 1e-3):
            return tensor
    return None


def _scalar_operand(node):
    """(tensor operand, the number) of a binary op with one number, else (None, None)."""
    a, b = _operands(node)
    if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return b, float(a)
    return None, None


def _only_reader(node: fx.Node, reader: fx.Node) -> bool:
    return list(node.users) == [reader]


def _is_aten(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload)


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return getattr(val, "dtype", None)


def _replace(gm: fx.GraphModule, old: fx.Node, target, args: tuple, kwargs: dict, suffix: str) -> fx.Node:
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args, kwargs)
    new.meta.update({k: v for k, v in old.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")})
    old.replace_all_uses_with(new)
    new._rename(f"{old.name}_{suffix}")
    return new


# -- P1 ------------------------------------------------------------------------------------------

def _gelu_tanh(gm: fx.GraphModule, tanh: fx.Node) -> list[Remark]:
    inner = node_arg(tanh, 0, ("self", "input"), None)
    pre = _with_scalar(inner, _MUL, _SQRT_2_OVER_PI)       # x + 0.044715 * x ** 3
    if pre is None or not _is(pre, _ADD) or "alpha" in pre.kwargs:
        return []  # a tanh of something else: not a GELU
    a, b = _operands(pre)
    x = cube = None
    for cand_x, cand_c in ((a, b), (b, a)):
        pw = _with_scalar(cand_c, _MUL, 0.044715)
        if pw is not None and _is(pw, {"pow", "__pow__"}) and node_arg(pw, 0, ("self", "input"), None) is cand_x \
                and node_arg(pw, 1, "exponent", None) in (3, 3.0):
            x, cube = cand_x, (cand_c, pw)
    if x is None:
        return [_missed(tanh, Rule.P1_NO_MATCH, "a tanh of a sum, but not sqrt(2/pi) * (x + 0.044715 * x ** 3)")]
    one_plus = next(iter(tanh.users), None) if len(tanh.users) == 1 else None
    if _with_scalar(one_plus, _ADD, 1.0) is not tanh or len(one_plus.users) != 1:
        return [_missed(tanh, Rule.P1_NO_MATCH, "the GELU's inner tanh is not read as 1 + tanh(...) only")]
    out = next(iter(one_plus.users))
    half = next((o for o in _operands(out) if o is not one_plus), None) if _is(out, _MUL) else None
    if _with_scalar(half, _MUL, 0.5) is not x or not _only_reader(half, out):
        return [_missed(tanh, Rule.P1_NO_MATCH, "1 + tanh(...) is not multiplied by 0.5 * x")]
    chain = [inner, pre, *cube, tanh, one_plus]
    if not all(len(n.users) == 1 for n in chain):
        return [_missed(tanh, Rule.P1_NO_MATCH, "an intermediate value of the GELU is read elsewhere")]
    target = torch.ops.aten.gelu.default if _is_aten(out) else F.gelu
    new = _replace(gm, out, target, (x,), {"approximate": "tanh"}, "gelu")
    return [Remark("fused_patterns", Rule.P1_GELU_TANH, new.name,
                   f"0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))) over '{x.name}' is "
                   "gelu(x, approximate='tanh'): one kernel forward and backward instead of 8 and "
                   "~10, and only x kept for backward")]


# -- P2 ------------------------------------------------------------------------------------------

def _rms_norm(gm: fx.GraphModule, rsqrt: fx.Node) -> list[Remark]:
    plus = node_arg(rsqrt, 0, ("self", "input"), None)
    if not _is(plus, _ADD) or "alpha" in plus.kwargs:
        return []
    mean, eps = _scalar_operand(plus)
    if not _is(mean, {"mean"}):
        return []  # rsqrt of something else: not a norm
    square = node_arg(mean, 0, ("self", "input"), None)
    dims = node_arg(mean, 1, "dim", None)
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if not (_is(square, {"pow", "__pow__"}) and node_arg(square, 1, "exponent", None) in (2, 2.0)):
        return [_missed(rsqrt, Rule.P2_NO_MATCH, "rsqrt(mean(...) + eps) of something other than a square")]
    base = node_arg(square, 0, ("self", "input"), None)
    if node_arg(mean, 2, "keepdim", False) is not True:
        return [_missed(rsqrt, Rule.P2_NO_MATCH, "the mean of squares does not keep its dimension")]
    out = next(iter(rsqrt.users)) if len(rsqrt.users) == 1 else None
    x = next((o for o in _operands(out) if o is not rsqrt), None) if _is(out, _MUL) else None
    if x is None or not (x is base or (_is(base, _NOOP_CASTS) and node_arg(base, 0, ("self", "input"), None) is x)):
        return [_missed(rsqrt, Rule.P2_NO_MATCH, "the normalised value is not the squared one times rsqrt(...)")]
    size = _last_size(x)
    if size is None or dims[0] not in (-1, _rank(x) - 1 if _rank(x) else -1) or len(dims) != 1:
        return [_missed(rsqrt, Rule.P2_NO_MATCH, "the norm is not over the last dimension of a known size")]
    if not _fp32(x, base):
        return [_missed(rsqrt, Rule.P2_NO_MATCH, "the input is not fp32 as captured: the op chain promotes, "
                                     "rms_norm would not")]
    if not all(len(n.users) == 1 for n in (square, mean, plus)) or \
            (base is not x and len(base.users) != 1):
        return [_missed(rsqrt, Rule.P2_NO_MATCH, "an intermediate value of the norm is read elsewhere")]
    weight, last = _weight(gm, out, size)
    target = torch.ops.aten.rms_norm.default if _is_aten(out) else F.rms_norm
    new = _replace(gm, last, target, (x, [size], weight, eps), {}, "rms_norm")
    with_weight = f" and the weight '{weight.name}'" if weight is not None else ""
    return [Remark("fused_patterns", Rule.P2_RMS_NORM, new.name,
                   f"x * rsqrt(mean(x**2, -1) + {eps:g}){with_weight} over '{x.name}' is "
                   f"rms_norm(x, [{size}], eps={eps:g}): one kernel forward and backward instead "
                   "of 5 and ~8, and no normalised copy kept for backward")]


def _weight(gm: fx.GraphModule, normed: fx.Node, size: int):
    """(weight node, last node of the norm) when ``weight * normed`` (through a no-op cast to
    fp32) follows with a 1-D weight of ``size``; else (None, normed)."""
    value = normed
    if len(value.users) == 1 and _is(next(iter(value.users)), _NOOP_CASTS):
        cast = next(iter(value.users))
        if _dtype(cast) == torch.float32 and casts_to_fp32(cast):
            value = cast
    if len(value.users) != 1 or len(normed.users) != 1:
        return None, normed
    mul = next(iter(value.users))
    if not _is(mul, _MUL):
        return None, normed
    other = next((o for o in _operands(mul) if o is not value), None)
    if not isinstance(other, fx.Node) or other.op != "get_attr":
        return None, normed
    w = attribute(gm, str(other.target))
    if not (isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == size and w.dtype == torch.float32):
        return None, normed
    if value is not normed:  # the no-op cast goes with the chain
        value.replace_all_uses_with(normed)
    return other, mul


def _fp32(x: fx.Node, base: fx.Node) -> bool:
    dtype = _dtype(x)
    if dtype is not None:
        return dtype == torch.float32 and _dtype(base) in (None, torch.float32)
    # symbolic capture (no dtypes): the squared value must be an explicit cast to fp32
    return base is not x and casts_to_fp32(base)


def _last_size(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is not None and len(shape) and isinstance(shape[-1], int):
        return int(shape[-1])
    return None


def _rank(node: fx.Node) -> int | None:
    shape = getattr(node.meta.get("val"), "shape", None)
    return len(shape) if shape is not None else None


def _missed(node: fx.Node, rule: Rule, why: str) -> Remark:
    return Remark("fused_patterns", rule, node.name, f"{why}: left unfused (P3)", missed=True)

