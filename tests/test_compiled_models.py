"""``torch.compile(amp)`` on every model of the real-model suite (tiny configurations, default
dropout, the library's loss with labels): training and inference run compiled and give what the
converted module gives eagerly. ``aot_eager``: dynamo and AOT autograd as inductor sees them,
without generating kernels (a CPU test)."""

from __future__ import annotations

import pytest
import torch

import amp_compiler as ac
from amp_compiler.bench.real_models import SPECS, TINY_IMAGE, TINY_SEQ, make_batch, output_field


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("name", list(SPECS))
def test_compiled_conversion_matches_the_eager_one(name, mode):
    spec = SPECS[name]
    pytest.importorskip(spec.library, reason=f"{name} needs {spec.library}")
    train = mode == "train"
    torch.manual_seed(0)
    model = spec.build(True).train(train)
    size = TINY_SEQ if spec.text else TINY_IMAGE
    batch = make_batch(spec, model, 2, size, labels=train)
    amp = ac.convert(model, example_kwargs=batch, dtype=torch.bfloat16, training=train)
    compiled = torch.compile(amp, backend="aot_eager", dynamic=False)
    if train:
        runs = []
        for module in (compiled, amp):
            torch.manual_seed(1)  # the same dropout draws
            loss = output_field(module(**batch), "loss")
            loss.backward()
            runs.append((float(loss), _grads(model).clone()))
            model.zero_grad()
        (loss_c, grads_c), (loss_e, grads_e) = runs
        assert abs(loss_c / loss_e - 1) <= 1e-5
        assert float((grads_c - grads_e).norm() / grads_e.norm()) <= 4 * torch.finfo(torch.bfloat16).eps
    else:
        other = make_batch(spec, model, 3, size, labels=False, seed=2)  # a second shape
        with torch.no_grad():
            for b in (batch, other):
                got, want = output_field(compiled(**b), "logits"), output_field(amp(**b), "logits")
                assert got.shape == want.shape
                assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)
