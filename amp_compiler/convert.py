"""convert(): the pipeline, top to bottom, one line per stage.

    >>> import amp_compiler as ac
    >>> amp = ac.convert(model, dtype="bfloat16")
    >>> amp.report()
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Iterable

import torch
from torch import nn

from amp_compiler.errors import ConfigError, TraceError
from amp_compiler.capture.frontend import build_dataflow, capture
from amp_compiler.module import AmpModule
from amp_compiler.passes.attention import rewrite_attention as rewrite_attention_pass
from amp_compiler.passes.classify import classify, override_entries
from amp_compiler.passes.fold_weights import fold_weights
from amp_compiler.passes.fused_cross_entropy import fuse_linear_cross_entropy
from amp_compiler.passes.fused_patterns import fuse_gated_activation, fuse_rotary, recompute_activations
from amp_compiler.passes.size_cache import cache_size_only
from amp_compiler.passes.insert_casts import insert_casts
from amp_compiler.passes.plan import PrecisionPlan
from amp_compiler.passes.policy import policy_for
from amp_compiler.passes.propagate import propagate

log = logging.getLogger("amp_compiler")

_DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "mixed_float16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "mixed_bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype) -> torch.dtype:
    """'float16' / 'bfloat16' / 'mixed_float16' / 'mixed_bfloat16' / torch dtypes -> torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise ConfigError(f"dtype={dtype!r} is not a low-precision dtype; use 'float16' or 'bfloat16' "
                      f"(or torch.float16 / torch.bfloat16)")


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
    from amp_compiler.passes.ranges import collect_ranges, plan_from_ranges, plan_with_overrides
    from amp_compiler.passes.tolerance import AmpBuilder, repair_to_tolerance

    if training:
        # measure on an eval-mode capture: running a training graph would update the user's
        # batch-norm statistics; pins carry over by node name
        was = model.training
        try:
            model.eval()
            egm, _ = capture(model, example_inputs)
        finally:
            model.train(was)
        if attention:
            rewrite_attention_pass(egm)
        edf = build_dataflow(egm)
    else:
        egm, edf = gm, dataflow
    ranges = collect_ranges(egm, calibration, graph=edf, low_dtypes=(low,))
    plan = plan_from_ranges(edf, ranges, low, device_type, keep_fp32=keep_fp32, force_low=force_low)
    pins = {n: (d.rule, d.reason) for n, d in plan.items() if d.rule[:1] == "D"}
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
    return PrecisionPlan(dict(plan.items()), low_dtype=low, device_type=device_type,
                         meta={**plan.meta, **meta})


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


def new_scaler(device_type: str, loss_scale):
    """A LossScaler for ``loss_scale`` ("dynamic" or a positive number: static scaling)."""
    from amp_compiler.scaler import LossScaler

    if loss_scale == "dynamic":
        return LossScaler(device_type)
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and loss_scale > 0:
        # static scaling: the floor and ceiling pin the scale; overflowing steps are still skipped
        return LossScaler(device_type, init_scale=float(loss_scale), min_scale=float(loss_scale),
                          max_scale=float(loss_scale))
    raise ConfigError(f"loss_scale={loss_scale!r}: use 'dynamic', a positive number, or None")


