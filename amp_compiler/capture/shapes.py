"""Every shape the model accepts: torch.export ``dynamic_shapes`` for convert(), and the
call-time error that names a dimension the capture fixed anyway.

By default every dimension of every tensor input is ``Dim.AUTO``: torch.export keeps it symbolic
unless the model's own code fixes it (a ViT's position embedding fixes the image size, a
reshape to a constant fixes a hidden size), in which case it is specialised without an error.
Two things the default does beyond that:

- a size-1 batch in the example would be specialised (torch.export treats sizes 0 and 1 as
  constants), so a batch-1 example is widened to two identical rows for the capture only;
- a user's own ``dynamic_shapes`` (torch.export's spec) replaces the default entirely.

At call time, the exported module rejects an input whose fixed dimension differs; ``ShapeError``
turns that into a message naming the input, the dimension, the size fixed at capture and the
option that changes it.

    >>> spec = default_dynamic_shapes(model.forward, (ids,), {"labels": labels})
    >>> spec["input_ids"]
    {0: Dim.AUTO, 1: Dim.AUTO}
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from amp_compiler.errors import AmpCompilerError


class ShapeError(AmpCompilerError, ValueError):
    """An input's size differs from one the converted model fixed at capture time."""


def _tensor_spec(t: torch.Tensor, auto) -> dict | None:
    # sizes 0 and 1 are specialised by torch.export whatever the spec says; AUTO on them
    # would only print a warning
    dims = {i: auto for i, n in enumerate(t.shape) if n >= 2}
    return dims or None


def _spec_of(value: Any, auto) -> Any:
    """The spec of one argument: tensors get one entry per dimension, containers are mapped."""
    if isinstance(value, torch.Tensor):
        return _tensor_spec(value, auto)
    if isinstance(value, (list, tuple)):
        return type(value)(_spec_of(v, auto) for v in value)
    if isinstance(value, dict):
        return {k: _spec_of(v, auto) for k, v in value.items()}
    leaves, spec = pytree.tree_flatten(value)
    if leaves and any(isinstance(x, torch.Tensor) for x in leaves) and not isinstance(value, (int, float, str)):
        return pytree.tree_unflatten([_spec_of(x, auto) for x in leaves], spec)
    return None


def default_dynamic_shapes(forward: Callable, args: tuple, kwargs: dict) -> dict | tuple:
    """``dynamic_shapes`` with every dimension of every tensor input ``Dim.AUTO``, keyed by
    forward's parameter names (a tuple when the signature cannot be read)."""
    from torch.export import Dim

    try:
        bound = inspect.signature(forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        if kwargs:
            raise
        return tuple(_spec_of(a, Dim.AUTO) for a in args)
    spec: dict[str, Any] = {}
    params = inspect.signature(forward).parameters
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(_spec_of(v, Dim.AUTO) for v in value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: _spec_of(v, Dim.AUTO) for k, v in value.items()}
        else:
            spec[name] = _spec_of(value, Dim.AUTO)
    return spec


def widen_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example with every batch-1 tensor input repeated to batch 2 (None when no input has
    batch 1): rows are independent in a batch, so the capture sees the same program, and the
    batch dimension stays symbolic instead of being specialised to 1."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors or not any(x.shape[0] == 1 for x in tensors):
        return None
    if any(x.shape[0] != 1 for x in tensors):
        return None  # inputs disagree on what dimension 0 is: leave the example as given
    widened = [torch.cat([x, x], 0) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
               for x in leaves]
    return pytree.tree_unflatten(widened, spec)


# torch.export's messages: "Guard failed: ids.size()[1] == 16" (torch >= 2.9),
# "Expected input at *args[0].shape[1] to be equal to 16, but got 24" (earlier releases)
_GUARD = re.compile(r"Guard failed: (?P<name>[\w\[\]'\".]+)\.size\(\)\[(?P<dim>\d+)\]\s*(?P<rel>==|<=|>=|<|>|!=)\s*(?P<size>\d+)")
_EXPECTED = re.compile(r"Expected input at (?P<name>\S+)\.shape\[(?P<dim>\d+)\] to be equal to (?P<size>\d+), but got (?P<got>\d+)")


class InputsError(AmpCompilerError, TypeError):
    """The converted model was called with other inputs (keywords) than it was captured with."""


_KWARGS = re.compile(r"Got the following keywords \[(?P<got>[^\]]*)\] but expected \[(?P<want>[^\]]*)\]")


def explain_inputs_error(exc: BaseException) -> InputsError | None:
    """An InputsError naming the keywords a call lacks or adds, for torch.export's pytree check."""
    m = _KWARGS.search(str(exc))
    if m is None:
        return None
    got = {k.strip(" '\"") for k in m.group("got").split(",") if k.strip()}
    want = {k.strip(" '\"") for k in m.group("want").split(",") if k.strip()}
    parts = []
    if want - got:
        parts.append(f"missing {sorted(want - got)}")
    if got - want:
        parts.append(f"not captured {sorted(got - want)}")
    return InputsError(
        f"the converted model takes the inputs it was captured with: keywords {sorted(want)} "
        f"({'; '.join(parts)}). torch.export captures one signature: convert with the inputs "
        f"you will call it with (example_kwargs=batch, as amp(**batch) will be called), convert "
        f"once per signature, or capture='dynamo', which recompiles per signature")


def explain_shape_error(exc: BaseException) -> ShapeError | None:
    """A ShapeError naming the input and dimension for a torch.export guard failure, else None."""
    text = str(exc)
    m = _GUARD.search(text) or _EXPECTED.search(text)
    if m is None:
        return None
    name, dim, size = m.group("name"), m.group("dim"), m.group("size")
    rel = m.groupdict().get("rel") or "=="
    what = f"to {size}" if rel == "==" else f"to {rel} {size}"
    return ShapeError(
        f"input `{name}` dimension {dim} was fixed {what} when the model was captured ({text.strip()}); "
        f"torch.export specialises a dimension when the model's code requires it (a fixed-size "
        f"position table, a reshape to a constant) or when the example has size 0 or 1 there. "
        f"Convert with an example of the size you will call it with, or pass "
        f"convert(..., dynamic_shapes=...) to say which dimensions vary (torch.export's spec), "
        f"or capture='dynamo' to recompile per shape")
