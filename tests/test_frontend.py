"""Front end (amp_compiler/capture/): what capture hands the passes: torch.export's
``dynamic_shapes`` follow forward's signature (``*args``, keywords); module paths are the user's.
functionalize and the autograd.Function capture have their own test files.

    pytest tests/test_frontend.py
"""

from __future__ import annotations

import torch
from torch import nn

import amp_compiler as ac
from amp_compiler.capture.shapes import default_dynamic_shapes

from conftest import EPS, rel_err

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


# -- torch.export's dynamic_shapes --------------------------------------------------------------

class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, *rest, scale: float = 1.0):
        return self.fc(x) * scale + sum(rest)


def test_dynamic_shapes_group_var_positional_inputs():
    auto = torch.export.Dim.AUTO
    y, z = torch.randn(3, 8), torch.randn(3, 8)
    every = {0: auto, 1: auto}
    assert default_dynamic_shapes(_Mixed().forward, (X, y, z), {}) == {"x": every, "rest": (every, every)}
    assert default_dynamic_shapes(_Mixed().forward, (X,), {"scale": 2.0}) == {"x": every, "scale": None}
    model = _Mixed().eval()
    amp = ac.convert(model, (X, y, z), dtype="bfloat16")
    x5, y5, z5 = (torch.randn(5, 8) for _ in range(3))  # the batch stays dynamic
    with torch.no_grad():
        assert rel_err(amp(x5, y5, z5), model(x5, y5, z5)) < 8 * EPS[torch.bfloat16]


def test_export_internal_submodules_are_not_module_paths():
    """torch.export's own `_guards_fn` / metadata-hook names never show up as a module path."""
    from amp_compiler.models import build

    model, inputs = build("gpt", "tiny")
    amp = ac.convert(model.eval(), inputs, dtype="bfloat16")
    paths = {amp._dataflow.vertex(n).module_path for n in amp._dataflow}
    assert not {p for p in paths if p.split(".")[0] in ("_guards_fn", "_empty_nn_module_stack_from_metadata_hook")}
    assert "transformer.h.0.attn" in paths  # the user's own paths are still there
