"""PrecisionPlan: the immutable result of the analyses, one Decision per node.

A Decision is the *why* of a node's precision as data: the op kind, its policy category, the
dtype it computes in, the numbered rule that decided it, and one human sentence.

    >>> d = Decision("linear", "allow", torch.float16, "R1:allow", "matmul-class op: tensor cores")
    >>> plan = PrecisionPlan({"fc1": d}, low_dtype=torch.float16, device_type="cpu")
    >>> plan["fc1"].precision
    torch.float16
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Iterator, Mapping

import torch


def dtype_name(dtype: torch.dtype | None) -> str:
    """Short printable name: 'float16', 'bfloat16', 'float32', or '-'."""
    return "-" if dtype is None else str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Decision:
    """Why one node computes in the precision it does."""

    kind: str
    category: str
    precision: torch.dtype | None
    rule: str
    reason: str

    def with_(self, **changes) -> "Decision":
        return replace(self, **changes)


class PrecisionPlan(Mapping[str, Decision]):
    """Immutable mapping node name -> Decision, plus the (device, low dtype) it was made for."""

    def __init__(self, decisions: Mapping[str, Decision], *, low_dtype: torch.dtype,
                 device_type: str, meta: Mapping[str, object] | None = None) -> None:
        self._decisions = MappingProxyType(dict(decisions))
        self.low_dtype = low_dtype
        self.device_type = device_type
        self.meta = MappingProxyType(dict(meta or {}))

    def __getitem__(self, name: str) -> Decision:
        return self._decisions[name]

    def __reduce__(self):
        # the read-only views do not pickle; copy.deepcopy(amp) and torch.save go through here
        return (_restore_plan, (dict(self._decisions), self.low_dtype, self.device_type,
                                dict(self.meta)))

    def __iter__(self) -> Iterator[str]:
        return iter(self._decisions)

    def __len__(self) -> int:
        return len(self._decisions)

    def __repr__(self) -> str:
        c = self.counts()
        return (f"PrecisionPlan({len(self)} nodes, low={c['low']}, fp32={c['fp32']}, "
                f"dtype={dtype_name(self.low_dtype)}, device={self.device_type})")

    def replace(self, changes: Mapping[str, Decision]) -> "PrecisionPlan":
        """A new plan with some decisions replaced (plans are never mutated)."""
        merged = dict(self._decisions)
        merged.update(changes)
        return PrecisionPlan(merged, low_dtype=self.low_dtype, device_type=self.device_type,
                             meta=self.meta)

    def low_nodes(self) -> list[str]:
        return [n for n, d in self.items() if d.precision == self.low_dtype]

    def fp32_nodes(self) -> list[str]:
        return [n for n, d in self.items() if d.precision == torch.float32
                and d.category not in ("input", "param", "const", "output")]

    def counts(self) -> dict[str, int]:
        return {"nodes": len(self), "low": len(self.low_nodes()), "fp32": len(self.fp32_nodes()),
                "unknown": sum(1 for d in self.values() if d.category == "unknown")}

    # -- serialisation ---------------------------------------------------------------------
    def to_json(self, **dump_kwargs) -> str:
        """JSON text with every decision; ``from_json`` reads it back."""
        nodes = {n: {**asdict(d), "precision": dtype_name(d.precision)} for n, d in self.items()}
        return json.dumps({"format": "amp_compiler.plan/1", "low_dtype": dtype_name(self.low_dtype),
                           "device_type": self.device_type, "meta": dict(self.meta),
                           "nodes": nodes}, **dump_kwargs)

    @classmethod
    def from_json(cls, text: str) -> "PrecisionPlan":
        data = json.loads(text)
        to_dtype = lambda s: None if s == "-" else getattr(torch, s)  # noqa: E731
        decisions = {n: Decision(**{**d, "precision": to_dtype(d["precision"])})
                     for n, d in data["nodes"].items()}
        return cls(decisions, low_dtype=to_dtype(data["low_dtype"]),
                   device_type=data["device_type"], meta=data.get("meta"))


def _restore_plan(decisions, low_dtype, device_type, meta) -> PrecisionPlan:
    return PrecisionPlan(decisions, low_dtype=low_dtype, device_type=device_type, meta=meta)
