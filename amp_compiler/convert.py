"""convert(): the pipeline, top to bottom, one line per stage.

    >>> import amp_compiler as ac
    >>> amp = ac.convert(model, dtype="bfloat16")
    >>> amp.report()
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from amp_compiler.capture import build_dataflow, capture
from amp_compiler.dynamo import convert_dynamo
from amp_compiler.errors import ConfigError, TraceError
from amp_compiler.module import AmpModule
from amp_compiler.passes.attention import rewrite_attention as rewrite_attention_pass
from amp_compiler.passes.classify import classify, override_entries
from amp_compiler.passes.dtypes import resolve_dtype
from amp_compiler.passes.fold_weights import fold_weights
from amp_compiler.passes.fused_cross_entropy import fuse_linear_cross_entropy
from amp_compiler.passes.fused_patterns import fuse_gated_activation, fuse_rotary, recompute_activations
from amp_compiler.passes.infra import PassManager
from amp_compiler.passes.insert_casts import insert_casts
from amp_compiler.passes.loss_scaling import insert_loss_scaling
from amp_compiler.passes.plan import PrecisionPlan
from amp_compiler.passes.policy import policy_for
from amp_compiler.passes.propagate import propagate
from amp_compiler.passes.range_recorder import collect_ranges
from amp_compiler.passes.ranges import plan_from_ranges, plan_with_overrides
from amp_compiler.passes.rules import Rule, pass_of
from amp_compiler.passes.size_cache import cache_size_only
from amp_compiler.passes.tolerance import RULE as TOLERANCE_RULE
from amp_compiler.passes.tolerance import repair_to_tolerance
from amp_compiler.scaler import new_scaler

log = logging.getLogger("amp_compiler")


def model_device_type(model: nn.Module, example_inputs) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device.type
    for a in example_inputs or ():
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def wants_attention_rewrite(flag: bool | None, device_type: str, options: dict) -> bool:
    """On by default for CUDA (where fused kernels exist); off when the user pins softmax, since
    the fused op has no separate softmax node left to pin."""
    pinned = {str(e) for e in options["keep_fp32"] + options["force_low"]}
    if flag is None:
        flag = device_type == "cuda"
    return bool(flag) and "softmax" not in pinned


def numerics_plan(model, example_inputs, gm, source, dataflow, low, device_type, *, training,
                  attention, keep_fp32, force_low, calibration, tolerance, **_) -> PrecisionPlan:
    """Plan from calibration data: range pins (D1-D4), then the tolerance search (T1)."""
    if training:
        # measure on an eval-mode capture: running a training graph would update the user's
        # batch-norm statistics; pins carry over by node name
        egm, _ = capture(model, example_inputs, mode=False)
        if attention:
            PassManager().run(rewrite_attention_pass, egm)
        edf = build_dataflow(egm)
    else:
        egm, edf = gm, dataflow
    ranges = collect_ranges(egm, calibration, graph=edf, low_dtypes=(low,))
    plan = plan_from_ranges(edf, ranges, low, device_type, keep_fp32=keep_fp32, force_low=force_low)
    pins = {n: (d.rule, d.reason) for n, d in plan.items() if pass_of(d.rule) == "ranges"}
    meta = dict(plan.meta)
    if tolerance is not None:
        builder = AmpBuilder(model, example_inputs, dtype=low, keep_fp32=keep_fp32,
                             force_low=force_low, overrides=pins, captured=(egm, source))
        result = repair_to_tolerance(builder, model, calibration, tolerance, builder.low_candidates())
        log.info("tolerance: %s", result.summary())
        pins.update(result.fp32_nodes)
        meta["tolerance"] = {"eps": tolerance, "error": result.error, "evaluations": result.evaluations,
                             "low_fraction": result.low_fraction}
    if egm is not gm or tolerance is not None:
        pins = {n: v for n, v in pins.items() if n in dataflow}
        plan = plan_with_overrides(dataflow, low, device_type, keep_fp32=keep_fp32,
                                   force_low=force_low, overrides=pins)
    return plan.with_meta(**meta)


def check_saved_plan(plan: PrecisionPlan, dataflow) -> PrecisionPlan:
    """A saved plan must name exactly this graph's nodes (same model, same capture path)."""
    missing = [n for n in dataflow if n not in plan]
    extra = [n for n in plan if n not in dataflow]
    if missing or extra:
        raise ConfigError(f"the saved plan does not match this model's graph: {len(missing)} nodes "
                          f"missing from the plan (e.g. {missing[:3]}), {len(extra)} unknown "
                          f"(e.g. {extra[:3]}); save the plan from the same model and capture path "
                          f"(with or without example_inputs)")
    return plan


