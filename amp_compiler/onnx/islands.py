"""Rule O9 of ``convert_onnx(islands="measure")``: an fp32 island stays only where it buys accuracy.

The plan keeps values fp32 for reasons that are about their neighbours, not about the op: an add
with an fp32 input (R3), a norm whose producer is fp32 (R5), what is not between low ops (R7).
Those nodes form *islands*: connected fp32 regions of the graph whose borders cost Cast nodes.
(Nodes fp32 for their own sake -- deny ops (R2), overrides (R6), pins O1-O5 -- are never traded.)

    O9  with ``islands="measure"``, each island (the largest first) is tried low: the plan is
        painted again with the island forced low, rewritten, and run in ONNX Runtime on the
        samples -- on its CUDA provider where installed (float16 kernels as deployed, and the
        only bfloat16 ones), else the CPU provider -- against the fp32 file on the CPU provider
        (no TF32 there). The island goes low when that removes Casts and the
        error against the fp32 file (the mean over the samples of max|out - ref| / max|ref|
        over every float output) stays within ``tolerance`` (relative) of the error with every
        island fp32. An island refused whole is tried in halves of its nodes in topological
        order (the residual stream of the last layers, or of the first), down to eighths. What
        stays fp32 says in its Decisions what was measured (a missed trade).

The samples are the ``calibration`` samples, or generated ones (``generated_samples``): token ids
uniform over the rows of the table they index, masks of ones with padding in the last row, floats
standard normal; symbolic dimensions 2 (the first) and 32 (the others).

    >>> model, plan = convert_onnx("fp32.onnx", islands="measure", return_plan=True)
    >>> [d.reason for d in plan.values() if d.rule == "O9:traded"][:1]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import networkx as nx
import numpy as np
import onnx
import torch

from amp_compiler.onnx.session import onnx_session
from amp_compiler.passes.metrics import onnx_cast_count, rel_error
from amp_compiler.passes.onnx_graph import FLOAT_TYPES
from amp_compiler.passes.plan import Decision, PrecisionPlan
from amp_compiler.passes.rules import Rule

log = logging.getLogger("amp_compiler")

# fp32 for a neighbour's sake: tradable. Everything else fp32 is fp32 for its own sake.
SOFT_RULES = frozenset({Rule.R3_FP32_INPUT, Rule.R3_FP32_CONSUMER, Rule.R5_FP32_ACC_FP32,
                        Rule.R7_FOLLOW_FP32, Rule.O6_MASK})
ISLAND_MODES = ("keep", "measure")
BATCH, LENGTH = 2, 32  # generated samples: symbolic dimensions
SPLITS = 3  # an island refused whole is tried in halves, quarters, eighths


@dataclass(frozen=True)
class Island:
    nodes: frozenset[str]

    def describe(self) -> str:
        first = sorted(self.nodes)[:3]
        more = f" and {len(self.nodes) - 3} more" if len(self.nodes) > 3 else ""
        return f"{len(self.nodes)} node{'s' * (len(self.nodes) != 1)} ({', '.join(first)}{more})"


def islands(plan: Mapping[str, Decision], graph) -> list[Island]:
    """Connected regions of tradable fp32 compute nodes (``graph``: the DataflowGraph)."""
    soft = {n for n, d in plan.items() if d.precision == torch.float32 and d.rule in SOFT_RULES
            and n in graph and graph.vertex(n).role == "compute"}
    sub = nx.Graph()
    sub.add_nodes_from(soft)
    sub.add_edges_from((a, b) for a, b in graph.nx.edges if a in soft and b in soft)
    return [Island(frozenset(c)) for c in nx.connected_components(sub)]


def generated_samples(model: onnx.ModelProto, count: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs the model can run on when no calibration data is given (see the module docstring)."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    rows = _index_ranges(model, inits)
    samples = []
    for _ in range(count):
        feed = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (BATCH if i == 0 else LENGTH)
                     for i, d in enumerate(tt.shape.dim)]
            np_type = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if tt.elem_type in FLOAT_TYPES:
                feed[vi.name] = rng.standard_normal(shape).astype(np_type)
            elif tt.elem_type == onnx.TensorProto.BOOL:
                feed[vi.name] = np.ones(shape, bool)
            elif "mask" in vi.name.lower():
                mask = np.ones(shape, np_type)
                if mask.ndim >= 2:
                    mask[-1, mask.shape[1] // 2:] = 0
                feed[vi.name] = mask
            else:
                feed[vi.name] = rng.integers(0, rows.get(vi.name, 2), size=shape).astype(np_type)
        samples.append(feed)
    return samples


def _index_ranges(model: onnx.ModelProto, inits: Mapping[str, onnx.TensorProto]) -> dict[str, int]:
    """Graph input -> rows of the table a Gather indexes with it (through movement ops)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits or len(node.input) < 2:
            continue
        v, hops = node.input[1], 0
        while v in producer and hops < 6 and producer[v].op_type in (
                "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Expand", "Flatten"):
            v, hops = producer[v].input[0], hops + 1
        rows = int(inits[node.input[0]].dims[0]) if inits[node.input[0]].dims else 1
        out[v] = min(out.get(v, rows), rows)
    return out


