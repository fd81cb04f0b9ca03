"""Rule L4 (loss_scaling): after ``loss.backward()`` on an fp16 training conversion, ``.grad``
holds the true gradient, as it does for bf16 and fp32.

The graph multiplies the loss gradient by the scale (L2) and divides it again where it leaves
the graph (L4), so everything a user does between backward and step sees true values: reading
``.grad``, ``clip_grad_norm_``, a plain ``optimizer.step()``, ``torch.autograd.grad``, several
backwards that accumulate. ``amp.scaler.step(opt)`` still skips a step whose gradients hold an
inf or NaN (from any micro-batch) and backs the scale off.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
import torch.nn.functional as F
from torch import nn

import amp_compiler as ac
from amp_compiler.models import build
from amp_compiler.models.data import batches, digits, token_stream
from amp_compiler.passes.graph import attribute

FP16 = torch.float16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _gpt2() -> tuple[nn.Module, dict]:
    """A Hugging Face GPT-2 from a default config (dropout, attention as configured), called
    as Trainer calls it: ``model(**batch)`` with labels, the library's own loss."""
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2,
                                           n_positions=64)).train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


def _autocast_grads(model: nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    """torch.autocast + GradScaler's gradients after ``unscale_``: the reference recipe."""
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=FP16):
        loss = loss_fn(ref)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    return _grads(ref)


def _seeded(fn, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks for every variant
    return fn()


def test_grads_after_backward_are_true_on_a_hugging_face_model():
    model, batch = _gpt2()
    ref = copy.deepcopy(model)
    amp = ac.convert(model, example_kwargs=batch, dtype=FP16)
    assert amp.scaler is not None and amp.scaler.unscaled_in_backward
    assert amp.scaler.get_scale() == 2.0**16  # the scale is large: a scaled .grad would show
    _seeded(lambda: amp(**batch).loss).backward()
    _seeded(lambda: ref(**batch).loss).backward()
    ours, fp32 = _grads(model), _grads(ref)
    auto = _autocast_grads(model, lambda m: _seeded(lambda: m(**batch).loss))
    assert set(ours) == set(fp32)
    whole = lambda g: torch.cat([t.flatten() for t in g.values()])  # noqa: E731
    err, auto_err = _rel(whole(ours), whole(fp32)), _rel(whole(auto), whole(fp32))
    print(f"gradient rel. error vs fp32: amp {err:.2e}, autocast+GradScaler {auto_err:.2e}")
    assert err <= 1.5 * auto_err + 1e-4
    # every parameter, not only in bulk: no tensor is off by the scale
    for name in fp32:
        assert _rel(ours[name], fp32[name]) < 0.1, name


def test_graph_divides_once_on_every_path_to_a_parameter():
    """L4's structure: every read of a trainable parameter and every input goes through one
    unscale_grads node (the inputs share one, each block's parameters share one), and nothing
    else reads them."""
    model, ex = build("gpt", "tiny", seed=0, with_targets=True)
    amp = ac.convert(model.train(), ex, dtype=FP16)
    gm = amp.graph_module
    trainable = {id(p) for p in gm.parameters() if p.requires_grad}
    params = [n for n in gm.graph.nodes
              if n.op == "get_attr" and id(attribute(gm, str(n.target))) in trainable]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert {id(attribute(gm, str(n.target))) for n in params} == trainable and len(inputs) == 2

    def group(node):
        (user,) = node.users
        assert getattr(user.target, "__name__", "") == "unscale_grads", node
        return user

    assert len({group(n) for n in inputs}) == 1
    by_block: dict[str, set] = {}
    for node in params:
        parts = str(node.target).split(".")
        block = parts[2] if parts[1] == "h" else None
        by_block.setdefault(block, set()).add(group(node))
    blocks = {b: g for b, g in by_block.items() if b is not None}
    assert len(blocks) == model.config.n_layer
    assert all(len(g) == 1 for g in blocks.values())  # a block's parameters: one node
    assert len(set().union(*blocks.values())) == model.config.n_layer  # a node per block


def test_bf16_and_fp32_grads_agree_with_fp16_grads():
    """The three dtypes leave gradients of the same magnitude (fp16 is not 65536x)."""
    model, ex = build("mlp", "tiny", seed=0, with_targets=True)
    norms = {}
    for dtype in (FP16, torch.bfloat16):
        m = copy.deepcopy(model).train()
        ac.convert(m, ex, dtype=dtype)(*ex).backward()
        norms[dtype] = torch.cat([p.grad.flatten() for p in m.parameters()]).norm()
    ref = copy.deepcopy(model).train()
    ref(*ex).backward()
    fp32 = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    for dtype, norm in norms.items():
        assert abs(float(norm / fp32) - 1) < 0.02, (dtype, float(norm), float(fp32))


def test_clip_grad_norm_sees_the_true_norm():
    model, batch = _gpt2()
    ref = copy.deepcopy(model)
    amp = ac.convert(model, example_kwargs=batch, dtype=FP16)
    _seeded(lambda: amp(**batch).loss).backward()
    _seeded(lambda: ref(**batch).loss).backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
    norm_ref = nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.5)
    assert abs(float(norm / norm_ref) - 1) < 2e-2, (float(norm), float(norm_ref))
    assert float(norm_ref) > 0.5  # the clip did act
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()])
    clipped_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert _rel(clipped, clipped_ref) < 2e-2
    assert abs(float(clipped.norm()) - 0.5) < 1e-3
    # GradScaler's recipe (unscale_ before clipping) still works: it only checks for infs now
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.scaler.unscale_(opt)
    assert _rel(torch.cat([p.grad.flatten() for p in model.parameters()]), clipped_ref) < 2e-2
    before = [p.detach().clone() for p in model.parameters()]
    amp.scaler.step(opt)
    amp.scaler.update()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert _rel(moved, -0.1 * clipped_ref) < 2e-2  # a step of the true, clipped gradient


