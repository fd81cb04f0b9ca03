"""size_cache (FX rewrite, last): what a graph computes from its inputs' sizes alone is computed
once per input shape.

A captured Hugging Face forward rebuilds, on every call, values that depend only on how long
the sequence is: position ids (``arange`` + offset + ``unsqueeze``), Llama's rotary phases and
their cosines and sines (from the ``inv_freq`` buffer), masks built from sizes. At batch 1 a
forward is bound by the host launching ops, and these are a tenth of a small model's ops.
Rules:

    K1  a node is size-only when it computes (no side effect, no random numbers) from sizes of
        the inputs (``sym_size``), constants and buffers that need no gradient only; the sizes
        themselves stay in the graph (they are the key); a higher-order op's body (the
        ``wrap_with_autocast`` region torch.export keeps for code written under
        ``torch.autocast(enabled=False)``, as HF's rotary phases are on some torch versions) is
        such a constant when its own ops are all pure;
    K2  the size-only nodes that other nodes read become the outputs of one cached call
        (``SizeCache``): computed on the first call with a given tuple of sizes (and buffer
        versions: a buffer written in place is read afresh), then returned from the cache, at
        most ``CAPACITY`` shapes (least recently used out; a buffer is the same one only while
        the entry's weak reference to it is alive, so a freed tensor's reused id cannot hit);
        under ``torch.compile`` or ``torch.export``, and inside a CUDA graph capture, the
        subgraph is computed, not looked up;
    K3  a value the graph returns, or that an op writes into, is not cached (the caller or the
        op would change the cache); a region of fewer than ``MIN_OPS`` tensor ops is left (the
        lookup would cost what it saves).

    >>> [r.rule for r in cache_size_only(gm)]
    ['K2:cached']
"""

from __future__ import annotations

import operator
import weakref
from collections import OrderedDict

import torch
import torch.fx as fx
from torch import nn

from .graph import attribute
from .kinds import target_name
from .infra import PassResult, Remark, result
from .rules import Rule

CAPACITY = 8
MIN_OPS = 2
_SIZES = frozenset({"sym_size", "sym_numel", "sym_stride", "size", "dim"})


class SizeCache(nn.Module):
    """The size-only subgraph of a converted graph, computed once per key (rule K2)."""

    def __init__(self, graph_module: fx.GraphModule, n_sizes: int) -> None:
        super().__init__()
        self.fn = graph_module  # reads its buffers as arguments: no state of its own
        self.n_sizes = n_sizes
        self._cache: OrderedDict = OrderedDict()

    def forward(self, *args):
        if _tracing():
            return self.fn(*args)
        sizes, buffers = args[:self.n_sizes], args[self.n_sizes:]
        key = (tuple(int(s) for s in sizes), tuple((id(b), b._version) for b in buffers))
        hit = self._cache.get(key)
        # the entry's buffers, by weak reference: an id is only the same tensor while it lives
        if hit is not None and all(ref() is b for ref, b in zip(hit[0], buffers)):
            self._cache.move_to_end(key)
            return hit[1]
        with torch.no_grad():
            out = self.fn(*args)
        self._cache[key] = (tuple(weakref.ref(b) for b in buffers), out)
        self._cache.move_to_end(key)
        if len(self._cache) > CAPACITY:
            self._cache.popitem(last=False)
        return out

    def __getstate__(self):  # a copy starts with an empty cache
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state


def _tracing() -> bool:
    """Compiled, exported, or captured into a CUDA graph: the subgraph is part of what is
    recorded (a CUDA graph must not read a cached tensor the cache may free later)."""
    compiler = torch.compiler
    return (compiler.is_compiling() or bool(getattr(compiler, "is_exporting", lambda: False)())
            or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()))


