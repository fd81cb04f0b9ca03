"""Cast placement re-derived from a plan: the casts a plan implies on a dataflow graph, for IRs
whose rewrite keeps no cast list (an ONNX file), so its picture and report can show them.
"""

from __future__ import annotations

import torch

from amp_compiler.passes.dtypes import label
from amp_compiler.passes.insert_casts import CastRecord
from amp_compiler.passes.plan import PrecisionPlan

__all__ = ["derive_casts"]


def derive_casts(plan: PrecisionPlan, dataflow) -> list:
    """The casts a plan implies on a dataflow graph, for IRs whose rewrite keeps no cast list
    (ONNX): one per (value, dtype) where a castable use needs another dtype than the value has.

    Example:
        >>> [c.node for c in derive_casts(plan, graph)][:2]
        ['MatMul_0->bf16', 'Softmax_3->fp32']
    """
    casts: dict[tuple[str, torch.dtype], list[str]] = {}
    for name in dataflow:
        v = dataflow.vertex(name)
        d = plan.get(name)
        if d is None or v.is_float is False:
            continue
        # a node outputs its compute precision; sources keep their stored dtype
        has = d.precision if v.role == "compute" and d.precision is not None else v.dtype
        for consumer in dataflow.float_consumers(name):
            need = plan[consumer].precision if consumer in plan else None
            if has is not None and need is not None and need != has:
                casts.setdefault((name, need), []).append(consumer)
    out = []
    for (source, dtype), consumers in casts.items():
        is_param = dataflow.vertex(source).role in ("param", "const")
        out.append(CastRecord(f"{source}->{label(dtype)}", source, dtype, tuple(consumers),
                              is_param))
    return out

