"""Which inputs of an op may be cast: the one slot rule the dataflow edges, insert_casts and
range analysis share.

An op's floating inputs are castable unless the op reads only some of them as data
(``policy.CAST_ONLY_ARGS``: a gather casts its source, not its index) or, where tracing
recorded no dtypes (the fx path), the argument carries integers or booleans by the op's
definition (``NON_FLOAT_ARGS``).

    >>> castable("embedding", 0, None, has_meta=False)     # the indices
    False
"""

from __future__ import annotations

import torch.fx as fx

from .policy import CAST_ONLY_ARGS

# Arguments that carry integers or booleans by the op's definition (torch-level positions and
# keyword names). Only needed where tracing recorded no dtypes (the fx path): such inputs are
# never cast. Source: the torch.nn.functional / torch signatures.
NON_FLOAT_ARGS: dict[str, tuple] = {
    "embedding": (0, "input"),
    "masked_fill": (1, "mask"),
    "where": (0, "condition"),
    "cross_entropy": (1, "target"),
    "nll_loss": (1, "target"),
    "gather": (2, "index"),
    "scatter": (2, "index"),
    "index_put": (1, "indices"),
    "getitem": (1,),
}


def castable(kind: str, position, key: str | None, has_meta: bool) -> bool:
    """May the input at ``position`` / keyword ``key`` of a ``kind`` op be cast?"""
    only = CAST_ONLY_ARGS.get(kind)
    if only is not None and position not in only and not (key == "input" and 0 in only):
        return False
    if not has_meta:
        nonfloat = NON_FLOAT_ARGS.get(kind, ())
        if position in nonfloat or (key is not None and key in nonfloat):
            return False
    return True


def input_slots(node: fx.Node):
    """Yield (input node, top-level position or None, keyword or None) for every use."""
    def walk(a, position, key):
        if isinstance(a, fx.Node):
            yield a, position, key
        elif isinstance(a, (list, tuple)):
            for x in a:
                yield from walk(x, position, key)
        elif isinstance(a, dict):
            for x in a.values():
                yield from walk(x, position, key)
    for i, a in enumerate(node.args):
        yield from walk(a, i, None)
    for k, a in node.kwargs.items():
        yield from walk(a, None, k)
