"""Canonical op kinds: one vocabulary for every front end.

Front ends name the same operation many ways: ``torch.nn.functional.linear``, ``Tensor.softmax``,
``torch.ops.aten.softmax.int``, ``operator.add``, ONNX ``Softmax``. The analyses never see
those names; they see a *kind* such as ``"linear"`` or ``"softmax"``. This file holds the
tables that map names to kinds. They are data: add a name here, never an ``if`` in a pass.

    >>> torch_kind("_softmax"), torch_kind("__iadd__"), torch_kind("conv2d")
    ('softmax', 'add', 'conv')
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.fx as fx
from torch import nn

# Aliases from torch-level names (function ``__name__``, method names, aten overload packet
# names) to canonical kinds. Names not listed map to themselves (``"gelu"`` -> ``"gelu"``),
# after stripping the dunder / in-place spellings (``__add__``, ``add_``, ``iadd``).
TORCH_ALIASES: dict[str, str] = {
    # matrix products
    "mm": "matmul", "bmm": "matmul", "matmul": "matmul", "einsum": "matmul", "mv": "matmul",
    "baddbmm": "matmul", "addbmm": "matmul", "addmm": "linear", "addmv": "linear",
    "linear": "linear", "chain_matmul": "matmul", "multi_dot": "matmul",
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv",
    "_convolution": "conv", "conv_transpose1d": "conv", "conv_transpose2d": "conv",
    "conv_transpose3d": "conv", "conv_tbc": "conv",
    "scaled_dot_product_attention": "sdpa",
    "_scaled_dot_product_flash_attention": "sdpa",
    "_scaled_dot_product_efficient_attention": "sdpa",
    "_scaled_dot_product_flash_attention_for_cpu": "sdpa",
    "lstm": "rnn", "gru": "rnn", "rnn_tanh": "rnn", "rnn_relu": "rnn",
    "lstm_cell": "rnn", "gru_cell": "rnn", "rnn_tanh_cell": "rnn", "rnn_relu_cell": "rnn",
    # normalisation
    "native_layer_norm": "layer_norm", "native_group_norm": "group_norm",
    "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit_functional": "batch_norm",
    "_native_batch_norm_legit": "batch_norm", "native_batch_norm": "batch_norm",
    "rms_norm": "rms_norm", "_fused_rms_norm": "rms_norm",
    "instance_norm": "instance_norm",
    "_softmax": "softmax", "_log_softmax": "log_softmax", "_safe_softmax": "softmax",
    # losses
    "cross_entropy_loss": "cross_entropy", "nll_loss_nd": "nll_loss", "nll_loss2d": "nll_loss",
    "binary_cross_entropy_with_logits": "bce_with_logits",
    "binary_cross_entropy": "bce",
    # arithmetic
    "truediv": "div", "floordiv": "floor_divide", "rsub": "sub", "neg": "neg",
    "square": "pow", "float_power": "pow",
    # movement / selection
    "_unsafe_view": "view", "view_as": "view", "_reshape_alias": "view", "reshape": "view",
    "flatten": "view", "unflatten": "view", "squeeze": "view", "unsqueeze": "view",
    "expand_as": "expand", "t": "transpose", "swapaxes": "transpose", "mT": "transpose",
    "numpy_T": "transpose", "split_with_sizes": "split", "tensor_split": "split",
    "unbind": "split", "slice": "select", "narrow": "select", "index_select": "gather",
    "take_along_dim": "gather", "alias": "identity", "lift_fresh_copy": "identity",
    "feature_dropout": "dropout", "dropout1d": "dropout", "dropout2d": "dropout",
    "dropout3d": "dropout", "native_dropout": "dropout", "alpha_dropout": "dropout",
    "max_pool1d": "max_pool", "max_pool2d": "max_pool", "max_pool3d": "max_pool",
    "max_pool2d_with_indices": "max_pool", "adaptive_max_pool2d": "max_pool",
    "adaptive_max_pool1d": "max_pool",
    "avg_pool1d": "avg_pool", "avg_pool2d": "avg_pool", "avg_pool3d": "avg_pool",
    "adaptive_avg_pool1d": "avg_pool", "adaptive_avg_pool2d": "avg_pool",
    "adaptive_avg_pool3d": "avg_pool", "_adaptive_avg_pool2d": "avg_pool",
    "mean": "mean", "sum": "sum", "nansum": "sum",
    "hardtanh": "clamp", "clip": "clamp", "clamp_min": "clamp", "clamp_max": "clamp",
    "relu6": "clamp",
    "new_ones": "factory", "new_zeros": "factory", "new_full": "factory", "new_empty": "factory",
    "ones": "factory", "zeros": "factory", "full": "factory", "empty": "factory",
    "arange": "factory", "ones_like": "factory", "zeros_like": "factory",
    "full_like": "factory", "empty_like": "factory", "rand": "factory", "randn": "factory",
    "rand_like": "factory", "randn_like": "factory", "tensor": "factory",
    "scalar_tensor": "factory", "linspace": "factory", "eye": "factory",
    "scaled_dot_product": "sdpa",
    "_to_copy": "cast", "to": "cast", "type": "cast", "float": "cast", "half": "cast",
    "bfloat16": "cast", "double": "cast", "long": "cast", "int": "cast", "bool": "cast",
    "type_as": "cast", "_assert_tensor_metadata": "assert", "_assert_is_none": "assert",
    "_assert": "assert", "_assert_async": "assert", "_assert_scalar": "assert",
    "sym_constrain_range_for_size": "assert", "_check": "assert", "_check_is_size": "assert",
    "sym_size": "shape", "size": "shape", "dim": "shape", "sym_numel": "shape", "numel": "shape",
    "getattr": "shape", "sym_stride": "shape", "stride": "shape",
    "eq": "compare", "ne": "compare", "lt": "compare", "le": "compare", "gt": "compare",
    "ge": "compare", "logical_not": "compare", "logical_and": "compare",
    "logical_or": "compare", "isnan": "compare", "isinf": "compare", "isfinite": "compare",
    "argmax": "argmax", "argmin": "argmax", "topk": "topk", "sort": "sort",
    "silu": "silu", "swish": "silu", "mish": "silu", "hardswish": "silu",
    "hardsigmoid": "sigmoid", "logsigmoid": "log_sigmoid",
    "softplus": "softplus", "erf": "erf", "erfinv": "erfinv",
    # complex numbers (aten's spellings of what torch.fft and Tensor.conj call)
    "_fft_r2c": "fft_rfft", "_fft_c2r": "fft_irfft", "_fft_c2c": "fft_fft", "_conj": "conj",
    "conj_physical": "conj", "resolve_conj": "identity", "resolve_neg": "identity",
    "view_as_complex_copy": "view_as_complex", "view_as_real_copy": "view_as_real",
}

# Tensor attributes that are tensors (``z.real``, ``x.mT``): fx records them as ``getattr``
# nodes, which are otherwise metadata reads (``x.shape``, ``x.dtype``).
TENSOR_ATTRIBUTES: dict[str, str] = {
    "real": "real", "imag": "imag", "T": "transpose", "mT": "transpose", "H": "transpose",
    "mH": "transpose",
}

# Complex numbers, for front ends that record no dtypes (fx): kinds whose output is complex
# whatever their real inputs, and kinds that read complex values and return real ones. Any other
# op is complex when one of its inputs is (``z * 2``, ``z[0]``, ``z.conj()``).
# Source: the torch.fft and torch complex-number API.
MAKES_COMPLEX: frozenset[str] = frozenset({
    "view_as_complex", "polar", "complex", "stft",
    "fft_fft", "fft_ifft", "fft_fft2", "fft_ifft2", "fft_fftn", "fft_ifftn",
    "fft_rfft", "fft_rfft2", "fft_rfftn", "fft_ihfft", "fft_ihfft2", "fft_ihfftn",
})
COMPLEX_TO_REAL: frozenset[str] = frozenset({
    "view_as_real", "real", "imag", "angle", "abs", "istft",
    "fft_irfft", "fft_irfft2", "fft_irfftn", "fft_hfft", "fft_hfft2", "fft_hfftn",
})

# Names that are pure bookkeeping: they produce no tensor and are never painted.
NON_TENSOR_KINDS = frozenset({"shape", "assert", "guards"})


def target_name(node: fx.Node) -> str:
    """An FX node's op name as the tables spell it: aten packet name, function ``__name__``,
    method name, or submodule target."""
    t = node.target
    if node.op in ("call_method", "call_module"):
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    return getattr(t, "__name__", str(t))


def node_arg(node: fx.Node, position: int, names: str | tuple[str, ...], default):
    """An FX node's argument by position, else by keyword (any of ``names``), else ``default``.

    >>> node_arg(dropout_node, 1, "p", 0.5)
    """
    if len(node.args) > position:
        return node.args[position]
    for name in (names,) if isinstance(names, str) else names:
        if name in node.kwargs:
            return node.kwargs[name]
    return default


def casts_to_fp32(node: fx.Node) -> bool:
    """``node`` is ``x.float()`` or a ``to`` / ``_to_copy`` whose one dtype argument is float32
    (a model's own ``.float()``, or the cast restoring an output to fp32)."""
    if target_name(node) == "float":
        return True
    dtypes = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, torch.dtype)]
    return dtypes == [torch.float32]