def make_scaler(model: nn.Module, gm, dataflow, low: torch.dtype, device_type: str, loss_scale,
                passes: PassManager):
    """LossScaler for fp16 training (None for bf16 or loss_scale=None), wired into the graph;
    returns it with the loss scaling pass's remarks."""
    if low != torch.float16 or loss_scale is None:
        return None, ()
    scaler = new_scaler(device_type, loss_scale)
    scaler.track(model.named_parameters())
    kinds = {v.name: v.kind for v in dataflow.vertices()}
    device = next((p.device for p in model.parameters()), torch.device(device_type))
    scaled = passes.run(insert_loss_scaling, gm, scaler.scale_tensor(device), kinds)
    loss = scaled.facts
    # L4: the graph divides the gradients by the scale where they leave it, so .grad is true
    scaler.unscaled_in_backward = loss is not None
    log.info("loss scaling: %s", f"in-graph on '{loss}'" if loss else "outputs are not a scalar "
             "loss; use amp.scaler.scale(loss).backward()")
    return scaler, scaled.remarks


def convert(model: nn.Module, example_inputs: tuple | None = None, *, dtype="float16",
            training: bool | None = None, keep_fp32: Iterable = (), force_low: Iterable = (),
            calibration=None, tolerance: float | None = None, loss_scale="dynamic",
            example_kwargs: dict | None = None, dynamic_shapes: Any = "auto",
            dynamic_batch: bool = True, plan: PrecisionPlan | str | None = None,
            rewrite_attention: bool | None = None, capture: str = "auto") -> AmpModule:
    """Convert ``model`` to mixed precision; the model itself is never modified.

    Args:
        model: an ``nn.Module``.
        example_inputs: a tuple of inputs. Given: ``torch.export`` captures the model (needed
            for models fx cannot trace). Absent: ``torch.fx`` symbolic tracing.
        example_kwargs: keyword inputs (``amp(**batch)``, as Trainer and Accelerate call a
            model), alone or beside ``example_inputs``; captured with ``torch.export``.
        dynamic_shapes: "auto" (every dimension symbolic unless the model fixes it; a batch-1
            example does not fix the batch), None (all static), or torch.export's spec.
        dynamic_batch: False is the same as ``dynamic_shapes=None`` (kept for old callers).
        capture: "auto" (torch.export with example inputs, fx tracing without; when torch.export
            cannot capture the model, TorchDynamo), "export", "fx", or "dynamo" (graphs planned
            at their first call, graph breaks eager: ``amp_compiler.dynamo``).
        dtype: ``"float16"`` | ``"bfloat16"`` (also torch dtypes and ``"mixed_*"`` spellings).
        training: None follows ``model.training``; False folds weight casts once (inference).
        keep_fp32 / force_low: op kinds, module-path globs, nn.Module classes or node names.
        loss_scale: ``"dynamic"`` (fp16 training gets a LossScaler), a float (static), or None.
        calibration: iterable of input tuples; the fp32 graph runs on them and values whose
            observed range would overflow the low dtype stay fp32 (rules D1-D4).
        tolerance: epsilon; with ``calibration``, guarantees max relative error <= epsilon
            against fp32 on the calibration data (rule T1), or raises ToleranceError.
        plan: a saved PrecisionPlan (or its JSON text) to re-apply instead of analysing: the same
            casts every time, even if the policy tables change in a later version.
        rewrite_attention: fuse explicit attention (q@k^T, scale, mask, softmax, @v) into one
            scaled_dot_product_attention node; None means on for CUDA models.

    Example:
        >>> amp = convert(model, dtype="bfloat16")
        >>> amp.plan["fc1"].precision
        torch.bfloat16
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"convert() takes an nn.Module, got {type(model).__name__}")
    training = model.training if training is None else bool(training)
    if isinstance(plan, str):
        plan = PrecisionPlan.from_json(plan)
    if plan is not None:
        dtype = plan.low_dtype
        rewrite_attention = bool(plan.meta.get("rewrite_attention", False))
    if tolerance is not None and (calibration is None or not tolerance > 0):
        raise ConfigError("tolerance=eps needs calibration=[input tuples...] and eps > 0: the "
                          "guarantee is measured against fp32 on that data")
    if calibration is not None:
        calibration = [c if isinstance(c, tuple) else (c,) for c in calibration]
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise ConfigError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    if example_kwargs is not None and calibration is not None:
        raise ConfigError("calibration data are input tuples: convert with positional "
                          "example_inputs to use calibration (keyword inputs are not supported there yet)")
    if not dynamic_batch:
        dynamic_shapes = None
    if capture not in CAPTURES:
        raise ConfigError(f"capture={capture!r}: use one of {', '.join(CAPTURES)}")
    if capture == "fx" and (example_inputs is not None or example_kwargs is not None):
        raise ConfigError("capture='fx' traces symbolically: it takes no example inputs")
    if capture == "export" and example_inputs is None and example_kwargs is None:
        raise ConfigError("capture='export' needs example_inputs=(...) or example_kwargs={...}")
    if capture == "dynamo":
        return _dynamo(model, dtype, training, keep_fp32, force_low, loss_scale, calibration, plan)
    try:
        return _build(model, example_inputs, training=training, fold=not training, dtype=dtype,
                      keep_fp32=keep_fp32, force_low=force_low, calibration=calibration,
                      tolerance=tolerance, loss_scale=loss_scale, example_kwargs=example_kwargs,
                      dynamic_shapes=dynamic_shapes, saved_plan=plan,
                      rewrite_attention=rewrite_attention)
    except TraceError as exc:
        # torch.export refuses data-dependent control flow; dynamo runs it eagerly between graphs
        if capture != "auto" or (example_inputs is None and example_kwargs is None) \
                or calibration is not None or plan is not None:
            raise
        log.warning("%s -- capturing with TorchDynamo instead (capture='dynamo'): every graph "
                    "it captures is planned at its first call", exc)
        return _dynamo(model, dtype, training, keep_fp32, force_low, loss_scale, calibration, plan)


CAPTURES = ("auto", "export", "fx", "dynamo")


def _dynamo(model, dtype, training, keep_fp32, force_low, loss_scale, calibration, plan):
    if calibration is not None or plan is not None:
        raise ConfigError("capture='dynamo' plans each graph when it first runs: calibration, "
                          "tolerance and saved plans need the export or fx capture")
    return convert_dynamo(model, dtype=dtype, training=training, keep_fp32=keep_fp32,
                          force_low=force_low, loss_scale=loss_scale)


def _build(model: nn.Module, example_inputs, *, training: bool, fold: bool, dtype, keep_fp32,
           force_low, calibration, tolerance, loss_scale, example_kwargs, dynamic_shapes,
           saved_plan: PrecisionPlan | None = None, rewrite_attention: bool | None = None) -> AmpModule:
    """The pipeline; ``fold`` is False for the eval variant of a training conversion."""
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    low = resolve_dtype(dtype)
    device_type = model_device_type(model, tuple(example_inputs or ()) + tuple((example_kwargs or {}).values()))
    options = dict(dtype=low, keep_fp32=override_entries(keep_fp32), force_low=override_entries(force_low),
                   calibration=calibration, tolerance=tolerance, loss_scale=loss_scale,
                   example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes)
    attention = wants_attention_rewrite(rewrite_attention, device_type, options)

    # 1. capture the graph of the mode asked for: an FX GraphModule of our own (the user's
    #    parameters are shared, not copied); capture-time asserts and no-ops removed (H1-H7),
    #    SDPA masks folded (S1-S3)
    gm, source = capture(model, example_inputs, mode=training, example_kwargs=example_kwargs,
                         dynamic_shapes=dynamic_shapes)
    log.info("captured %s graph: %d nodes", source, len(gm.graph.nodes))
    remarks = list(gm.meta.get("amp_rewrites", ()))
    passes = PassManager()  # runs the rewrites from here on, checking the graph after each
    # 1b. fuse explicit attention into one SDPA node: the B x H x T x T scores and probabilities
    #     are never stored, and the kernel keeps its softmax in fp32 (rules A1-A10)
    if attention:
        fused = passes.run(rewrite_attention_pass, gm)
        remarks += fused.remarks
        log.info("fused %d attention patterns into scaled_dot_product_attention", len(fused.facts))
    # 2. describe it IR-neutrally: kinds, dtypes, module paths, castable uses
    dataflow = build_dataflow(gm)
    if saved_plan is None and calibration is not None:
        # 3-4. with data: ranges force overflowing values to fp32 (D1-D4), tolerance repairs (T1)
        plan = numerics_plan(model, example_inputs, gm, source, dataflow, low, device_type,
                             training=training, attention=attention, **options)
    elif saved_plan is None:
        # 3. classify: op kind -> category from the (device, dtype) policy; overrides resolved;
        #    kinds whose low kernel this device lacks are probed once and found (C5)
        policy = policy_for(device_type, low)
        classes = classify(dataflow, policy, keep_fp32=options["keep_fp32"], force_low=options["force_low"],
                           probe_kernels=True)
        # 4. propagate: paint precisions (rules R0-R7), every node gets a Decision
        plan = propagate(dataflow, classes, policy)
    else:
        # 3-4. a saved plan replaces the analyses, after checking it describes this graph
        plan = check_saved_plan(saved_plan, dataflow)
    plan = plan.with_meta(rewrite_attention=attention, capture=source, rewrites=[], missed=[])
    plan = plan.with_remarks(remarks)
    log.info("plan: %s", plan)

    def rebuild(mode: bool) -> AmpModule:
        # a saved plan names the nodes of one mode's graph (dropout, batch norm differ):
        # the other mode is analysed afresh
        return _build(model, example_inputs, training=mode, fold=False,
                      saved_plan=saved_plan if mode == training else None,
                      rewrite_attention=attention, **options)

    # 5-8. apply the plan to the graph: casts, fused kernels, folded weights, loss scaling
    return lower(model, gm, dataflow, plan, training=training, fold=fold, loss_scale=loss_scale,
                 source=source, passes=passes,
                 # a folded module never switches mode: holding no rebuild closure lets the
                 # user's fp32 weights be freed once they drop the original model
                 rebuild=None if fold else rebuild,
                 call_spec=call_spec(model, example_inputs, example_kwargs))


def lower(model: nn.Module, gm, dataflow, plan: PrecisionPlan, *, training: bool, fold: bool,
          loss_scale, source: str, rebuild=None, call_spec=None,
          passes: PassManager | None = None) -> AmpModule:
    """The rewrite stages: ``plan`` applied to the captured graph ``gm`` (rewritten in place),
    wrapped as an AmpModule; every pass's remarks land in ``plan.meta``. convert() and the
    tolerance search's builds both end here."""
    low, device_type = plan.low_dtype, plan.device_type
    passes = passes if passes is not None else PassManager()
    # 5. insert casts: one per (value, dtype), outputs restored (rules I1-I9)
    cast = passes.run(insert_casts, gm, dataflow, plan)
    casts, remarks = cast.facts, list(cast.remarks)
    log.info("inserted %d casts", casts.count)
    # the plan's reasons say what rule I9 did to a fill value that did not fit the low dtype
    plan = plan.replace({n: plan[n].with_(reason=f"{plan[n].reason}; {note}")
                         for n, note in casts.saturated.items()})
    # 5b. a cross-entropy over a vocabulary-sized linear layer computed in chunks: the fp32
    #     logits, log-softmax and gradient are never held for all rows; logits the model
    #     returns are computed in the same chunks, in training in the layer's dtype (X1-X8)
    remarks += passes.run(fuse_linear_cross_entropy, gm, training=training).remarks
    if training:
        # 5c. a gated MLP's silu(a) * b keeps a and b for backward, not silu(a) too (rule P4),
        #     and an activation read by a linear layer only is computed again in backward,
        #     not kept beside its input (P5)
        remarks += passes.run(fuse_gated_activation, gm).remarks
        remarks += passes.run(recompute_activations, gm).remarks
        # 5d. rotary embeddings: the same forward, autograd's gradient in 5 kernels, not 9 (P6)
        remarks += passes.run(fuse_rotary, gm).remarks
    # 6. inference: parameter casts folded into stored low-precision copies, once
    if fold:
        folded = passes.run(fold_weights, gm, casts.casts)
        remarks += folded.remarks
        log.info("folded %d parameter casts", len(folded.taken))
    # 7. fp16 training: a loss scaler, the loss gradient scaled inside the graph and divided
    #    again where it leaves it, so that loss.backward() leaves true gradients in .grad
    #    (rules L1-L5; bf16 has fp32's range and needs none)
    scaler, scaling = make_scaler(model, gm, dataflow, low, device_type, loss_scale, passes) \
        if training else (None, ())
    remarks += scaling
    # 8. what the graph computes from its inputs' sizes alone (position ids, rotary phases)
    #    runs once per input shape (rules K1-K3)
    remarks += passes.run(cache_size_only, gm).remarks
    plan = plan.with_remarks(remarks)
    # leaf modules whose forward depends on their mode (batch norm): run in the graph's mode
    mode_leaves = [m for n in gm.graph.nodes if n.op == "call_module"
                   for m in [gm.get_submodule(n.target)]
                   if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))]
    return AmpModule(gm, plan, dataflow=dataflow, casts=casts.casts, low_dtype=low,
                     training=training, folded=fold, scaler=scaler, source=source,
                     rebuild=rebuild, mode_leaves=mode_leaves, call_spec=call_spec, model=model)


