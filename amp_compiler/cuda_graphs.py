"""CUDA graphs for inference: a forward captured once per input shape and replayed, so that a
small-batch call costs one graph launch instead of one host round trip per kernel.

    >>> amp = amp_compiler.convert(model, example_kwargs=batch, training=False).cuda()
    >>> fast = amp.cuda_graphs()        # or amp_compiler.cuda_graphs(module_or_function)
    >>> with torch.inference_mode():
    ...     out = fast(**batch)          # a new shape: warm up, capture; a known one: replay

Rules (every fallback to the eager call is logged once per reason, as a warning):

    G1  a call replays a graph when its tensor inputs are all on one CUDA device, the wrapped
        module is in eval mode and no gradient is wanted (``torch.no_grad()`` or
        ``inference_mode()``, or nothing involved requires grad); otherwise it is the eager call;
    G2  graphs are keyed by the call's structure: its positional and keyword arguments as a tree,
        each tensor's shape, dtype and device, every other argument's value; a new key is
        warmed up (``warmup`` eager calls on a side stream) and captured while fewer than
        ``max_shapes`` graphs are held; past the cap the call is eager;
    G3  the inputs are copied into the graph's static buffers, the outputs cloned out of it
        (``clone_outputs=False`` returns the graph's own output tensors: faster, but the next
        replay of that shape overwrites them);
    G4  all graphs allocate from one memory pool (each holds its outputs, so no graph's
        replay can overwrite another's);
    G5  a replay reads weights where they are: changes made in place (``optimizer.step()``,
        ``load_state_dict``, ``w.mul_(2)``) are seen by the next replay, and an AmpModule's
        folded low-precision copies refold in place before it; moving the module
        (``.to()``, ``.cuda()``) or switching an AmpModule's mode drops the graphs;
        ``reset()`` drops them by hand (after ``w.data = new`` or a new Parameter object);
    G6  a shape whose capture fails (a CPU op, a host sync such as ``.item()``, an op CUDA
        cannot capture), or whose outputs are not tensors and plain values, stays eager.

When it is wrong to use: a graph replays the kernels of its capture, so whatever the host
decided during the capture is frozen. A model whose control flow depends on tensor values
(``if x.max() > 0``), that runs work on the CPU inside its forward, or whose output shapes
depend on values (``nonzero``, ``unique``) gives wrong results or fails to capture. An
AmpModule's graph was traced already, so such models fail at ``convert`` instead; a plain
module or function given to ``cuda_graphs`` has no such check. Training: not supported
(a replay does not record autograd; calls that want gradients are eager, rule G1).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from amp_compiler.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["cuda_graphs", "CudaGraphModule"]

_PLAIN = (int, float, bool, str, type(None))


class _Graph:
    """One captured shape: the graph, its static inputs and outputs."""

    __slots__ = ("graph", "inputs", "out_leaves", "out_spec")

    def __init__(self, graph, inputs, out_leaves, out_spec) -> None:
        self.graph, self.inputs, self.out_leaves, self.out_spec = graph, inputs, out_leaves, out_spec


class CudaGraphModule(nn.Module):
    """``module`` (an ``nn.Module`` or any callable) with its inference calls replayed from
    CUDA graphs, one per input shape (rules G1-G6 in this module's docstring).

    Example:
        >>> fast = amp.cuda_graphs(max_shapes=4)
        >>> with torch.no_grad():
        ...     logits = fast(**batch).logits
        >>> fast.stats()
        {'graphs': 1, 'replays': 0, 'eager': 0}
    """

    def __init__(self, module: Callable, *, max_shapes: int = 8, warmup: int = 2,
                 clone_outputs: bool = True) -> None:
        super().__init__()
        if not callable(module):
            raise ConfigError(f"cuda_graphs: expected a module or a function, got "
                              f"{type(module).__name__}")
        for name, value, low in (("max_shapes", max_shapes, 1), ("warmup", warmup, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"cuda_graphs: {name} must be an integer >= {low}, got "
                                  f"{value!r} (warmup: eager calls before a capture, which let "
                                  f"cuBLAS and the allocator settle)")
        if isinstance(module, nn.Module):
            self.module = module
        else:
            object.__setattr__(self, "module", module)
        self.max_shapes, self.warmup, self.clone_outputs = max_shapes, warmup, clone_outputs
        self._graphs: dict[Any, _Graph | None] = {}  # None: this key runs eagerly (G6)
        self._pool = None
        self._token = self._state_token()
        self._told: set[str] = set()
        self._counts = {"replays": 0, "eager": 0}

    # -- public ------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        why = self._eager_reason(leaves)
        if why is not None:
            return self._eager(why, args, kwargs)
        token = self._state_token()
        if token != self._token:  # G5: moved, or another mode's graph
            self.reset()
            self._token = token
        try:
            key = (spec, tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor)
                               else (type(x), x) for x in leaves))
            hash(key)
        except TypeError:
            return self._eager("an argument is neither a tensor nor a hashable value", args,
                               kwargs)
        entry = self._graphs.get(key, False)
        if entry is False:
            if len(self._graphs) >= self.max_shapes:
                return self._eager(f"more than max_shapes={self.max_shapes} input shapes; "
                                   f"cuda_graphs(max_shapes=...) raises the cap", args, kwargs)
            entry = self._capture(key, leaves, spec)
            if isinstance(entry, str):
                return self._eager(entry, args, kwargs)
        elif entry is None:
            return self._eager(None, args, kwargs)
        return self._replay(entry, leaves)

    def reset(self) -> None:
        """Drop every captured graph (the next call of each shape captures again)."""
        self._graphs.clear()
        self._pool = None

    def stats(self) -> dict[str, int]:
        """Graphs held, calls replayed, calls run eagerly (rules G1, G2, G6)."""
        return {"graphs": sum(g is not None for g in self._graphs.values()), **self._counts}

    def _apply(self, fn, recurse: bool = True):
        self.reset()  # G5: the graphs read the old tensors' addresses
        return super()._apply(fn, recurse)

    # -- rules ---------------------------------------------------------------------------
    def _state_token(self):
        """What G5 compares: an AmpModule's mode switch swaps its graph module; a move gives
        its tensors new addresses (the first one's stands for all: a move moves every one)."""
        m = self.module
        first = (next(itertools.chain(m.parameters(), m.buffers()), None)
                 if isinstance(m, nn.Module) else None)
        return (id(getattr(m, "graph_module", None)),
                None if first is None else first.data_ptr(), getattr(m, "training", False))

    def _eager_reason(self, leaves: list) -> str | None:
        """G1: why this call cannot replay, or None."""
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        devices = {x.device for x in tensors}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            return ("the inputs are not all on one CUDA device" if tensors else
                    "the call has no tensor input")
        if getattr(self.module, "training", False):
            return "the module is in training mode (CUDA graphs replay inference; call .eval())"
        if torch.is_grad_enabled() and (any(x.requires_grad for x in tensors)
                                        or self._needs_grad()):
            return ("gradients are enabled and the module has parameters that require grad "
                    "(call it under torch.no_grad() or torch.inference_mode())")
        return None

    def _needs_grad(self) -> bool:
        if not isinstance(self.module, nn.Module):
            return False
        return any(p.requires_grad for p in self.module.parameters())

    def _eager(self, why: str | None, args, kwargs):
        """The eager call; ``why`` logged the first time it is the reason (None: said before)."""
        self._counts["eager"] += 1
        if why is not None and why not in self._told:
            self._told.add(why)
            log.warning("cuda_graphs: eager call: %s", why)
        return self.module(*args, **kwargs)

    # -- capture and replay ------------------------------------------------------------
    def _capture(self, key, leaves: list, spec) -> _Graph | str:
        """G2-G4, G6: warm up, capture into the shared pool; when the capture fails or the
        outputs are not tensors and plain values, the key is marked eager and the reason
        returned."""
        device = next(x.device for x in leaves if isinstance(x, torch.Tensor))
        # static buffers outside inference mode: later calls copy into them under no_grad too
        with torch.inference_mode(False), torch.no_grad():
            static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        s_args, s_kwargs = tree_unflatten(static, spec)
        # an autocast region around the call: its cached weight casts (made by an eager call
        # before) would be read by the graph after the region frees them; off while capturing
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            with torch.no_grad():
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        self.module(*s_args, **s_kwargs)
                torch.cuda.current_stream(device).wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    out = self.module(*s_args, **s_kwargs)
        except Exception as exc:  # noqa: BLE001 - G6: this shape stays eager, the reason said
            torch.cuda.synchronize(device)
            self._graphs[key] = None
            return (f"capture failed ({type(exc).__name__}: {str(exc)[:300]}); this input "
                    "shape runs eagerly")
        finally:
            torch.set_autocast_cache_enabled(cache)
        out_leaves, out_spec = tree_flatten(out)
        odd = [type(x).__name__ for x in out_leaves
               if not isinstance(x, (torch.Tensor, *_PLAIN))]
        if odd:
            self._graphs[key] = None
            return (f"the outputs hold {', '.join(sorted(set(odd)))} values, which a graph "
                    "cannot refresh; this input shape runs eagerly")
        entry = _Graph(graph, [x for x in static if isinstance(x, torch.Tensor)], out_leaves,
                       out_spec)
        self._graphs[key] = entry
        log.info("cuda_graphs: captured shape %d of %d", len(self._graphs), self.max_shapes)
        return entry

    def _replay(self, entry: _Graph, leaves: list):
        refold = getattr(self.module, "_refold_stale", None)
        if refold is not None and getattr(self.module, "folded", False):
            refold()  # G5: in place, so the graph reads the new copies
        for dst, src in zip(entry.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        entry.graph.replay()
        self._counts["replays"] += 1
        outs = entry.out_leaves
        if self.clone_outputs:
            outs = [x.clone() if isinstance(x, torch.Tensor) else x for x in outs]
        return tree_unflatten(outs, entry.out_spec)


def cuda_graphs(module: Callable, *, max_shapes: int = 8, warmup: int = 2,
                clone_outputs: bool = True) -> CudaGraphModule:
    """``module`` (an AmpModule, any ``nn.Module`` or function) replayed from CUDA graphs at
    inference, one graph per input shape, at most ``max_shapes`` (eager past them).

    Example:
        >>> fast = amp_compiler.cuda_graphs(amp)          # same as amp.cuda_graphs()
        >>> with torch.inference_mode():
        ...     fast(**batch)
    """
    return CudaGraphModule(module, max_shapes=max_shapes, warmup=warmup,
                           clone_outputs=clone_outputs)