def torch_kind(name: str) -> str:
    """Map a torch function / method / aten packet name to its canonical kind."""
    if name in TORCH_ALIASES:
        return TORCH_ALIASES[name]
    base = name
    if base.startswith("__") and base.endswith("__"):
        base = base[2:-2]
        if base.startswith("r") and base[1:] in {"add", "sub", "mul", "truediv", "matmul", "pow", "div"}:
            base = base[1:]
        elif base.startswith("i") and base[1:] in {"add", "sub", "mul", "truediv", "matmul", "pow", "div"}:
            base = base[1:]
    if base.endswith("_") and not base.startswith("_"):
        base = base[:-1]
    return TORCH_ALIASES.get(base, base)


# Leaf modules: module classes traced as one node because their forward cannot be
# symbolically traced (Python control flow on input properties, e.g. ``input.dim()`` checks),
# mapped to kinds.
LEAF_MODULE_KINDS: dict[str, str] = {
    "torch.nn.modules.rnn.LSTM": "rnn",
    "torch.nn.modules.rnn.GRU": "rnn",
    "torch.nn.modules.rnn.RNN": "rnn",
    "torch.nn.modules.rnn.LSTMCell": "rnn",
    "torch.nn.modules.rnn.GRUCell": "rnn",
    "torch.nn.modules.rnn.RNNCell": "rnn",
    "torch.nn.modules.batchnorm.BatchNorm1d": "batch_norm",
    "torch.nn.modules.batchnorm.BatchNorm2d": "batch_norm",
    "torch.nn.modules.batchnorm.BatchNorm3d": "batch_norm",
    "torch.nn.modules.batchnorm.SyncBatchNorm": "batch_norm",
    "torch.nn.modules.instancenorm.InstanceNorm1d": "instance_norm",
    "torch.nn.modules.instancenorm.InstanceNorm2d": "instance_norm",
    "torch.nn.modules.instancenorm.InstanceNorm3d": "instance_norm",
}