def make_scaler(model: nn.Module, gm, dataflow, low: torch.dtype, device_type: str, loss_scale):
    """LossScaler for fp16 training (None for bf16 or loss_scale=None), wired into the graph."""
    if low != torch.float16 or loss_scale is None:
        return None
    from amp_compiler.passes.loss_scaling import insert_loss_scaling

    scaler = new_scaler(device_type, loss_scale)
    scaler.track(model.named_parameters())
    kinds = {v.name: v.kind for v in dataflow.vertices()}
    device = next((p.device for p in model.parameters()), torch.device(device_type))
    loss = insert_loss_scaling(gm, scaler.scale_tensor(device), kinds)
    # L4: the graph divides the gradients by the scale where they leave it, so .grad is true
    scaler.unscaled_in_backward = loss is not None
    log.info("loss scaling: %s", f"in-graph on '{loss}'" if loss else "outputs are not a scalar "
             "loss; use amp.scaler.scale(loss).backward()")
    return scaler


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
    from amp_compiler.dynamo import convert_dynamo

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

    was_training = model.training
    try:
        model.train(training)  # trace the graph of the mode asked for; restored below
        # 1. capture: an FX GraphModule of our own (the user's parameters are shared, not copied);
        #    capture-time asserts and no-ops removed (H1-H7), SDPA masks folded (S1-S3)
        gm, source = capture(model, example_inputs, example_kwargs=example_kwargs,
                             dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)
    log.info("captured %s graph: %d nodes", source, len(gm.graph.nodes))
    # 1b. fuse explicit attention into one SDPA node: the B x H x T x T scores and probabilities
    #     are never stored, and the kernel keeps its softmax in fp32 (rules A1-A10)
    if attention:
        log.info("fused %d attention patterns into scaled_dot_product_attention",
                 len(rewrite_attention_pass(gm)))
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
    plan = PrecisionPlan(dict(plan.items()), low_dtype=plan.low_dtype, device_type=plan.device_type,
                         meta={**plan.meta, "rewrite_attention": attention, "capture": source,
                               "rewrites": [r.as_row() for r in gm.meta.get("amp_rewrites", ())]})
    log.info("plan: %s", plan)
    # 5. insert casts: one per (value, dtype), outputs restored (rules I1-I6)
    casts = insert_casts(gm, dataflow, plan)
    log.info("inserted %d casts", casts.count)
    # the plan's reasons say what rule I9 did to a fill value that did not fit the low dtype
    plan = plan.replace({n: plan[n].with_(reason=f"{plan[n].reason}; {note}")
                         for n, note in casts.saturated.items()})
    # 5b. a cross-entropy over a vocabulary-sized linear layer computed in chunks: the fp32
    #     logits, log-softmax and gradient are never held for all rows; logits the model
    #     returns are computed in the same chunks, in training in the layer's dtype (X1-X8)
    fused = fuse_linear_cross_entropy(gm, training=training)
    if training:
        # 5c. a gated MLP's silu(a) * b keeps a and b for backward, not silu(a) too (rule P4),
        #     and an activation read by a linear layer only is computed again in backward,
        #     not kept beside its input (P5)
        fused += fuse_gated_activation(gm)
        fused += recompute_activations(gm)
        # 5d. rotary embeddings: the same forward, autograd's gradient in 5 kernels, not 9 (P6)
        fused += fuse_rotary(gm)
    plan = _with_rewrites(plan, fused)
    # 6. inference: parameter casts folded into stored low-precision copies, once
    if fold:
        log.info("folded %d parameter casts", fold_weights(gm, casts.casts))
    # 7. fp16 training: a loss scaler, the loss gradient scaled inside the graph and divided
    #    again where it leaves it, so that loss.backward() leaves true gradients in .grad
    #    (rules L1-L4; bf16 has fp32's range and needs none)
    scaler = make_scaler(model, gm, dataflow, low, device_type, loss_scale) if training else None
    # 8. what the graph computes from its inputs' sizes alone (position ids, rotary phases)
    #    runs once per input shape (rules K1-K3)
    plan = _with_rewrites(plan, cache_size_only(gm))

    def rebuild(mode: bool) -> AmpModule:
        # a saved plan names the nodes of one mode's graph (dropout, batch norm differ):
        # the other mode is analysed afresh
        return _build(model, example_inputs, training=mode, fold=False,
                      saved_plan=saved_plan if mode == training else None,
                      rewrite_attention=attention, **options)

    # leaf modules whose forward depends on their mode (batch norm): run in the graph's mode
    mode_leaves = [m for n in gm.graph.nodes if n.op == "call_module"
                   for m in [gm.get_submodule(n.target)]
                   if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))]
    return AmpModule(gm, plan, dataflow=dataflow, casts=casts.casts, low_dtype=low,
                     training=training, folded=fold, scaler=scaler, source=source,
                     # a folded module never switches mode: holding no rebuild closure lets the
                     # user's fp32 weights be freed once they drop the original model
                     rebuild=None if fold else rebuild, mode_leaves=mode_leaves,
                     call_spec=call_spec(model, example_inputs, example_kwargs), model=model)


def _with_rewrites(plan: PrecisionPlan, remarks: list) -> PrecisionPlan:
    """``plan`` with the remarks of rewrites made after it appended to ``meta["rewrites"]``."""
    if not remarks:
        return plan
    return PrecisionPlan(dict(plan.items()), low_dtype=plan.low_dtype, device_type=plan.device_type,
                         meta={**plan.meta, "rewrites": plan.meta["rewrites"] + [r.as_row() for r in remarks]})


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
