"""classify: op kind -> policy category for every vertex, and user overrides resolved to nodes.

Rules (numbered as they appear in Decisions):

    C1  a compute vertex gets the category its kind has in the policy table;
    C2  kinds no table names are ``unknown`` (fp32, they stop propagation, the report lists them);
    C3  vertices with no floating value (indices, masks, shapes) are ``non_float``;
    C4  ``keep_fp32`` / ``force_low`` entries are resolved, each entry being one of: an op kind
        (``"softmax"``), a node name (``"node:softmax_2"`` when it collides with a kind), a module-path glob (``"blocks.*.ln1"``; a module path also
        covers everything under it), an ``nn.Module`` class, or a node-name regex
        (``"re:<pattern>"``: every compute node whose name the pattern matches anywhere, as
        ``re.search`` does; anchor it with ``^...$`` for whole names). An entry that matches
        nothing raises ``ConfigError`` with the closest valid names; a kind or class this model
        lacks, or a regex matching no node, warns (``UnusedOverrideWarning``) instead; an
        invalid regex is a ``ConfigError`` naming it.
    C5  with ``probe_kernels``, a kind whose low-precision kernel this device lacks
        (``passes.kernels``: probed once per kind, device type and dtype) is listed in
        ``no_kernel`` with the probe's error; ``propagate`` keeps it fp32 (rule R8).
    C6  a compute vertex whose value is complex or that reads a complex value
        (``view_as_complex``, ``torch.fft.*``, ``z.abs()``, ``z * w``) is ``complex``, whatever
        its kind: ``propagate`` keeps it fp32 with complex64 values (rule R9). Casts and
        factories stay ``cast`` / ``factory``; metadata reads and comparisons ``non_float``.

    >>> cls = classify(graph, policy_for("cpu", torch.bfloat16), keep_fp32=("softmax",))
    >>> cls.categories["fc1"], sorted(cls.keep_fp32)
    ('allow', ['softmax'])
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch

from amp_compiler.errors import ConfigError, UnusedOverrideWarning

from .graph import DataflowGraph
from .kernels import missing_kernel
from .policy import NON_FLOAT, Policy, policy_for

SOURCE_ROLES = ("input", "param", "const", "output")


@dataclass(frozen=True)
class Classification:
    """Per-vertex category plus the nodes each override entry selected (node -> entry text)."""

    categories: dict[str, str]
    keep_fp32: dict[str, str] = field(default_factory=dict)
    force_low: dict[str, str] = field(default_factory=dict)
    no_kernel: dict[str, str] = field(default_factory=dict)  # node -> why (rule C5)


def classify(graph: DataflowGraph, policy: Policy, *, keep_fp32: Iterable = (),
             force_low: Iterable = (), probe_kernels: bool = False) -> Classification:
    """Run rules C1-C6 over ``graph``; ``probe_kernels`` for graphs torch will run (not ONNX)."""
    categories: dict[str, str] = {}
    for v in graph.vertices():
        touches_complex = v.is_complex or bool(graph.complex_inputs(v.name))
        if v.role in SOURCE_ROLES:
            categories[v.name] = v.role
        elif v.kind in NON_FLOAT or (v.is_float is False and not touches_complex
                                     and not list(graph.float_inputs(v.name))):
            categories[v.name] = "non_float"
        elif v.kind in ("factory", "cast"):
            categories[v.name] = v.kind
        elif touches_complex:
            categories[v.name] = "complex"  # C6
        else:
            categories[v.name] = policy.category(v.kind)
    no_kernel: dict[str, str] = {}
    if probe_kernels:
        for v in graph.vertices():
            if categories[v.name] in ("allow", "fp32_acc", "infer", "clear"):
                why = missing_kernel(v.kind, policy.device_type, policy.low_dtype)
                if why is not None:
                    no_kernel[v.name] = why
    return Classification(categories, resolve_entries(graph, keep_fp32, "keep_fp32"),
                          resolve_entries(graph, force_low, "force_low"), no_kernel)


def override_entries(entries, arg: str = "keep_fp32 or force_low") -> tuple:
    """``keep_fp32`` / ``force_low`` as a tuple: one string or class alone counts as one entry
    (``keep_fp32="softmax"`` is not five letters); None or a non-iterable is a ConfigError."""
    if isinstance(entries, (str, type)):
        return (entries,)
    # None is refused rather than read as "none": () says that, and a None often stands for a
    # config value that was never filled in
    try:
        if entries is None or isinstance(entries, (bytes, bytearray)):
            raise TypeError
        return tuple(entries)
    except TypeError:
        raise ConfigError(f"{arg} got {entries!r}: pass a list of op kinds ('softmax'), "
                          f"module-path globs ('blocks.*.ln1'), node names, node-name regexes "
                          f"('re:^fc'), or nn.Module classes, "
                          f"or () for none") from None


def _entry_text(entry) -> str:
    if isinstance(entry, type):
        return f"{entry.__module__}.{entry.__qualname__}"
    return str(entry)


def resolve_entries(graph: DataflowGraph, entries: Iterable, arg: str) -> dict[str, str]:
    """Rule C4: the compute nodes ``keep_fp32`` / ``force_low`` entries select, node -> the
    entry that selected it (``arg`` names the argument in errors and warnings)."""
    entries = override_entries(entries, arg)
    selected: dict[str, str] = {}
    compute = [v for v in graph.vertices() if v.role == "compute"]
    for entry in entries:
        text = _entry_text(entry)
        if isinstance(entry, type):
            hits = [v.name for v in compute if v.module_type == text]
        elif not isinstance(entry, str):
            raise ConfigError(f"{arg} entries must be op kinds, node names, module-path globs, "
                              f"'re:<pattern>' regexes or nn.Module classes; got {entry!r} ({type(entry).__name__})")
        elif entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as exc:
                raise ConfigError(f"{arg} entry {text!r} is not a valid regular expression "
                                  f"({exc}); write re:<pattern>, e.g. 're:/attn/.*MatMul'") from None
            hits = [v.name for v in compute if pattern.search(v.name)]
            if not hits:
                # a pattern is a recipe too (shared across models): warn, as for a missing kind
                warnings.warn(f"{arg} entry {text!r} matches nothing in this model (no node name "
                              f"matches the pattern): ignored", UnusedOverrideWarning, stacklevel=3)
                continue
        elif entry.startswith("node:"):
            hits = [entry[5:]] if entry[5:] in graph and graph.vertex(entry[5:]).role == "compute" else []
        else:
            # kinds first: FX names the first node of a kind after it ("softmax"), and a user
            # writing "softmax" means all of them; "node:softmax" selects that one node
            hits = [v.name for v in compute if v.kind == entry]
            if not hits and entry in graph and graph.vertex(entry).role == "compute":
                hits = [entry]
            if not hits:
                hits = [v.name for v in compute if _path_matches(v.module_path, entry)]
        if not hits:
            if isinstance(entry, type) or entry in known_kinds():
                # a real kind or class this model happens not to use: a recipe shared across
                # models ("add", "layer_norm") must not fail on a model without one
                warnings.warn(f"{arg} entry {text!r} matches nothing in this model (it has no "
                              f"{'module of that class' if isinstance(entry, type) else 'op of that kind'}"
                              "): ignored", UnusedOverrideWarning, stacklevel=3)
                continue
            vocabulary = sorted({v.kind for v in compute} | {v.module_path for v in compute if v.module_path}
                                | {v.name for v in compute} | known_kinds())
            close = difflib.get_close_matches(text, vocabulary, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{arg} entry {text!r} matches no op kind, node name, module path "
                              f"or module class in this model.{hint} Run amp.report() to see "
                              f"the names.")
        for name in hits:
            selected.setdefault(name, text)
    return selected


@functools.cache
def known_kinds() -> frozenset[str]:
    """Every op kind the policy tables name (on any device, in either low dtype)."""
    return frozenset(k for dev in ("cuda", "cpu") for dt in (torch.float16, torch.bfloat16)
                     for k in policy_for(dev, dt).table)


def _path_matches(path: str, pattern: str) -> bool:
    """A module-path glob matches the module itself and everything below it."""
    if not path:
        return False
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
