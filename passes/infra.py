"""The pass contract: what every rewrite pass returns, how the pipeline runs it, what it says.

A rewrite pass takes the IR it rewrites (an ``fx.GraphModule`` or an ``onnx.ModelProto``) and
returns a ``PassResult``: the rewritten IR, whether it changed, one ``Remark`` per decision --
taken (a node fused, a cast inserted, a weight folded) or missed (a pattern that almost matched,
with the rule that failed) -- and the facts a later stage needs (the casts it made, the loss
node it found). Analyses (classify, propagate, ranges, tolerance) return their facts and put
their reasons in the plan's Decisions instead.

``PassManager.run`` runs a pass, checks the graph after every rewrite (``fx.Graph.lint``; the
ONNX pipeline checks the model it returns with the full ONNX checker instead) and turns an
unexpected failure into a ``PassError`` that names the pass and the passes run before it. Errors we raise on purpose (``AmpCompilerError``) pass
through as they are: they already say what to do.

    >>> passes = PassManager()
    >>> result = passes.run(clean_graph, gm)
    >>> result.modified, [str(r.rule) for r in result.remarks][:1]
    (True, ['H1:metadata-assert'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx

from amp_compiler.errors import AmpCompilerError, PassError


@dataclass(frozen=True)
class Remark:
    """One decision a pass made: which pass, which numbered rule (``passes.rules.Rule``), which
    node, and why; ``missed`` when the rule was tried and did not apply."""

    pass_name: str
    rule: str
    node: str
    reason: str
    missed: bool = False

    def as_row(self) -> list[str]:
        """The row ``plan.meta["rewrites"]`` (taken) or ``["missed"]`` keeps: pass, rule, node, reason."""
        return [self.pass_name, str(self.rule), self.node, self.reason]


@dataclass(frozen=True)
class PassResult:
    """What a rewrite pass returns (after torch.fx's ``PassResult``, with remarks and facts)."""

    graph_module: Any
    modified: bool
    remarks: tuple[Remark, ...] = ()
    facts: Any = None

    @property
    def taken(self) -> list[Remark]:
        return [r for r in self.remarks if not r.missed]

    @property
    def missed(self) -> list[Remark]:
        return [r for r in self.remarks if r.missed]


def result(ir: Any, remarks=(), *, modified: bool | None = None, facts: Any = None) -> PassResult:
    """A ``PassResult`` whose ``modified`` defaults to "some decision was taken"."""
    remarks = tuple(remarks)
    if modified is None:
        modified = any(not r.missed for r in remarks)
    return PassResult(ir, modified, remarks, facts)


def lint(gm: fx.GraphModule) -> None:
    """``fx.Graph.lint``: every node's inputs defined before it, targets that exist."""
    gm.graph.lint()


class PassManager:
    """Runs passes one after another on one IR, checking the IR after each rewrite.

    ``check``: how a rewritten IR is checked (FX's own ``lint`` by default); None where the
    pipeline checks its result itself (``convert_onnx`` runs the full ONNX checker on the model
    it returns, and tells a broken source file from a broken rewrite). ``history`` lists the
    passes run so far; a failure names them.
    """

    def __init__(self, check: Callable[[Any], None] | None = lint) -> None:
        self.check = check
        self.history: list[str] = []

    def run(self, fn: Callable[..., PassResult], ir: Any, *args: Any, **kwargs: Any) -> PassResult:
        name = getattr(fn, "__name__", repr(fn))
        try:
            out = fn(ir, *args, **kwargs)
        except AmpCompilerError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a bug in a pass: say which one, and after what
            raise PassError(f"pass {name} failed ({type(exc).__name__}: {exc}) {self._after()}; "
                            f"please report it with the model") from exc
        if not isinstance(out, PassResult):
            raise PassError(f"pass {name} returned {type(out).__name__}, not a PassResult {self._after()}")
        if out.modified and self.check is not None:
            try:
                self.check(out.graph_module)
            except Exception as exc:  # noqa: BLE001
                raise PassError(f"pass {name} left an invalid graph {self._after()}: "
                                f"{type(exc).__name__}: {exc}") from exc
        self.history.append(name)
        return out

    def _after(self) -> str:
        return f"after {', '.join(self.history)}" if self.history else "as the first pass"
