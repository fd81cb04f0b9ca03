"""The one dtype table: how users spell a low-precision dtype, and how we print dtypes.

Every place that reads a dtype name (``convert(dtype=...)``, saved plans and files, the CLI and
the benchmarks) or prints one (plans, cast node names, pictures) uses these.

    >>> resolve_dtype("bf16"), dtype_name(torch.float16), short_name(torch.float16), label(torch.float16)
    (torch.bfloat16, 'float16', 'f16', 'fp16')
"""

from __future__ import annotations

import torch

from amp_compiler.errors import ConfigError

# the low-precision dtypes by their printed name (what plans, manifests and --dtype store)
LOW_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# every spelling convert() accepts: torch's names, the short ones, Keras' mixed-precision policies
DTYPE_NAMES: dict[str, torch.dtype] = {
    **LOW_DTYPES, "fp16": torch.float16, "half": torch.float16, "mixed_float16": torch.float16,
    "bf16": torch.bfloat16, "mixed_bfloat16": torch.bfloat16,
}
# every torch dtype by its printed name ("float16", "int8", "float8_e4m3fn", ...)
TORCH_DTYPES: dict[str, torch.dtype] = {str(d).replace("torch.", ""): d for d in vars(torch).values()
                                        if isinstance(d, torch.dtype)}
# short spellings: in cast node names ("f16"), and in pictures and tables ("fp16")
_SHORT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}
_LABEL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def resolve_dtype(dtype) -> torch.dtype:
    """'float16' / 'bfloat16' / 'fp16' / 'mixed_float16' / torch dtypes -> the torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise ConfigError(f"dtype={dtype!r} is not a low-precision dtype; use 'float16' or 'bfloat16' "
                      f"(or torch.float16 / torch.bfloat16)")


def dtype_name(dtype: torch.dtype | None) -> str:
    """Printable name: 'float16', 'bfloat16', 'float32', or '-' for None."""
    return "-" if dtype is None else str(dtype).replace("torch.", "")


def short_name(dtype: torch.dtype) -> str:
    """The name cast nodes carry: 'f16', 'bf16', 'f32', 'f64' (else the printed name)."""
    return _SHORT.get(dtype, dtype_name(dtype))


def label(dtype: torch.dtype | str | None) -> str:
    """The name pictures and tables show: 'fp16', 'bf16', 'fp32', 'fp64' (else the printed name);
    takes a dtype or its printed name."""
    if isinstance(dtype, str):
        dtype = TORCH_DTYPES.get(dtype, dtype)
    return _LABEL.get(dtype, dtype if isinstance(dtype, str) else dtype_name(dtype))
