"""Policy tables: which category each canonical op kind belongs to, per (device type, low dtype).

Categories (TensorFlow's AMP taxonomy plus ``fp32_acc`` and ``complex``):

- ``allow``    tensor-core ops, always low precision.
- ``deny``     numerically dangerous in low precision; fp32, and fp32 spreads forward through
               ``infer``/``clear`` ops.
- ``fp32_acc`` kernels that accumulate in fp32 internally (norms, softmax, mean): low precision
               when producer and every consumer are low, fp32 otherwise.
- ``infer``    elementwise arithmetic: follows its neighbours.
- ``clear``    movement / selection / exact ops: never changes values, follows its neighbours.
- ``complex``  ops that make or read complex numbers (``view_as_complex``, ``torch.fft``, ``|z|``):
               fp32, their complex values complex64 (rule R9). Not a kind table: classify's
               rule C6 gives it by the values an op touches, since ``abs`` or ``mul`` are only
               complex on complex inputs. Source: torch has no complex bfloat16, and complex32
               has few kernels (``view_as_complex`` refuses bfloat16, CPU ``torch.fft`` both).
- ``unknown``  anything not in the tables: fp32, stops propagation, listed in the report.

Every table notes its source once. Never scatter op names through pass code: add them here.

    >>> policy_for("cuda", torch.float16).category("linear")
    'allow'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

CATEGORIES = ("allow", "deny", "fp32_acc", "infer", "clear", "complex", "unknown")

# Source: torch.autocast's CUDA "lower_precision_fp" list (aten/src/ATen/autocast_mode.cpp)
# and TensorFlow's AllowList (grappler/optimizers/auto_mixed_precision_lists.h): matrix units.
ALLOW: frozenset[str] = frozenset({
    "linear", "matmul", "conv", "sdpa", "rnn", "prelu",
})

# Source: torch.autocast's CUDA "fp32" and "fp32_set_opt_dtype" lists (exp, log, pow, losses,
# sums, cumulative ops, norms of vectors) and TensorFlow's DenyList (Exp, Log, Pow, SoftmaxCrossEntropy,
# Sum). softmax / log_softmax / layer_norm / group_norm are deliberately NOT here: see FP32_ACC.
DENY: frozenset[str] = frozenset({
    "exp", "expm1", "log", "log2", "log10", "log1p", "pow", "reciprocal", "rsqrt", "sqrt",
    "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "log_sigmoid",
    "sum", "prod", "cumsum", "cumprod", "logsumexp", "var", "std", "var_mean", "std_mean",
    "norm", "frobenius_norm", "nuclear_norm", "linalg_vector_norm", "renorm", "dist", "cdist",
    "pdist", "cosine_similarity", "normalize",
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "kl_div", "bce", "bce_with_logits", "poisson_nll_loss", "cosine_embedding_loss",
    "hinge_embedding_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
})

# Source: ours. Their CUDA kernels read low-precision input and accumulate in fp32 (verified in
# aten/src/ATen/native/cuda: layer_norm, group_norm, batch_norm, softmax use acc_type float).
# autocast forces them to fp32 and then the next matmul casts straight back: when the input is
# already fp16-rounded that round trip buys no accuracy.
FP32_ACC: frozenset[str] = frozenset({
    "layer_norm", "group_norm", "batch_norm", "rms_norm", "instance_norm",
    "softmax", "log_softmax", "mean",
})

# Source: TensorFlow's InferList (Add, Sub, Mul, RealDiv, Tanh, Sigmoid, BiasAdd, AvgPool...),
# plus activations autocast leaves in the input dtype (gelu, silu).
INFER: frozenset[str] = frozenset({
    "add", "sub", "mul", "div", "neg", "abs", "where", "addcmul", "addcdiv", "lerp",
    "gelu", "tanh", "sigmoid", "silu", "elu", "selu", "celu", "leaky_relu", "glu",
    "sin", "cos", "avg_pool", "square_", "maximum", "minimum", "fmax", "fmin",
    "sign", "erf", "floor", "ceil", "round", "trunc", "frac",
    "interpolate", "upsample_bilinear2d", "upsample_nearest2d", "upsample",
    "pad", "constant_pad_nd", "roll",
})

# Source: TensorFlow's ClearList (Reshape, Transpose, Identity, ConcatV2, Relu, MaxPool, Gather,
# Slice, Pack/Unpack...): ops that move or select values without arithmetic.
CLEAR: frozenset[str] = frozenset({
    "view", "transpose", "permute", "contiguous", "clone", "detach", "identity", "expand",
    "repeat", "tile", "getitem", "select", "split", "chunk", "cat", "stack", "concat",
    "gather", "scatter", "index", "index_put", "masked_fill", "masked_select", "tril", "triu",
    "relu", "dropout", "max_pool", "clamp", "max", "min", "amax", "amin", "embedding",
    "flip", "pixel_shuffle", "channel_shuffle", "movedim", "moveaxis", "as_strided",
    "copy", "fill", "zero", "unfold", "diagonal", "broadcast_to", "repeat_interleave",
})

# Kinds that never carry a float computation: shape arithmetic, comparisons, indices.
NON_FLOAT: frozenset[str] = frozenset({
    "shape", "assert", "guards", "compare", "argmax", "floor_divide", "mod", "factory_int",
})


@dataclass(frozen=True)
class Policy:
    """Category tables for one (device type, low dtype) pair."""

    device_type: str
    low_dtype: torch.dtype
    table: Mapping[str, str] = field(repr=False)

    def category(self, kind: str) -> str:
        """Category of ``kind``; ``"unknown"`` when no table names it."""
        return self.table.get(kind, "unknown")

    def __reduce__(self):
        # the read-only table view does not pickle (copy.deepcopy of a converted model)
        return (_restore_policy, (self.device_type, self.low_dtype, dict(self.table)))


def _restore_policy(device_type: str, low_dtype: torch.dtype, table: dict) -> Policy:
    return Policy(device_type, low_dtype, MappingProxyType(table))


def _table(*, extra_deny: frozenset[str] = frozenset()) -> Mapping[str, str]:
    table: dict[str, str] = {}
    for category, kinds in (
        ("clear", CLEAR), ("infer", INFER), ("fp32_acc", FP32_ACC), ("allow", ALLOW),
        ("deny", DENY | extra_deny),
    ):
        for kind in kinds:
            table[kind] = category
    return MappingProxyType(table)


# bf16 has fp32's exponent range: range-driven denials (exp, pow, sums) are still about
# precision, so the same tables serve; the CPU tables follow autocast's CPU lists, which also
# keep the whole matmul family low. Kept as four explicit entries so a later measurement can
# tune one pair without touching the others.
_POLICIES: dict[tuple[str, torch.dtype], Policy] = {
    (dev, dt): Policy(dev, dt, _table())
    for dev in ("cuda", "cpu")
    for dt in (torch.float16, torch.bfloat16)
}


def policy_for(device_type: str, low_dtype: torch.dtype) -> Policy:
    """The policy for a device type (``"cuda"``, ``"cpu"``; others use CUDA's) and low dtype."""
    key = (device_type if device_type in ("cuda", "cpu") else "cuda", low_dtype)
    return _POLICIES[key]


# Arguments a kind must receive in its compute dtype, by position; kinds not listed cast every
# floating input. batch_norm keeps weight, bias and running statistics fp32: its CPU and CUDA
# kernels accept a low-precision input with fp32 parameters, and a cast copy of a running
# statistic would swallow the in-place update.
CAST_ONLY_ARGS: Mapping[str, tuple[int, ...]] = MappingProxyType({
    "batch_norm": (0,),
})
