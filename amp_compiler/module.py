"""AmpModule: the converted model, an ordinary nn.Module wrapping the rewritten GraphModule.

    >>> amp = amp_compiler.convert(model, dtype="bfloat16")
    >>> y = amp(x)                   # runs like model(x); outputs keep their dtype
    >>> print(amp.graph_module.code) # the casts, explicit
    >>> amp.plan["fc1"].reason
    'linear: matrix-unit op, computes in bfloat16'
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from amp_compiler.errors import AmpCompilerError
from amp_compiler.shapes import explain_inputs_error, explain_shape_error
from amp_compiler.passes.graph import DataflowGraph
from amp_compiler.passes.insert_casts import CastRecord
from amp_compiler.passes.plan import PrecisionPlan


class AmpModule(nn.Module):
    """A mixed-precision model: ``graph_module`` holds the casts, ``plan`` says why."""

    def __init__(self, graph_module: fx.GraphModule, plan: PrecisionPlan, *,
                 dataflow: DataflowGraph, casts: list[CastRecord], low_dtype: torch.dtype,
                 training: bool, folded: bool, scaler=None, source: str = "fx",
                 rebuild: Callable[[bool], "AmpModule"] | None = None,
                 mode_leaves: list[nn.Module] = (), call_spec=None) -> None:
        super().__init__()
        self._call_spec = call_spec
        self._mode_leaves = list(mode_leaves)
        self.graph_module = graph_module
        self._plan = plan
        self._dataflow = dataflow
        self._casts = list(casts)
        self.low_dtype = low_dtype
        self.folded = folded
        self.source = source
        self._scaler = scaler
        self._rebuild = rebuild
        self._other_modes: dict[bool, AmpModule] = {}
        self.training = training  # a traced graph's mode is baked in; see train()

    # -- public surface ------------------------------------------------------------------
    @property
    def plan(self) -> PrecisionPlan:
        """The PrecisionPlan: node name -> Decision (kind, category, precision, rule, reason)."""
        return self._plan

    @property
    def casts(self) -> list[CastRecord]:
        """Casts present in the graph (after folding, parameter casts are gone)."""
        names = {n.name for n in self.graph_module.graph.nodes}
        return [c for c in self._casts if c.node in names]

    @property
    def scaler(self):
        """The LossScaler (fp16 training) or None."""
        return self._scaler

    def forward(self, *args, **kwargs):
        modes = [m.training for m in self._mode_leaves]
        for m in self._mode_leaves:
            m.training = self.training
        try:
            return self.graph_module(*args, **kwargs)
        except (AssertionError, RuntimeError, ValueError) as exc:
            # torch.export's input checks: name the input, dimension or keyword, and the option
            ours = explain_shape_error(exc) or explain_inputs_error(exc)
            if ours is None:
                raise
            rebound = self._rebind(args, kwargs) if explain_inputs_error(exc) else None
            if rebound is None:
                raise ours from exc
            return self.graph_module(*rebound[0], **rebound[1])
        finally:
            for m, mode in zip(self._mode_leaves, modes):
                m.training = mode

    def _rebind(self, args: tuple, kwargs: dict):
        """The call's inputs spelled as the capture was called (``amp(x=...)`` for a model
        captured with ``example_inputs=(x,)``, as Trainer-style ``amp(**batch)`` calls do), or
        None when they are not the same inputs."""
        if self._call_spec is None:
            return None
        signature, n_args, keywords = self._call_spec
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return None
        names = list(signature.parameters)[:n_args]
        if set(bound.arguments) != set(names) | set(keywords):
            return None
        return tuple(bound.arguments[n] for n in names), {k: bound.arguments[k] for k in keywords}

    def report(self, *, only: str | None = None, why: str | None = None, print_: bool = True):
        """Print (and return) a table of every node's precision and reason, plus totals.

        ``only``: "fp32" | "low" | "casts" | "unknown"; ``why``: one node's full decision.
        """
        from amp_compiler.report import render_report

        return render_report(self, only=only, why=why, print_=print_)

    def cast_count(self) -> int:
        """Cast nodes executed per forward."""
        return sum(1 for n in self.graph_module.graph.nodes if n.meta.get("amp_cast"))

    # -- modes ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "AmpModule":
        """Switch modes. Dropout and batch-norm semantics are baked into a traced graph, so the
        other mode's graph is built once (same options, same shared parameters) and kept."""
        if mode == self.training:
            return self
        if self.folded and mode:
            raise AmpCompilerError("this AmpModule was converted for inference (weights folded to "
                                   f"{self.low_dtype}); convert(model, training=True) to train it")
        if self._rebuild is None:
            raise AmpCompilerError("this AmpModule cannot switch modes (it was built from a saved "
                                   "graph); convert the model again in the wanted mode")
        if mode not in self._other_modes:
            self._other_modes[mode] = self._rebuild(mode)
        other = self._other_modes[mode]
        # swap the state so `amp` itself is now the other mode's module
        self._other_modes[self.training] = _Snapshot(self)
        self.graph_module, self._plan, self._dataflow, self._casts, self._mode_leaves = (
            other.graph_module, other._plan, other._dataflow, other._casts, other._mode_leaves)
        self.training = mode
        return self

    def __deepcopy__(self, memo: dict) -> "AmpModule":
        """``copy.deepcopy(amp)`` (EMA copies, checkpoint forks): parameters and graphs are
        copied; the fake tensors torch.export leaves in node metadata cannot be, and are
        shared (they describe shapes and dtypes, which the copy has too), as is the dataflow
        graph the plan was made from (read-only after conversion)."""
        graphs = [m for m in self.modules() if isinstance(m, fx.GraphModule)]
        graphs += [s.graph_module for s in getattr(self, "_other_modes", {}).values()
                   if isinstance(s, _Snapshot)]
        for gm in graphs:
            _share_fake_meta(gm, memo)
        for state in [self] + list(getattr(self, "_other_modes", {}).values()):
            memo[id(state._dataflow)] = state._dataflow  # the analysis record, never mutated
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        with _quiet_spec_warnings():
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def freeze(self) -> "AmpModule":
        """Inference: fold parameter casts into stored low-precision copies (eval mode only)."""
        from amp_compiler.passes.fold_weights import fold_weights

        if self.training:
            raise AmpCompilerError("freeze() folds weights for inference: call amp.eval() first")
        if not self.folded:
            fold_weights(self.graph_module, self._casts)
            self.folded = True
        return self


class _Snapshot:
    """The state of one mode, kept while the other is active."""

    def __init__(self, amp: AmpModule) -> None:
        self.graph_module, self._plan = amp.graph_module, amp._plan
        self._dataflow, self._casts = amp._dataflow, amp._casts
        self._mode_leaves = amp._mode_leaves


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or type(t).__name__ == "FunctionalTensor"


def _share_fake_meta(gm: fx.GraphModule, memo: dict) -> None:
    """Pre-fill a deepcopy memo so the fake tensors and symbols in node metadata are shared."""
    for node in gm.graph.nodes:
        for leaf in torch.utils._pytree.tree_leaves(dict(node.meta)):
            if isinstance(leaf, (torch.SymInt, torch.SymFloat)) or (
                    isinstance(leaf, torch.Tensor) and _is_fake(leaf)):
                memo[id(leaf)] = leaf


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """``copy.deepcopy(gm)`` that also works on torch.export graphs (fake metadata shared)."""
    memo: dict = {}
    _share_fake_meta(gm, memo)
    with _quiet_spec_warnings():
        return copy.deepcopy(gm, memo)


@contextlib.contextmanager
def _quiet_spec_warnings():
    """torch's own pytree specs warn about themselves (a LeafSpec deprecation) when copied."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield
