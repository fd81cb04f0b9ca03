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
import re
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Iterator, Mapping

import torch

from amp_compiler.errors import PlanError

from .dtypes import LOW_DTYPES, TORCH_DTYPES, dtype_name
from .policy import CATEGORIES
from .rules import Rule, rule_family


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

    def with_meta(self, **entries) -> "PrecisionPlan":
        """A new plan with ``meta`` entries added or replaced."""
        return PrecisionPlan(dict(self._decisions), low_dtype=self.low_dtype,
                             device_type=self.device_type, meta={**self.meta, **entries})

    def with_remarks(self, remarks) -> "PrecisionPlan":
        """A new plan with the remarks of passes (``passes.infra.Remark``) appended to
        ``meta["rewrites"]`` (taken) and ``meta["missed"]``, as rows (pass, rule, node, reason)."""
        remarks = list(remarks)
        if not remarks:
            return self
        taken = [r.as_row() for r in remarks if not r.missed]
        missed = [r.as_row() for r in remarks if r.missed]
        return self.with_meta(rewrites=[*self.meta.get("rewrites", ()), *taken],
                              missed=[*self.meta.get("missed", ()), *missed])

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
    def from_json(cls, text: str | bytes, *, source: str = "plan") -> "PrecisionPlan":
        """Read back what ``to_json`` wrote; anything else raises ``PlanError`` naming the place
        (``source`` is the file name used in messages, e.g. ``"out/plan.json"``).

        A plan is trusted to drive casts, so only what the project itself writes is accepted:
        the format tag, the five decision fields as strings, a low dtype of float16/bfloat16,
        and per node a precision its rule can produce (see ``_check_precision``).
        """
        data = _load_bounded(text, source)
        return _plan_from_data(cls, data, source)


def _restore_plan(decisions, low_dtype, device_type, meta) -> PrecisionPlan:
    return PrecisionPlan(decisions, low_dtype=low_dtype, device_type=device_type, meta=meta)


# -- reading saved plans: bounded and validated --------------------------------------------------

PLAN_FORMAT = "amp_compiler.plan/1"
# A GPT-2-sized plan with its cast list is well under 1 MB; these bounds only stop files that
# would take minutes or gigabytes to read (and json's recursive parser from overflowing).
MAX_PLAN_CHARS = 64 * 2**20
MAX_PLAN_NODES = 1_000_000
MAX_PLAN_DEPTH = 16   # what to_json writes nests 5 deep (meta -> casts -> cast -> consumers)

_TOP_KEYS = ("format", "low_dtype", "device_type", "meta", "nodes")
_DECISION_FIELDS = ("kind", "category", "precision", "rule", "reason")
# the policy categories plus the bookkeeping ones classify gives sources and non-float values
_BOOKKEEPING = ("input", "param", "const", "output", "non_float", "factory", "cast")
_CATEGORIES = frozenset(CATEGORIES) | frozenset(_BOOKKEEPING)
_RULE = re.compile(r"[A-Z][0-9]+:[A-Za-z0-9_-]+\Z")
# known meta entries and their JSON types (others are kept as the user stored them)
_META_TYPES = {"casts": list, "rewrite_attention": bool, "capture": str, "tolerance": dict,
               "range_findings": list, "rewrites": list, "missed": list, "graph": int, "graphs": int,
               "source": str, "opset": int, "keep_io_types": bool, "fp64": str}
_CAST_FIELDS = {"node": str, "source": str, "dtype": str, "consumers": list, "is_param": bool}


def _fail(source: str, where: str, problem: str) -> PlanError:
    return PlanError(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


def _nesting_depth(text: str) -> tuple[int, int]:
    """Deepest bracket nesting outside strings and where it is, in one linear pass with no
    recursion (json.loads recurses once per level and would hit RecursionError first)."""
    depth = deepest = where = 0
    in_string = False
    # escape pairs are consumed whole, so an escaped quote never toggles the string state
    for m in re.finditer(r'\\.|["\[\]{}]', text, re.S):
        tok = m.group()
        if tok == '"':
            in_string = not in_string
        elif in_string or len(tok) == 2:
            continue
        elif tok in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, m.start()
                if deepest > MAX_PLAN_DEPTH:
                    break
        else:
            depth -= 1
    return deepest, where


def _load_bounded(text, source: str):
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail(source, "", f"not UTF-8 text ({e}); a plan is the JSON "
                                    f"PrecisionPlan.to_json writes") from None
    if not isinstance(text, str):
        raise _fail(source, "", f"expected the JSON text of a plan, got {type(text).__name__}")
    if len(text) > MAX_PLAN_CHARS:
        raise _fail(source, "", f"{len(text)} characters is over the {MAX_PLAN_CHARS} a plan may "
                                f"have; this is not a plan written by PrecisionPlan.to_json")
    depth, where = _nesting_depth(text)
    if depth > MAX_PLAN_DEPTH:
        raise _fail(source, "", f"nested more than {MAX_PLAN_DEPTH} levels deep (at character "
                                f"{where}); this is not a plan written by PrecisionPlan.to_json")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge integers, stray surrogates
        raise _fail(source, "", f"not valid JSON ({e})") from None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _want(source: str, where: str, value, kind: type, what: str):
    # bool is an int subclass in Python, but not a JSON number
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(source, where, f"expected {what}, got {type(value).__name__} {_show(value)}")
    return value


def _plan_from_data(cls, data, source: str) -> PrecisionPlan:
    _want(source, "", data, dict, "a JSON object (not a plan written by PrecisionPlan.to_json)")
    missing = [k for k in _TOP_KEYS if k not in data]
    extra = [k for k in data if k not in _TOP_KEYS]
    if data.get("format") != PLAN_FORMAT or missing or extra:
        problem = (f"'format' is {_show(data['format'])}, not {PLAN_FORMAT!r}" if "format" in data
                   and data["format"] != PLAN_FORMAT else
                   f"missing {', '.join(map(repr, missing))}" if missing else
                   f"unknown key{'s' * (len(extra) > 1)} {', '.join(map(_show, extra))}")
        raise _fail(source, "", f"not a plan written by PrecisionPlan.to_json ({problem}; it "
                                f"writes exactly {', '.join(_TOP_KEYS)})")
    low_name = data["low_dtype"]
    if not isinstance(low_name, str) or low_name not in LOW_DTYPES:
        raise _fail(source, "low_dtype", f"{_show(low_name)} is not float16 or bfloat16")
    low = LOW_DTYPES[low_name]
    device_type = _want(source, "device_type", data["device_type"], str, "a device type string")
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", device_type):
        raise _fail(source, "device_type", f"{_show(device_type)} is not a device type "
                                           f"(cpu, cuda, ...)")
    meta = _check_meta(source, _want(source, "meta", data["meta"], dict, "a JSON object"))
    nodes = _want(source, "nodes", data["nodes"], dict, "a JSON object of node name -> decision")
    if len(nodes) > MAX_PLAN_NODES:
        raise _fail(source, "nodes", f"{len(nodes)} nodes is over the {MAX_PLAN_NODES} a plan "
                                     f"may have")
    decisions = {name: _decision(source, f"nodes[{_show(name)}]", d, low)
                 for name, d in nodes.items()}
    return cls(decisions, low_dtype=low, device_type=device_type, meta=meta)


def _decision(source: str, where: str, d, low: torch.dtype) -> Decision:
    _want(source, where, d, dict, f"an object with {', '.join(_DECISION_FIELDS)}")
    missing = [k for k in _DECISION_FIELDS if k not in d]
    extra = [k for k in d if k not in _DECISION_FIELDS]
    if missing or extra:
        problem = (f"missing {', '.join(map(repr, missing))}" if missing
                   else f"unknown key{'s' * (len(extra) > 1)} {', '.join(map(_show, extra))}")
        raise _fail(source, where, f"{problem} (a decision has exactly "
                                   f"{', '.join(_DECISION_FIELDS)})")
    for k in _DECISION_FIELDS:
        _want(source, f"{where}.{k}", d[k], str, "a string")
    if d["category"] not in _CATEGORIES:
        raise _fail(source, f"{where}.category", f"{_show(d['category'])} is not one of "
                                                 f"{', '.join(sorted(_CATEGORIES))}")
    if not _RULE.match(d["rule"]):
        raise _fail(source, f"{where}.rule", f"{_show(d['rule'])} is not a rule id like "
                                             f"'R1:allow'")
    precision = _check_precision(source, where, d, low)
    return Decision(d["kind"], d["category"], precision, d["rule"], d["reason"])


def _check_precision(source: str, where: str, d: dict, low: torch.dtype) -> torch.dtype | None:
    """The precisions each rule writes (propagate's R0 keeps a value's own dtype; every other
    rule chooses between the low dtype and fp32):

    - ``R0:source`` (inputs, parameters, buffers): any torch dtype they are stored in, or none;
    - ``R0:factory`` / ``R0:passthrough``: the floating dtype they produce or forward, or none;
    - ``R0:float64``: float64 (float64 models stay float64, as under autocast);
    - ``R0:module-dtype``: the dtype the user stored a submodule in (float16, bfloat16, float32);
    - ``R0:output`` / ``R0:non-float`` / ``R0:user-cast``: none;
    - ``R9:complex``: float32 (complex values are complex64);
    - any other rule: the plan's low dtype, float32, or none.
    """
    text, rule, category = d["precision"], d["rule"], d["category"]
    place = f"{where}.precision"
    got = None if text == "-" else TORCH_DTYPES.get(text)
    if got is None and text != "-":
        raise _fail(source, place, f"{_show(text)} is not a torch dtype name (float16, float32, "
                                   f"...) or '-'")
    if rule == Rule.R0_SOURCE:
        if category not in ("input", "param", "const"):
            raise _fail(source, f"{where}.rule", f"R0:source is for inputs, parameters and "
                                                 f"buffers, not category {category!r}")
        return got
    if rule in (Rule.R0_FACTORY, Rule.R0_PASSTHROUGH):
        if got is not None and not got.is_floating_point:
            raise _fail(source, place, f"{text!r} under {rule} is not a floating dtype or '-'")
        return got
    if rule == Rule.R0_FLOAT64:
        allowed = (torch.float64,)
    elif rule == Rule.R0_MODULE_DTYPE:
        allowed = (torch.float16, torch.bfloat16, torch.float32)
    elif rule == Rule.R9_COMPLEX:
        allowed = (torch.float32,)
    elif rule in (Rule.R0_OUTPUT, Rule.R0_NON_FLOAT, Rule.R0_USER_CAST):
        allowed = ()
    elif rule_family(rule) == "R0":
        raise _fail(source, f"{where}.rule", f"{rule!r} is not a rule this version writes")
    else:
        allowed = (low, torch.float32)
    if got is not None and got not in allowed:
        names = [dtype_name(a) for a in allowed] + ["'-'"]
        choice = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise _fail(source, place, f"{text!r} is not {choice}"
                                   + (f" (rule {rule})" if rule_family(rule) in ("R0", "R9") else ""))
    return got


def _check_meta(source: str, meta: dict) -> dict:
    for key, kind in _META_TYPES.items():
        if key in meta:
            _want(source, f"meta[{key!r}]", meta[key], kind, f"a JSON {kind.__name__}")
    for i, cast in enumerate(meta.get("casts", ())):
        where = f"meta['casts'][{i}]"
        _want(source, where, cast, dict, f"an object with {', '.join(_CAST_FIELDS)}")
        for key, kind in _CAST_FIELDS.items():
            if key not in cast:
                raise _fail(source, where, f"missing {key!r}")
            _want(source, f"{where}.{key}", cast[key], kind, f"a JSON {kind.__name__}")
        for j, c in enumerate(cast["consumers"]):
            _want(source, f"{where}.consumers[{j}]", c, str, "a node name")
    return meta
