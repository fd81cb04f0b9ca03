"""The IR-neutral dataflow graph every analysis pass reads.

A ``networkx.DiGraph`` with one vertex per value-producing node of the source IR (an FX node or
an ONNX node) and an edge producer -> consumer for each use. Analyses see only these attributes,
never FX or ONNX objects, so one analysis serves every front end.

Vertex attributes (all set by the front end; ``Vertex`` documents them):

    role         "input" | "param" | "const" | "compute" | "output"
    kind         canonical op kind (``passes.kinds``)
    dtype        output dtype when known (``torch.dtype``), else None
    is_float     True / False / None (unknown) for the node's output; False for complex values,
                 which are never cast (a cast to a real dtype would drop the imaginary part)
    is_complex   the output holds complex numbers (recorded dtype, or the op's kind on fx)
    shape        output shape when known, else None
    module_path  dotted path of the innermost nn.Module that produced it ("" for the root)
    module_type  qualified class name of that module, or None
    target       the source IR's own op name, for the report

Edge attributes: ``cast`` (bool): the consumer receives this input in its compute precision
(False for inputs that keep their dtype, e.g. batch_norm's running statistics).

    >>> g = DataflowGraph()
    >>> g.add_vertex("x", role="input", kind="input", dtype=torch.float32, is_float=True)
    >>> g.add_vertex("y", role="compute", kind="linear", is_float=True)
    >>> g.add_use("x", "y")
    >>> list(g.float_inputs("y"))
    ['x']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import networkx as nx
import torch
import torch.fx as fx


def attribute(root, target: str):
    """The object at dotted path ``target`` under ``root`` (a ``get_attr`` node's value).

    >>> attribute(gm, "transformer.h.0.attn.c_attn.weight").shape
    """
    for part in target.split("."):
        root = getattr(root, part)
    return root


@dataclass(frozen=True)
class Vertex:
    """Typed view of one vertex's attributes."""

    name: str
    role: str
    kind: str
    dtype: torch.dtype | None = None
    is_float: bool | None = None
    shape: tuple | None = None
    module_path: str = ""
    module_type: str | None = None
    target: str = ""
    is_complex: bool = False


class DataflowGraph:
    """A thin, typed wrapper over ``networkx.DiGraph`` (available as ``.nx``)."""

    def __init__(self) -> None:
        self.nx = nx.DiGraph()
        self._order: list[str] = []

    # -- construction (front ends) ------------------------------------------------------
    def add_vertex(self, name: str, *, role: str, kind: str, dtype: torch.dtype | None = None,
                   is_float: bool | None = None, shape: tuple | None = None,
                   module_path: str = "", module_type: str | None = None,
                   target: str = "", is_complex: bool = False) -> None:
        if is_float is None and dtype is not None:
            is_float = dtype.is_floating_point
        is_complex = is_complex or (dtype is not None and dtype.is_complex)
        self.nx.add_node(name, vertex=Vertex(name, role, kind, dtype, is_float, shape,
                                             module_path, module_type, target, is_complex))
        self._order.append(name)

    def add_use(self, producer: str, consumer: str, *, cast: bool = True) -> None:
        if self.nx.has_edge(producer, consumer):
            # several uses of one value by one consumer: it is cast if any use is
            self.nx.edges[producer, consumer]["cast"] |= cast
        else:
            self.nx.add_edge(producer, consumer, cast=cast)

    # -- queries (analyses) --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self.nx

    def vertex(self, name: str) -> Vertex:
        return self.nx.nodes[name]["vertex"]

    def vertices(self) -> Iterator[Vertex]:
        for name in self._order:
            yield self.vertex(name)

    def producers(self, name: str) -> list[str]:
        return list(self.nx.predecessors(name))

    def consumers(self, name: str) -> list[str]:
        return list(self.nx.successors(name))

    def float_inputs(self, name: str) -> Iterator[str]:
        """Producers whose (possibly) floating value this node receives in its precision."""
        for p in self.nx.predecessors(name):
            if self.nx.edges[p, name]["cast"] and self.vertex(p).is_float is not False:
                yield p

    def complex_inputs(self, name: str) -> list[str]:
        """Producers whose value holds complex numbers (never cast, never in ``float_inputs``)."""
        return [p for p in self.nx.predecessors(name) if self.vertex(p).is_complex]

    def data_inputs(self, name: str) -> list[str]:
        """Floating inputs that are activations: not parameters or constants."""
        return [p for p in self.float_inputs(name)
                if self.vertex(p).role not in ("param", "const")]

    def float_consumers(self, name: str) -> list[str]:
        """Consumers that receive this node's value in their own precision."""
        return [c for c in self.nx.successors(name) if self.nx.edges[name, c]["cast"]]

    def topological(self) -> list[str]:
        return list(self._order)


def keep_when_dead(node: fx.Node) -> bool:
    """Nodes dead-code elimination keeps although nobody reads them: inputs (the signature),
    submodule calls (torch.export's guard checks) and impure nodes (asserts, writes, RNG)."""
    return node.op in ("placeholder", "output", "call_module") or node.is_impure()