def test_autograd_grad_returns_true_values():
    model, batch = _gpt2()
    ref = copy.deepcopy(model)
    amp = ac.convert(model, example_kwargs=batch, dtype=FP16)
    params, params_ref = list(model.parameters()), list(ref.parameters())
    ours = torch.autograd.grad(_seeded(lambda: amp(**batch).loss), params)
    theirs = torch.autograd.grad(_seeded(lambda: ref(**batch).loss), params_ref)
    assert _rel(torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in theirs])) < 2e-2
    assert all(p.grad is None for p in params)


def test_input_gradients_are_true():
    """An input that requires grad (a gradient penalty, an adversarial example) gets its true
    gradient too."""
    model, ex = build("mlp", "tiny", seed=0, with_targets=True)
    model.train()
    x, y = ex
    amp = ac.convert(model, (x, y), dtype=FP16)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(amp(xa, y), xa)
    (gr,) = torch.autograd.grad(copy.deepcopy(model)(xr, y), xr)
    xc = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=FP16):
        loss = copy.deepcopy(model)(xc, y)
    (gc,) = torch.autograd.grad(loss * 2.0**16, xc)  # GradScaler's recipe, by hand
    gc = gc / 2.0**16
    print(f"input gradient rel. error: amp {_rel(ga, gr):.2e}, autocast {_rel(gc, gr):.2e}")
    assert abs(float(ga.norm() / gr.norm()) - 1) < 1e-2  # true magnitude, not 65536x
    assert _rel(ga, gr) <= 1.5 * _rel(gc, gr) + 1e-3


