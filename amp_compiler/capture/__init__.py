"""Capture: an nn.Module as an FX GraphModule of our own, then described as a DataflowGraph.

Two capture paths (``capture.fx`` without example inputs, ``capture.export`` with them), both
functionalized (in-place and ``out=`` calls become their out-of-place forms, because a cast
inserted in front of an in-place op would hand it a copy to write into; writes into model
inputs and buffers are written back with ``copy_``), then tidied by the passes every front end
runs (hygiene H1-H7, SDPA masks S1-S3, fused formulas P1-P3). ``capture.dataflow`` describes
the graph for the analyses.

    >>> gm, source = capture(model)                          # fx
    >>> gm, source = capture(model, (torch.randn(2, 784),))  # torch.export
    >>> gm, source = capture(model, inputs, mode=False)      # the eval graph of a training model
    >>> graph = build_dataflow(gm)
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from amp_compiler.capture.dataflow import build_dataflow
from amp_compiler.capture.export import export_capture
from amp_compiler.capture.fx import symbolic_capture
from amp_compiler.passes.fused_patterns import fuse_patterns
from amp_compiler.passes.hygiene import clean_graph
from amp_compiler.passes.infra import PassManager, Remark
from amp_compiler.passes.sdpa_masks import fold_sdpa_masks

__all__ = ["capture", "tidy_captured", "build_dataflow", "symbolic_capture", "export_capture"]


def capture(model: nn.Module, example_inputs: tuple | None = None, *, mode: bool | None = None,
            example_kwargs: dict | None = None,
            dynamic_shapes: Any = "auto") -> tuple[fx.GraphModule, str]:
    """Capture ``model``: ("fx" | "export"), see the module docstring; then ``tidy_captured``
    (metadata asserts, inert dropout, empty concatenations, dead code, dead writes, whole
    slices: rules H1-H7; SDPA mask folding S1-S3; fused formulas, GELU and RMSNorm, P1-P3),
    its remarks in ``gm.meta["amp_rewrites"]``.

    ``mode``: the training flag to capture the graph of (dropout, batch norm differ), the
    model's own when None; the model's flag is restored afterwards.
    """
    was = model.training
    try:
        if mode is not None:
            model.train(mode)  # restored below: the user's model is never modified
        if example_inputs is None and example_kwargs is None:
            gm, source = symbolic_capture(model), "fx"
        else:
            if example_inputs is None:
                example_inputs = ()
            elif not isinstance(example_inputs, tuple):
                example_inputs = (example_inputs,)
            gm, source = export_capture(model, example_inputs, example_kwargs=example_kwargs,
                                        dynamic_shapes=dynamic_shapes), "export"
        gm.meta["amp_rewrites"] = tidy_captured(gm)
    finally:
        if mode is not None:
            model.train(was)
    return gm, source


def tidy_captured(gm: fx.GraphModule) -> list[Remark]:
    """What every front end runs on a graph it captured, before the plan: hygiene (H1-H8), SDPA
    mask folding (S1-S3), fused formulas (P1-P3); their remarks (taken and missed) in order."""
    passes = PassManager()
    return [r for tidy in (clean_graph, fold_sdpa_masks, fuse_patterns)
            for r in passes.run(tidy, gm).remarks]
