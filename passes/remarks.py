"""Remarks: what a rewrite pass did to a graph, node by node, with the rule and the reason.

Analyses record their decisions in the PrecisionPlan; rewrites that remove or change nodes
before the plan exists (hygiene, SDPA masks) record them here, and ``convert`` keeps them in
``plan.meta["rewrites"]`` so the report can say what happened to a node that is gone.

    >>> Remark("hygiene", "H1:metadata-assert", "_assert_tensor_metadata", "restated ...")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx


@dataclass(frozen=True)
class Remark:
    """One change a pass made: which pass, which numbered rule, which node, and why."""

    pass_name: str
    rule: str
    node: str
    reason: str

    def as_row(self) -> list[str]:
        return [self.pass_name, self.rule, self.node, self.reason]


def keep_when_dead(node: fx.Node) -> bool:
    """Nodes dead-code elimination keeps although nobody reads them: inputs (the signature),
    submodule calls (torch.export's guard checks) and impure nodes (asserts, writes, RNG)."""
    return node.op in ("placeholder", "output", "call_module") or node.is_impure()
