"""AmpModule: the converted model, an ordinary nn.Module wrapping the rewritten GraphModule.

    >>> amp = amp_compiler.convert(model, dtype="bfloat16")
    >>> y = amp(x)                   # runs like model(x); outputs keep their dtype
    >>> print(amp.graph_module.code) # the casts, explicit
    >>> amp.plan["fc1"].reason
    'linear: matrix-unit op, computes in bfloat16'

Checkpoints and weights (the user model's view of the module):

- ``amp.state_dict()`` has the user model's keys (``model.state_dict()``'s, not the graph
  module's ``graph_module.*`` ones), nested modules (``nn.Sequential(amp)``, DDP) prefix them
  as usual, and ``load_state_dict`` takes the same keys, so checkpoints move freely between
  ``model`` and ``amp``. A training module's values are the user's own tensors (the fp32
  master weights). An inference module keeps only low-precision copies of the weights it
  folded (rule F2): its state dict gives the user's fp32 tensor while the user's model keeps
  it alive, the low-precision copy once it is gone; loading writes the fp32 value into the
  live original and refolds the copy from it (or casts it straight into the copy); that
  mapping is ``amp_compiler.state_dict``'s.
- An inference module notices when the user's weights changed in place since folding (version
  counters: ``optimizer.step()``, ``w.mul_(2)``) and refolds those copies at the next call;
  ``amp.refresh()`` refolds everything (needed after ``w.data = ...``, which moves no counter).
- Precision is the plan's: ``.half()``, ``.to(torch.bfloat16)`` and the like raise
  ``UnsupportedOperationError`` and leave every weight alone; device moves work.
- Pickling the module (``torch.save`` of it, ``pickle.dumps``) raises at once: its graph cannot
  be pickled faithfully. ``amp_compiler.save(amp, path)`` saves a converted model;
  ``amp.state_dict()`` saves its weights.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, NoReturn

import torch
import torch.fx as fx
from torch import nn

from amp_compiler.capture.copy import quiet_spec_warnings, share_fake_meta
from amp_compiler.capture.shapes import explain_inputs_error, explain_shape_error
from amp_compiler.errors import AmpCompilerError, UnsupportedOperationError
from amp_compiler.passes.fold_weights import fold_weights, refold
from amp_compiler.passes.graph import DataflowGraph
from amp_compiler.passes.insert_casts import CastRecord
from amp_compiler.passes.plan import PrecisionPlan
from amp_compiler.passes.size_cache import op_count
from amp_compiler.state_dict import UserStateDict, refold_after_load, user_layout
from amp_compiler.view.report import render_report

log = logging.getLogger("amp_compiler")


class AmpModule(UserStateDict):
    """A mixed-precision model: ``graph_module`` holds the casts, ``plan`` says why.

    ``state_dict`` / ``load_state_dict`` (the user model's keys) come from ``UserStateDict``."""

    def __init__(self, graph_module: fx.GraphModule, plan: PrecisionPlan, *,
                 dataflow: DataflowGraph, casts: list[CastRecord], low_dtype: torch.dtype,
                 training: bool, folded: bool, scaler=None, source: str = "fx",
                 rebuild: Callable[[bool], "AmpModule"] | None = None,
                 mode_leaves: list[nn.Module] = (), call_spec=None,
                 model: nn.Module | None = None) -> None:
        """``model``: the user's model, read here and not kept: it gives ``state_dict()`` its
        exact keys and order, tied names, and the tensors the graph never reads (fx captures
        leave out unused parameters and all but one name of a tied weight). Without it, the
        keys are those of the tensors the graph module holds, which for a torch.export
        capture are all of the model's."""
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
        self._told_refold = False
        self._user_keys, self._aliases, self._held = user_layout(model, graph_module)
        # after the graph module loads its part of a checkpoint: folded copies follow
        self.register_load_state_dict_post_hook(refold_after_load)

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
        if self.folded and not torch.compiler.is_compiling():
            self._refold_stale()
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

        ``only``: "fp32" | "low" | "casts" | "unknown" | "rules" (the rules used, with their
        meaning) | "rewrites" (what each rewrite pass did or missed, and why); ``why``: one
        node's full decision.
        """
        return render_report(self, only=only, why=why, print_=print_)

    def cast_count(self) -> int:
        """Cast nodes executed per forward."""
        return sum(1 for n in self.graph_module.graph.nodes if n.meta.get("amp_cast"))

    def op_count(self) -> dict[str, int]:
        """Ops of the graph: ``per_call``, run by every forward (casts included), and
        ``per_shape``, run once per input shape from the size cache (rules K1-K3).

            >>> amp.op_count()
            {'per_call': 74, 'per_shape': 3}
        """
        return op_count(self.graph_module)

    def cuda_graphs(self, *, max_shapes: int = 8, warmup: int = 2,
                    clone_outputs: bool = True):
        """This module's inference calls replayed from CUDA graphs, one captured per input shape
        (at most ``max_shapes``; eager past them): at small batches a call costs one graph
        launch instead of a host round trip per kernel. Weights changed in place are seen by
        the next replay; moving the module drops the graphs. Rules G1-G6 and when it is wrong
        to use: ``amp_compiler.cuda_graphs``.

        Example:
            >>> amp = ac.convert(model, example_kwargs=batch, training=False).cuda()
            >>> fast = amp.cuda_graphs()
            >>> with torch.inference_mode():
            ...     out = fast(**batch)   # the first call of a shape captures, later ones replay
        """
        # an optional part, loaded on first use (as amp_compiler's _LAZY names are)
        from amp_compiler.cuda_graphs import cuda_graphs

        return cuda_graphs(self, max_shapes=max_shapes, warmup=warmup,
                           clone_outputs=clone_outputs)

    # -- weights: folded copies kept current (the user model's keys: UserStateDict) ----------
    def refresh(self) -> int:
        """Refold every low-precision weight copy from its fp32 original; returns how many
        copies were refreshed (0 for a training module, which folds nothing, or once the
        originals are gone).

        An inference module refolds on its own, at the next call, the copies of weights
        changed in place (their version counter moves: ``optimizer.step()``, ``w.mul_(2)``,
        ``load_state_dict``). Replacing a tensor's data (``w.data = new``) moves no counter:
        call ``refresh()`` then. A weight replaced by a new Parameter object
        (``model.fc.weight = nn.Parameter(...)``) is a tensor this module never saw: load it,
        ``amp.load_state_dict(model.state_dict())``.

        Example:
            >>> amp = ac.convert(model, dtype="float16", training=False)
            >>> model.fc.weight.data = torch.randn_like(model.fc.weight)
            >>> amp.refresh()
            4
        """
        return len(refold(self.graph_module, stale_only=False))

    @torch.compiler.disable  # host bookkeeping: where torch.compile falls back to eager around
    def _refold_stale(self) -> None:  # the call, dynamo would compile it once per weight shape
        done = refold(self.graph_module)
        if done and not self._told_refold:
            self._told_refold = True
            log.info("refolded %d low-precision weight copies whose fp32 originals changed since "
                     "folding (first: '%s'); this module checks at every call (amp.refresh() "
                     "refolds everything, e.g. after `w.data = ...`)", len(done), done[0].source)

    # -- precision is the plan's; pickling is amp_compiler.save's ---------------------------
    def _refuse_dtype(self, call: str) -> NoReturn:
        low = str(self.low_dtype).removeprefix("torch.")
        raise UnsupportedOperationError(
            f"amp.{call}: an AmpModule's precision is set by its plan (each op in {low} or "
            f"float32, the weights stored as the plan needs them); a whole-module cast would undo "
            f"it, so no weight was touched. For another precision convert the model again, "
            f"amp_compiler.convert(model, dtype='bfloat16') (or 'float16'); for float32 use the "
            f"original model. Device moves work: amp.to('cuda'), amp.cuda(), amp.cpu()")

    def half(self) -> NoReturn:
        """Refused (``UnsupportedOperationError``): precision is the plan's; see ``to``."""
        self._refuse_dtype("half()")

    def bfloat16(self) -> NoReturn:
        """Refused (``UnsupportedOperationError``): precision is the plan's; see ``to``."""
        self._refuse_dtype("bfloat16()")

    def float(self) -> NoReturn:
        """Refused (``UnsupportedOperationError``): precision is the plan's; see ``to``."""
        self._refuse_dtype("float()")

    def double(self) -> NoReturn:
        """Refused (``UnsupportedOperationError``): precision is the plan's; see ``to``."""
        self._refuse_dtype("double()")

    def type(self, dst_type) -> NoReturn:
        """Refused (``UnsupportedOperationError``): precision is the plan's; see ``to``."""
        self._refuse_dtype(f"type({dst_type!r})")

    def to(self, *args, **kwargs) -> "AmpModule":
        """Move the module to a device (``amp.to("cuda")``, ``amp.to(device=x.device)``);
        a float32 tensor as argument moves to its device (the plan keeps its dtypes).

        Any dtype (``amp.to(torch.float16)``, ``amp.to("cuda", torch.bfloat16)``, a tensor of
        another dtype) raises ``UnsupportedOperationError`` before anything moves: precision
        is the plan's; convert the model again with ``dtype=`` instead.

        Example:
            >>> amp = amp.to("cuda")
            >>> amp.to(torch.float16)
            Traceback (most recent call last):
            amp_compiler.errors.UnsupportedOperationError: amp.to(torch.float16): ...
        """
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
        if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
            dtype = None  # `amp.to(x)`, x a float32 input: the device move users mean
        if dtype is not None:
            shown = ", ".join([repr(a) if not isinstance(a, torch.Tensor) else f"<{a.dtype} tensor>"
                               for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
            self._refuse_dtype(f"to({shown})")
        move: dict[str, Any] = {"non_blocking": non_blocking}
        if device is not None:
            move["device"] = device
        if memory_format is not None:
            move["memory_format"] = memory_format
        return super().to(**move)

    def _apply(self, fn, recurse: bool = True):
        """Device moves reach the other mode's graph and the tensors the graph does not read."""
        super()._apply(fn, recurse)
        if recurse:
            seen = {id(self.graph_module)}
            for state in self._other_modes.values():
                if id(state.graph_module) not in seen:
                    seen.add(id(state.graph_module))
                    state.graph_module._apply(fn)
            with torch.no_grad():
                for t in self._held.values():
                    t.data = fn(t)
        return self

    def __reduce_ex__(self, protocol):
        raise UnsupportedOperationError(
            "an AmpModule cannot be pickled (torch.save of the module, pickle.dumps): its graph "
            "is generated code whose node names, casts and plan do not survive pickling. Save "
            "the converted model with amp_compiler.save(amp, path) (read it back with "
            "amp_compiler.load(path, model)), or save its weights alone: amp.state_dict() has "
            "the user model's keys and loads into the model or a new conversion")

    def __copy__(self) -> "AmpModule":
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

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
            share_fake_meta(gm, memo)
        for state in [self] + list(getattr(self, "_other_modes", {}).values()):
            memo[id(state._dataflow)] = state._dataflow  # the analysis record, never mutated
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        with quiet_spec_warnings():
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def freeze(self) -> "AmpModule":
        """Inference: fold parameter casts into stored low-precision copies (eval mode only)."""
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