def _run(session, samples: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in s.items() if k in names}) for s in samples]


def mean_error(outs: list[list[np.ndarray]], refs: list[list[np.ndarray]]) -> float:
    """Mean over samples of the project's relative error (``passes.metrics.rel_error``: max|out -
    ref| / max|ref| over every float output of the sample)."""
    def tensors(arrays):
        return [torch.from_numpy(np.asarray(a)) for a in arrays if np.asarray(a).dtype.kind == "f"]

    return float(np.mean([rel_error(tensors(out), tensors(ref)) for out, ref in zip(outs, refs)]))


def trade(source: onnx.ModelProto, plan: PrecisionPlan, graph,
          build: Callable[[tuple[str, ...], tuple[str, ...]], tuple[PrecisionPlan, onnx.ModelProto]],
          samples: Iterable, tolerance: float) -> tuple[PrecisionPlan, onnx.ModelProto]:
    """Rule O9. ``build(low_nodes, fp32_nodes)`` paints and rewrites with those nodes forced
    low / kept fp32; returns the plan (O9 Decisions on every island node tried) and the model.

    A trial lowers one island (or part) and pins every other island node fp32, so that a part
    low does not carry the rest of its island with it (R3 would paint the residual stream after
    a low add low as well): each trial measures exactly what it lowers.
    """
    samples = list(samples)
    # the fp32 file on the CPU provider (no TF32 there); the trials where they will run: the
    # CUDA provider when ONNX Runtime has it (float16 kernels as deployed; the only bfloat16 ones)
    refs = _run(onnx_session(source, ["CPUExecutionProvider"], quiet=True), samples)
    where = onnx_session(source, quiet=True).get_providers()[0].replace("ExecutionProvider", "")

    def measure(model: onnx.ModelProto) -> float:
        return mean_error(_run(onnx_session(model, quiet=True), samples), refs)

    current_plan, current = build((), ())
    base = error = measure(current)
    budget = base * (1 + tolerance)
    order = {n: i for i, n in enumerate(graph.topological())}
    found = islands(plan, graph)
    every = {n for i in found for n in i.nodes}
    lowered: tuple[str, ...] = ()
    remarks: dict[str, tuple[bool, str]] = {}  # node -> (traded, reason); the last try wins
    log.info("O9: %d fp32 islands, error %.3g with all of them fp32", len(found), base)
    # the largest islands first; an island refused whole is tried in halves (topological order)
    pending = [(sorted(i.nodes, key=order.get), 0) for i in sorted(found, key=lambda i: -len(i.nodes))]
    while pending:
        nodes, depth = pending.pop(0)
        part = Island(frozenset(nodes))
        low = lowered + tuple(nodes)
        try:
            trial_plan, trial_model = build(low, tuple(sorted(every - set(low))))
        except Exception as exc:  # noqa: BLE001 -- a trade that makes an invalid file is not taken
            why = f"lowering it does not make a valid file ({' '.join(str(exc).split())[:120]})"
            remarks.update({n: (False, why) for n in nodes})
            continue
        saved = onnx_cast_count(current) - onnx_cast_count(trial_model)
        trial_error = measure(trial_model)
        what = (f"O9 measured on {len(samples)} samples ({where}): with the fp32 island{' part' * (depth > 0)} of "
                f"{part.describe()} low the file has {onnx_cast_count(trial_model)} Casts instead of "
                f"{onnx_cast_count(current)}, and the error vs the fp32 file goes from {error:.3g} to "
                f"{trial_error:.3g}")
        if saved > 0 and trial_error <= budget:
            lowered, current, current_plan, error = low, trial_model, trial_plan, trial_error
            remarks.update({n: (True, f"{what} (within tolerance {tolerance:g} of {base:.3g}): "
                                      f"traded, low") for n in nodes})
            continue
        verdict = "no Cast saved" if saved <= 0 else f"beyond tolerance {tolerance:g} of {base:.3g}"
        remarks.update({n: (False, f"{what} ({verdict}): kept fp32") for n in nodes})
        if saved > 0 and depth < SPLITS and len(nodes) > 1:
            half = len(nodes) // 2
            pending += [(nodes[:half], depth + 1), (nodes[half:], depth + 1)]
    if lowered:  # the final plan: what was traded low, the rest of every island pinned fp32
        current_plan, current = build(lowered, tuple(sorted(every - set(lowered))))
    decisions = {}
    for n, (traded, why) in remarks.items():
        if traded:
            decisions[n] = current_plan[n].with_(rule=Rule.O9_TRADED, reason=why)
        else:  # as the plan without trades decided it (not the pin's R6), with what was measured
            decisions[n] = plan[n].with_(reason=f"{plan[n].reason}; {why}")
    return current_plan.replace(decisions), current