# Leaf kinds whose parameters must share the compute dtype (cuDNN RNNs); batch/instance norm
# leaves accept a low-precision input with fp32 parameters and need no parameter cast.
LEAF_PARAMS_FOLLOW: frozenset[str] = frozenset({"rnn"})


def fqn(cls: type) -> str:
    """A class's full name, as the leaf-module table keys it: ``torch.nn.modules.rnn.LSTM``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def leaf_kind(m: nn.Module) -> str | None:
    """Kind of a leaf module class, subclasses included (resnet's BatchNorm2d is one)."""
    for cls in type(m).__mro__:
        kind = LEAF_MODULE_KINDS.get(fqn(cls))
        if kind is not None:
            return kind
    return None


def node_kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """Canonical kind of an FX node."""
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "param"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if node.target == "_guards_fn" or type(mod).__name__.endswith("GuardsFn"):
            return "guards"
        return leaf_kind(mod) or f"module:{type(mod).__name__}"
    if node.op == "call_function" and node.target is builtins.getattr:
        # ``z.real``, ``x.mT`` are tensors; ``x.shape``, ``x.dtype`` metadata
        attr = node.args[1] if len(node.args) > 1 else None
        return TENSOR_ATTRIBUTES.get(attr, "shape") if isinstance(attr, str) else "shape"
    if node.op == "call_function" and node.target is operator.getitem:
        return "getitem"
    return torch_kind(target_name(node))