class AutocastRecipe:
    """torch.autocast + GradScaler on a copy of the model: the recipe users know, and the
    yardstick of fp16 rounding (the gradients it leaves after ``unscale_`` are the ones fp16
    arithmetic can give)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).train()
        self.scaler = torch.amp.GradScaler("cpu")

    def backward(self, *inputs) -> torch.Tensor:
        with torch.autocast("cpu", dtype=FP16):
            loss = self.model(*inputs)
        self.scaler.scale(loss).backward()
        return loss


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def _sgd_run(variant: str, data, model: nn.Module, ex) -> tuple[list[float], nn.Module]:
    model = copy.deepcopy(model).train()
    run = ac.convert(model, ex, dtype=FP16) if variant == "amp" else model
    recipe = AutocastRecipe(model) if variant == "autocast" else None
    if recipe is not None:
        model = recipe.model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for xb, yb in data:
        if recipe is not None:
            loss = recipe.backward(xb, yb)
            recipe.scaler.step(opt)
            recipe.scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            continue
        loss = run(xb, yb)
        loss.backward()
        if variant == "amp":
            # step() skips a step with an inf or NaN and update() backs the scale off: what a
            # plain opt.step() cannot do (it would apply the inf)
            run.scaler.step(opt)
            run.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def test_sgd_200_steps_digits_mlp_parity():
    x_train, y_train, x_test, y_test = digits()
    model, _ = build("mlp", "tiny", seed=0)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(200):
        idx = torch.randint(0, len(x_train), (32,), generator=g)
        data.append((x_train[idx], y_train[idx]))
    accuracy = {}
    for variant in ("fp32", "amp", "autocast"):
        losses, trained = _sgd_run(variant, data, model, data[0])
        with torch.no_grad():
            accuracy[variant] = 100.0 * float((trained.eval()(x_test).argmax(-1) == y_test).float().mean())
        assert losses[0] - sum(losses[-20:]) / 20 > 1.0  # it learns
    print(f"digits mlp, SGD 200 steps, test accuracy %: {accuracy}")
    assert accuracy["fp32"] > 85.0
    # 200 steps leave some noise: amp is as close to fp32 as autocast + GradScaler is
    assert abs(accuracy["amp"] - accuracy["fp32"]) <= abs(accuracy["autocast"] - accuracy["fp32"]) + 1.0


def test_sgd_200_steps_tiny_gpt_parity():
    model, (idx, tgt) = build("gpt", "tiny", seed=0, with_targets=True)
    stream = token_stream(20_000, model.config.vocab_size, seed=0)
    data = list(batches(stream, batch=4, block=idx.shape[1], steps=200, seed=1))
    fp32, _ = _sgd_run("fp32", data, model, (idx, tgt))
    amp, _ = _sgd_run("amp", data, model, (idx, tgt))
    f, a = sum(fp32[-10:]) / 10, sum(amp[-10:]) / 10
    print(f"tiny gpt, SGD 200 steps: fp32 {f:.4f} amp fp16 {a:.4f}")
    assert fp32[0] - f > 0.5
    assert abs(a / f - 1) <= 0.02


def test_a_plain_optimizer_step_takes_the_true_step():
    """No scaler call at all: the step is the one autocast + GradScaler take after
    ``unscale_`` (the gradients are true); only overflow handling needs ``amp.scaler.step``."""
    model, ex = build("mlp", "tiny", seed=0, with_targets=True)
    model.train()
    start = _flat(model.parameters())
    recipe = AutocastRecipe(model)
    amp = ac.convert(model, ex, dtype=FP16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    amp(*ex).backward()
    opt.step()
    opt_ref = torch.optim.SGD(recipe.model.parameters(), lr=0.5)
    recipe.backward(*ex)
    recipe.scaler.unscale_(opt_ref)
    opt_ref.step()
    moved, moved_ref = _flat(model.parameters()) - start, _flat(recipe.model.parameters()) - start
    assert moved_ref.norm() > 0
    assert _rel(moved, moved_ref) < 5e-3


def test_accumulation_sums_true_gradients_and_an_overflow_in_micro_batch_two_skips():
    model, ex = build("mlp", "tiny", seed=0, with_targets=True)
    model.train()
    x, y = ex
    recipe = AutocastRecipe(model)
    amp = ac.convert(model, (x, y), dtype=FP16)
    halves = [(x[: len(x) // 2], y[: len(y) // 2]), (x[len(x) // 2:], y[len(y) // 2:])]
    # clean accumulation: two micro-batches, one step
    for xb, yb in halves:
        amp(xb, yb).backward()
        recipe.backward(xb, yb)
    recipe.scaler.unscale_(torch.optim.SGD(recipe.model.parameters(), lr=0.0))
    for (n, p), q in zip(model.named_parameters(), recipe.model.parameters()):
        assert _rel(p.grad, q.grad) < 5e-3, n
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp.scaler.step(opt)
    amp.scaler.update()
    assert amp.scaler.last_overflow == [] and amp.scaler.get_scale() == 2.0**16
    opt.zero_grad()
    # an overflow in the second micro-batch: fp16 cannot hold 1e6 (the input cast is inf)
    before = [p.detach().clone() for p in model.parameters()]
    amp(*halves[0]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    amp(halves[1][0] * 1e6, halves[1][1]).backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    amp.scaler.step(opt)
    amp.scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "step not skipped"
    assert amp.scaler.get_scale() == 2.0**15
    assert amp.scaler.last_overflow  # names the parameters
    assert set(amp.scaler.last_overflow) <= set(dict(model.named_parameters()))


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_adamw_fused_and_foreach_take_the_true_step_and_skip_overflows(fused):
    """A fused optimizer is handed no grad_scale to divide by (GradScaler hands it one while
    its gradients are still scaled): the step matches autocast + GradScaler's."""
    model, ex = build("mlp", "tiny", seed=0, with_targets=True)
    model.train()
    x, y = ex
    recipe = AutocastRecipe(model)
    amp = ac.convert(model, (x, y), dtype=FP16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=None if fused else True)
    opt_ref = torch.optim.AdamW(recipe.model.parameters(), lr=1e-2)
    for _ in range(3):
        amp(x, y).backward()
        amp.scaler.step(opt)
        amp.scaler.update()
        opt.zero_grad()
        recipe.backward(x, y)
        recipe.scaler.step(opt_ref)
        recipe.scaler.update()
        opt_ref.zero_grad()
    start = _flat(build("mlp", "tiny", seed=0)[0].parameters())
    moved, moved_ref = _flat(model.parameters()) - start, _flat(recipe.model.parameters()) - start
    assert moved_ref.norm() > 0 and _rel(moved, moved_ref) < 1e-2
    before = [p.detach().clone() for p in model.parameters()]
    amp(x * 1e6, y).backward()
    amp.scaler.step(opt)
    amp.scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert amp.scaler.get_scale() == 2.0**15