def cache_size_only(gm: fx.GraphModule, name: str = "_amp_size_cache") -> PassResult:
    """Rules K1-K3 on ``gm`` in place; one remark for the cached region, or for a region too
    small to cache (missed)."""
    graph = gm.graph
    sizes = [n for n in graph.nodes if n.op == "call_function" and target_name(n) in _SIZES
             and all(a.op == "placeholder" for a in n.all_input_nodes)]
    buffers = [n for n in graph.nodes if n.op == "get_attr" and _frozen(gm, n)]
    bodies = {n for n in graph.nodes if n.op == "get_attr" and _pure_body(gm, n)}
    inside: set[fx.Node] = set(bodies)
    allowed = set(sizes) | set(buffers)
    for node in graph.nodes:  # K1, in graph order: inputs are decided first
        if node.op not in ("call_function", "call_method") or node in allowed or not _pure(node):
            continue
        if all(a in allowed or a in inside for a in node.all_input_nodes):
            inside.add(node)
    _drop_written_and_returned(graph, inside)  # K3
    inside -= {b for b in bodies if any(u not in inside for u in b.users)}  # bodies go along only
    tensor_ops = [n for n in inside if isinstance(n.meta.get("val"), torch.Tensor)
                  and n.target is not operator.getitem]
    in_bodies = [m for b in inside & bodies for m in _body_ops(gm, b)]
    if len(tensor_ops) + len(in_bodies) < MIN_OPS:
        small = [Remark("size_cache", Rule.K3_NOT_CACHED, name, f"{len(tensor_ops) + len(in_bodies)} "
                        f"ops computed from sizes only, fewer than {MIN_OPS}: a cache lookup would "
                        f"cost more than they do", missed=True)] if tensor_ops or in_bodies else []
        return result(gm, small)
    region = [n for n in graph.nodes if n in inside]
    frontier = [n for n in region if any(u not in inside for u in n.users)]
    used_sizes = [s for s in sizes if any(u in inside for u in s.users)]
    used_buffers = [b for b in buffers if any(u in inside for u in b.users)]
    # the subgraph: sizes and buffers as placeholders, the frontier as its outputs
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in used_sizes + used_buffers:
        env[n] = sub.placeholder(n.name)
        env[n].meta.update(n.meta)
    for n in region:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[n] for n in frontier))
    owner = {str(n.target): attribute(gm, str(n.target)) for n in region if n.op == "get_attr"}
    module = SizeCache(fx.GraphModule(owner, sub), len(used_sizes))
    gm.add_submodule(name, module)
    order = {n: i for i, n in enumerate(graph.nodes)}
    first_reader = min((u for n in frontier for u in n.users if u not in inside), key=order.__getitem__)
    for n in used_sizes + used_buffers:  # the key's inputs read placeholders at most: they move up
        if order[n] > order[first_reader]:
            first_reader.prepend(n)
    with graph.inserting_before(first_reader):
        call = graph.call_module(name, tuple(used_sizes + used_buffers))
        outs = [graph.call_function(operator.getitem, (call, i)) for i in range(len(frontier))]
    for n, out in zip(frontier, outs):
        out.meta.update({k: v for k, v in n.meta.items() if k in ("val", "tensor_meta")})
        n.replace_all_uses_with(out, delete_user_cb=lambda u: u not in inside)
    for n in reversed(region):
        graph.erase_node(n)
    gm.recompile()
    kinds = sorted({target_name(n) for n in tensor_ops + in_bodies})
    return result(gm, [Remark("size_cache", Rule.K2_CACHED, name,
                   f"{len(region)} ops computed from the inputs' sizes and buffers only "
                   f"({', '.join(kinds)}) run once per input shape, then come from a cache of "
                   f"{CAPACITY} shapes: {len(frontier)} values")])


def op_count(gm: fx.GraphModule) -> dict[str, int]:
    """``per_call``: the ops every forward of ``gm`` runs (casts included; sizes and tuple
    unpacking not counted), ``per_shape``: those its size cache runs once per input shape."""
    def ops(graph: fx.Graph) -> int:
        return sum(1 for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")
                   and n.target is not operator.getitem and target_name(n) not in _SIZES
                   and not (n.op == "call_module" and isinstance(gm.get_submodule(n.target), SizeCache)))
    caches = [m for m in gm.modules() if isinstance(m, SizeCache)]
    return {"per_call": ops(gm.graph), "per_shape": sum(ops(m.fn.graph) for m in caches)}


def _frozen(gm: fx.GraphModule, node: fx.Node) -> bool:
    value = attribute(gm, str(node.target))
    return isinstance(value, torch.Tensor) and not value.requires_grad


def _pure_body(gm: fx.GraphModule, node: fx.Node) -> bool:
    """K1: ``node`` reads a graph (a higher-order op's body) whose ops are all pure and whose
    own attributes are frozen tensors or such graphs."""
    body = attribute(gm, str(node.target))
    if not isinstance(body, fx.GraphModule):
        return False
    for m in body.graph.nodes:
        if m.op == "call_module" or (m.op in ("call_function", "call_method") and not _pure(m)):
            return False
        if m.op == "get_attr" and not (_frozen(body, m) or _pure_body(body, m)):
            return False
    return True


def _body_ops(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    body = attribute(gm, str(node.target))
    return [m for m in body.graph.nodes if m.op in ("call_function", "call_method")
            and m.target is not operator.getitem]


def _pure(node: fx.Node) -> bool:
    if node.is_impure():
        return False
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    schema = getattr(node.target, "_schema", None)
    return not (schema is not None and schema.is_mutable)


def _drop_written_and_returned(graph: fx.Graph, inside: set[fx.Node]) -> None:
    """K3: remove from ``inside`` every value that the output or a writing op reads, itself or
    through views outside the region, and what depends on it; until nothing changes."""
    changed = True
    while changed:
        changed = False
        for n in [n for n in graph.nodes if n in inside]:
            if _escapes(n, inside):
                inside.discard(n)
                changed = True
                stack = [u for u in n.users if u in inside]
                while stack:  # what is computed from it is no longer size-only-and-cached
                    u = stack.pop()
                    if u in inside:
                        inside.discard(u)
                        stack.extend(v for v in u.users if v in inside)


def _escapes(node: fx.Node, inside: set[fx.Node]) -> bool:
    """``node``'s value reaches the output or a writing op, directly or through views outside
    the region."""
    for user in node.users:
        if user in inside:
            continue
        if user.op == "output" or _writes(user):
            return True
        if _aliases(user) and _escapes(user, inside):
            return True
    return False


def _aliases(node: fx.Node) -> bool:
    """The op returns a view of an input (``Tensor(a)`` in its schema): ``view``, ``expand``..."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.op != "call_module"  # fx functions: assume a view, to be safe
    return any(r.alias_info is not None for r in schema.returns)


def _writes(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable
