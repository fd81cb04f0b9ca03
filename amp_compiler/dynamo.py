"""The TorchDynamo front end: mixed precision for what torch.export cannot capture.

torch.export needs one graph for the whole forward; library code with data-dependent branches
(DeBERTa-v2's ``if label_index.size(0) > 0``, a loss that checks ``labels.max() >= vocab``)
cannot give one. TorchDynamo can: it captures every stretch of straight-line tensor code as its
own graph, runs what it cannot capture (the branch) eagerly between them, and recompiles when
shapes change. ``backend()`` is a ``torch.compile`` backend that hands every graph dynamo
captures to the same passes ``convert`` runs (hygiene, SDPA masks, classify, propagate,
insert_casts), so each graph computes in the planned precisions; graph breaks run eagerly as
written, on the fp32 values the graphs hand back (outputs keep their recorded dtypes, rule I5).

    >>> compiled = torch.compile(model, backend=amp_compiler.backend(dtype="bfloat16"))
    >>> loss = compiled(**batch).loss
    >>> amp = amp_compiler.convert(model, capture="dynamo", dtype="float16")  # an AmpModule-like
    >>> amp(**batch).loss.backward(); amp.report()                           # every graph's plan

What differs from the torch.export path: parameters reach each graph as inputs, so they are
cast per call (no folding for inference); fp16 training uses the scaler as GradScaler is used
(``amp.scaler.scale(loss).backward()``, ``step``, ``update``), since the loss may be computed
in eager code between graphs; the plan exists once a graph has been compiled, that is after the
first call, and its node names carry the graph's number (``g0.linear``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from amp_compiler.capture import build_dataflow, tidy_captured
from amp_compiler.capture.functionalize import functionalize
from amp_compiler.errors import AmpCompilerError, ConfigError
from amp_compiler.passes.classify import classify, override_entries, resolve_entries
from amp_compiler.passes.dtypes import resolve_dtype
from amp_compiler.passes.graph import DataflowGraph
from amp_compiler.passes.infra import PassManager
from amp_compiler.passes.insert_casts import CastRecord, insert_casts
from amp_compiler.passes.plan import Decision, PrecisionPlan
from amp_compiler.passes.policy import policy_for
from amp_compiler.passes.propagate import propagate
from amp_compiler.passes.size_cache import op_count
from amp_compiler.scaler import new_scaler
from amp_compiler.view.report import render_report

log = logging.getLogger("amp_compiler")


@dataclass
class CompiledGraph:
    """One graph dynamo captured, as planned and rewritten."""

    index: int
    graph_module: fx.GraphModule
    plan: PrecisionPlan
    dataflow: DataflowGraph
    casts: list[CastRecord]


def _placeholder_roles(gm: fx.GraphModule) -> dict[str, str]:
    """Dynamo passes the module's parameters and buffers as graph inputs: name them as such, so
    the rules that treat stored tensors differently (R3's promoting state) see them."""
    roles = {}
    for node in gm.graph.nodes:
        arg = node.meta.get("grapharg") if node.op == "placeholder" else None
        example = getattr(arg, "example", None)
        if isinstance(example, nn.Parameter):
            roles[node.name] = "param"
        elif isinstance(example, torch.Tensor) and "_buffers[" in _source_name(arg):
            roles[node.name] = "const"
    return roles


def _source_name(arg) -> str:
    try:
        return arg.source.name()
    except Exception:  # noqa: BLE001 -- sources without a name are not buffers we know
        return ""


class AmpBackend:
    """A ``torch.compile`` backend planning every captured graph (see the module docstring).

    ``graphs`` lists what it compiled, in order; ``plan`` merges their plans.
    """

    def __init__(self, dtype="float16", *, keep_fp32: Iterable = (), force_low: Iterable = (),
                 inductor: bool = False) -> None:
        self.low_dtype = resolve_dtype(dtype)
        self.keep_fp32 = override_entries(keep_fp32)
        self.force_low = override_entries(force_low)
        self.inductor = bool(inductor)
        self.graphs: list[CompiledGraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        for node in gm.graph.nodes:  # the passes read recorded values under "val", as export's
            if "val" not in node.meta and "example_value" in node.meta:
                node.meta["val"] = node.meta["example_value"]
        roles = _placeholder_roles(gm)
        device_type = next((t.device.type for t in example_inputs if isinstance(t, torch.Tensor)), "cpu")
        functionalize(gm)
        rewrites = tidy_captured(gm)
        dataflow = build_dataflow(gm, roles=roles)
        policy = policy_for(device_type, self.low_dtype)
        # overrides that name nothing in this graph are fine here: another graph may hold them
        keep = [e for e in self.keep_fp32 if _matches(dataflow, e)]
        low = [e for e in self.force_low if _matches(dataflow, e)]
        classes = classify(dataflow, policy, keep_fp32=keep, force_low=low, probe_kernels=True)
        plan = propagate(dataflow, classes, policy)
        cast = PassManager().run(insert_casts, gm, dataflow, plan)
        casts = cast.facts
        plan = plan.replace({n: plan[n].with_(reason=f"{plan[n].reason}; {note}")
                             for n, note in casts.saturated.items()})
        index = len(self.graphs)  # dynamo compiles one frame at a time, under its own lock
        plan = PrecisionPlan(dict(plan.items()), low_dtype=plan.low_dtype,
                             device_type=plan.device_type,
                             meta={"capture": "dynamo", "graph": index, "rewrites": [], "missed": []})
        plan = plan.with_remarks(rewrites + list(cast.remarks))
        self.graphs.append(CompiledGraph(index, gm, plan, dataflow, casts.casts))
        log.info("dynamo graph %d: %d nodes, %d casts, %s", index, len(gm.graph.nodes),
                 casts.count, plan)
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward

    @property
    def plan(self) -> PrecisionPlan:
        """Every compiled graph's decisions, node names prefixed ``g<index>.``."""
        if not self.graphs:
            raise AmpCompilerError("no graph has been compiled yet: the dynamo capture plans each "
                                   "graph when it first runs; call the model once first")
        merged: dict[str, Decision] = {}
        for g in self.graphs:
            merged.update({f"g{g.index}.{n}": d for n, d in g.plan.items()})
        return PrecisionPlan(merged, low_dtype=self.low_dtype, device_type=self.graphs[0].plan.device_type,
                             meta={"capture": "dynamo", "graphs": len(self.graphs)})

    def op_count(self) -> dict[str, int]:
        """Ops a call runs, summed over the graphs compiled so far (``AmpModule.op_count``)."""
        counts = [op_count(g.graph_module) for g in self.graphs]
        return {k: sum(c[k] for c in counts) for k in ("per_call", "per_shape")}

    @property
    def casts(self) -> list[CastRecord]:
        return [CastRecord(f"g{g.index}.{c.node}", f"g{g.index}.{c.source}", c.dtype,
                           tuple(f"g{g.index}.{u}" for u in c.consumers), c.is_param)
                for g in self.graphs for c in g.casts]


def _matches(dataflow: DataflowGraph, entry) -> bool:
    try:
        return bool(resolve_entries(dataflow, (entry,), "keep_fp32"))
    except ConfigError:
        return False


def backend(dtype="float16", *, keep_fp32: Iterable = (), force_low: Iterable = (),
            inductor: bool = False) -> AmpBackend:
    """A ``torch.compile`` backend that converts every captured graph to mixed precision.

    ``inductor=True`` hands the rewritten graphs on to inductor (fused kernels); False runs them
    as they are (eager kernels, casts visible in each graph's code).

        >>> be = amp_compiler.backend(dtype="bfloat16")
        >>> out = torch.compile(model, backend=be)(x)
        >>> be.plan["g0.linear"].precision
        torch.bfloat16
    """
    return AmpBackend(dtype, keep_fp32=keep_fp32, force_low=force_low, inductor=inductor)


class DynamoAmpModule(nn.Module):
    """What ``convert(model, capture="dynamo")`` returns: the user's model run by dynamo with
    ``AmpBackend``. It holds the user's model (its parameters are the master weights) without
    changing it: the model's training flags are set to this module's mode for the duration of
    each call and restored after.
    """

    def __init__(self, model: nn.Module, be: AmpBackend, *, training: bool, scaler=None,
                 dynamic: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.backend = be
        self.low_dtype = be.low_dtype
        self.folded = False
        self.source = "dynamo"
        self._scaler = scaler
        # not a registered submodule: its parameters are the model's, listed once, under the
        # model's own names
        object.__setattr__(self, "_compiled", torch.compile(model, backend=be, dynamic=dynamic))
        self.training = training

    @property
    def plan(self) -> PrecisionPlan:
        """Every compiled graph's plan (after the first call), node names ``g<index>.<node>``."""
        return self.backend.plan

    def op_count(self) -> dict[str, int]:
        """Ops a call runs, over the graphs compiled so far (``AmpModule.op_count``)."""
        return self.backend.op_count()

    @property
    def casts(self) -> list[CastRecord]:
        return self.backend.casts

    @property
    def graphs(self) -> list[CompiledGraph]:
        """The graphs dynamo captured so far, each with its plan and rewritten GraphModule."""
        return list(self.backend.graphs)

    @property
    def scaler(self):
        """The LossScaler (fp16 training; use it as GradScaler: ``scale(loss).backward()``)."""
        return self._scaler

    def cast_count(self) -> int:
        return sum(1 for g in self.backend.graphs for n in g.graph_module.graph.nodes
                   if n.meta.get("amp_cast"))

    def report(self, *, only: str | None = None, why: str | None = None, print_: bool = True):
        """The plan of every graph compiled so far, as ``AmpModule.report`` prints it."""
        return render_report(self, only=only, why=why, print_=print_)

    def state_dict(self, *args, **kwargs):
        """The user model's own state dict (its keys load into the model, and back)."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> "DynamoAmpModule":
        # only this module's flag: the user's model is switched for the duration of a call
        self.training = bool(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        modules = list(self.model.modules())
        modes = [m.training for m in modules]
        for m in modules:
            m.training = self.training
        try:
            return self._compiled(*args, **kwargs)
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode


def convert_dynamo(model: nn.Module, *, dtype, training: bool, keep_fp32, force_low, loss_scale,
                   inductor: bool = False, dynamic: bool | None = None) -> DynamoAmpModule:
    """``convert``'s dynamo path: a DynamoAmpModule with a GradScaler-style scaler for fp16
    training (see ``convert``)."""
    be = backend(dtype, keep_fp32=keep_fp32, force_low=force_low, inductor=inductor)
    scaler = None
    if training and be.low_dtype == torch.float16 and loss_scale is not None:
        device_type = next((p.device.type for p in model.parameters()), "cpu")
        scaler = new_scaler(device_type, loss_scale)
        scaler.track(model.named_parameters())
    return DynamoAmpModule(model, be, training=training, scaler=scaler, dynamic=dynamic)
