"""Deep copies of captured graphs: ``copy.deepcopy`` that also works on torch.export graphs.

torch.export leaves fake tensors and symbolic sizes in node metadata (``node.meta["val"]``);
they belong to the capture's fake mode and cannot be deep-copied. They describe shapes and
dtypes, which a copy has too, so a copy shares them: ``share_fake_meta`` pre-fills the
deepcopy memo with them. torch's own pytree specs warn about themselves when copied (a
LeafSpec deprecation); ``quiet_spec_warnings`` silences that one warning.

    >>> gm2 = copy_graph_module(gm)      # parameters and graph copied, fake metadata shared
    >>> memo = {}; share_fake_meta(gm, memo)
    >>> with quiet_spec_warnings():
    ...     other = copy.deepcopy(module_holding_gm, memo)
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor) or type(t).__name__ == "FunctionalTensor"


def share_fake_meta(gm: fx.GraphModule, memo: dict) -> None:
    """Pre-fill a deepcopy memo so the fake tensors and symbols in node metadata are shared."""
    for node in gm.graph.nodes:
        for leaf in torch.utils._pytree.tree_leaves(dict(node.meta)):
            if isinstance(leaf, (torch.SymInt, torch.SymFloat)) or (
                    isinstance(leaf, torch.Tensor) and _is_fake(leaf)):
                memo[id(leaf)] = leaf


@contextlib.contextmanager
def quiet_spec_warnings() -> Iterator[None]:
    """torch's own pytree specs warn about themselves (a LeafSpec deprecation) when copied."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """``copy.deepcopy(gm)`` that also works on torch.export graphs (fake metadata shared)."""
    memo: dict = {}
    share_fake_meta(gm, memo)
    with quiet_spec_warnings():
        return copy.deepcopy(gm, memo)