def test_logits_models_keep_the_grad_scaler_recipe():
    """L3: a graph that returns logits is not rewritten; scale(loss).backward() and unscale_
    divide by the scale, as GradScaler does."""
    model, ex = build("mlp", "tiny", seed=0)
    model.train()
    (x,) = ex

    class Logits(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inp):
            return self.net(inp)

    wrapped = Logits(model.net)
    ref = copy.deepcopy(wrapped)
    amp = ac.convert(wrapped, (x,), dtype=FP16)
    assert not amp.scaler.unscaled_in_backward
    assert "unscale_grads" not in amp.graph_module.code
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)
    amp.scaler.scale(amp(x).float().pow(2).mean()).backward()
    amp.scaler.unscale_(opt)
    ref(x).pow(2).mean().backward()
    ours, fp32 = _flat(p.grad for p in wrapped.parameters()), _flat(q.grad for q in ref.parameters())
    assert abs(float(ours.norm() / fp32.norm()) - 1) < 1e-2  # unscaled, once
    assert _rel(ours, fp32) < 5e-2


def test_a_leaf_module_gets_true_gradients_too():
    """fx leaves nn.BatchNorm1d whole: its parameters are divided inside ``module_unscaled``."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.head = nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x, y):
            return F.cross_entropy(self.head(torch.relu(self.bn(self.fc(x)))), y)

    model = Net().train()
    ref = copy.deepcopy(model)
    amp = ac.convert(model, dtype=FP16)  # fx capture
    assert "module_unscaled" in amp.graph_module.code
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    amp(x, y).backward()
    ref(x, y).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert _rel(p.grad, q.grad) < 1e-2, name