# -- the tolerance search's builds: one capture, the plan and the rewrite stages per set --------

class AmpBuilder:
    """Captures ``model`` once; ``builder(fp32_nodes)`` returns a converted AmpModule with those
    nodes pinned fp32 (rule T1) in milliseconds. Eval-mode conversion, weights folded, as
    ``convert(model, example_inputs, dtype=..., training=False)`` does. ``captured=(gm, source)``
    reuses a capture made elsewhere (it must not be rewritten while the builder is used);
    ``overrides`` (e.g. ``range_overrides``) are pinned in every build.

        >>> build = AmpBuilder(model, None, dtype=torch.float16)
        >>> amp = build(frozenset({"linear_1"}))
        >>> amp.plan["linear_1"].rule
        'T1:tolerance'
    """

    # repair_to_tolerance hands a builder that takes them the reasons of the nodes it moved
    takes_reasons = True

    def __init__(self, model: nn.Module, example_inputs: tuple | None = None, *,
                 dtype="float16", keep_fp32: Iterable = (), force_low: Iterable = (),
                 overrides: Mapping[str, tuple[str, str]] | None = None,
                 captured: tuple[fx.GraphModule, str] | None = None) -> None:
        if example_inputs is not None and not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        self.low_dtype = resolve_dtype(dtype)
        self.device_type = model_device_type(model, example_inputs)
        if captured is not None:
            # convert() already holds the un-rewritten eval-mode capture: no second capture
            self.graph_module, self.source = captured
        else:
            self.graph_module, self.source = capture(model, example_inputs, mode=False)
        self.model = model
        self.dataflow = build_dataflow(self.graph_module)
        self.keep_fp32, self.force_low = override_entries(keep_fp32), override_entries(force_low)
        self.overrides = dict(overrides or {})
        self.builds = 0

    def plan(self, fp32_nodes: Iterable[str] | Mapping[str, tuple[str, str]] = ()) -> PrecisionPlan:
        """The plan with ``fp32_nodes`` pinned (a mapping node -> (rule, reason) names why)."""
        pins = dict(self.overrides)
        for n in fp32_nodes:
            pins.setdefault(n, fp32_nodes[n] if isinstance(fp32_nodes, Mapping)
                            else (TOLERANCE_RULE, "moved to fp32 by the tolerance search"))
        return plan_with_overrides(self.dataflow, self.low_dtype, self.device_type,
                                   keep_fp32=self.keep_fp32, force_low=self.force_low, overrides=pins)

    def low_candidates(self) -> list[str]:
        """Compute nodes the plan with nothing moved runs in low precision (graph order)."""
        plan = self.plan()
        return [n for n in plan.low_nodes() if self.dataflow.vertex(n).role == "compute"
                and plan[n].rule != Rule.R0_PASSTHROUGH]

    def __call__(self, fp32_nodes: frozenset[str] | Mapping[str, tuple[str, str]] = frozenset(), *,
                 plan: PrecisionPlan | None = None) -> AmpModule:
        plan = plan if plan is not None else self.plan(fp32_nodes)
        # a fresh graph over the same (shared, never modified) parameters: the rewrite stages
        # rewrite the copy, the fp32 capture stays intact for the next build
        gm = fx.GraphModule(self.graph_module, copy.deepcopy(self.graph_module.graph))
        self.builds += 1
        return lower(self.model, gm, self.dataflow, plan, training=False, fold=True,
                     loss_scale=None, source=self.source)


def amp_builder(model: nn.Module, example_inputs: tuple | None = None, *, dtype="float16",
                keep_fp32: Iterable = (), force_low: Iterable = (),
                overrides: Mapping[str, tuple[str, str]] | None = None) -> AmpBuilder:
    """``AmpBuilder(...)``: the ``build_amp`` callback ``repair_to_tolerance`` wants, fast."""
    return AmpBuilder(model, example_inputs, dtype=dtype, keep_fp32=keep_fp32,
                      force_low=force_low, overrides=overrides)


def call_spec(model: nn.Module, example_inputs, example_kwargs):
    """How the capture was called (forward's signature, how many positional inputs, which
    keywords): a call spelling the same inputs another way is re-bound to it."""
    if example_inputs is None and example_kwargs is None:
        return None
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    return signature, len(example_inputs or ()), tuple(example_kwargs or ())
