"""Tests of amp_compiler.scaler: GradScaler compatibility, overflow handling, in-graph scaling."""

from __future__ import annotations

import copy
import inspect
import math
import multiprocessing
import os
import pickle
import socket
from typing import Any, Callable

import pytest
import torch
from torch import nn

from amp_compiler.errors import AmpCompilerError, LossScalerError
from amp_compiler.scaler import LossScaler, scale_loss_grad

INF = float("inf")
NAN = float("nan")


# --------------------------------------------------------------------------- helpers


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def make_batches(n: int, seed: int = 1, target_scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g) * target_scale)
        for _ in range(n)
    ]


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd_momentum":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "adam_fused":
        return torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    raise AssertionError(kind)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def poison(model: nn.Module, values: dict[str, float]) -> None:
    """Write a non-finite value into one element of each named parameter's gradient."""
    params = dict(model.named_parameters())
    for name, value in values.items():
        params[name].grad.view(-1)[0] = value


def clone_state(model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    return copy.deepcopy(({k: v.detach() for k, v in model.state_dict().items()}, opt.state_dict()))


def assert_bitwise_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def params_equal(m1: nn.Module, m2: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def fp16_train(
    scaler: torch.amp.GradScaler,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[torch.Tensor], list[float]]:
    """fp16 autocast training; the large targets make scaled fp16 gradients overflow now and then."""
    losses, scales = [], []
    for x, y in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach().clone())
        scales.append(scaler.get_scale())
    return losses, scales


# --------------------------------------------------------------------------- GradScaler compatibility


def test_defaults_signature_and_state_dict_keys_match_gradscaler() -> None:
    ours, theirs = LossScaler("cpu"), torch.amp.GradScaler("cpu")
    assert isinstance(ours, torch.amp.GradScaler)
    assert ours.state_dict() == theirs.state_dict()
    for getter in ("get_scale", "get_growth_factor", "get_backoff_factor", "get_growth_interval", "is_enabled"):
        assert getattr(ours, getter)() == getattr(theirs, getter)(), getter
    assert (ours.min_scale, ours.max_scale) == (1.0, 2.0**24)

    sig_ours = inspect.signature(LossScaler.__init__).parameters
    sig_theirs = inspect.signature(torch.amp.GradScaler.__init__).parameters
    for name, param in sig_theirs.items():
        assert name in sig_ours, name
        if name not in ("self", "device"):
            assert sig_ours[name].default == param.default, name
            assert sig_ours[name].kind == param.kind, name
    assert sig_ours["min_scale"].kind is inspect.Parameter.KEYWORD_ONLY

    # Keys stay GradScaler's once the scale exists and after an update.
    model, x, y = make_model(), *make_batches(1)[0]
    for scaler in (ours, theirs):
        opt = make_optimizer("sgd_momentum", model)
        scaler.scale(loss_fn(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.state_dict() == theirs.state_dict()


def test_default_device_is_cuda_only_when_available() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    scaler = LossScaler()
    assert scaler.is_enabled()
    assert scaler.scale_tensor().device.type == expected


def test_state_dict_round_trip_through_gradscaler() -> None:
    model = make_model()
    opt = make_optimizer("sgd_momentum", model)
    scaler = LossScaler("cpu", init_scale=2.0**10, growth_factor=4.0, backoff_factor=0.25, growth_interval=5)
    batches = make_batches(4)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if step == 0:
            poison(model, {"0.weight": INF})
        scaler.step(opt)
        scaler.update()
    # One backoff then three clean steps: neither the scale nor the tracker is a default.
    sd = scaler.state_dict()
    assert sd["scale"] == 2.0**8 and sd["_growth_tracker"] == 3

    grad_scaler = torch.amp.GradScaler("cpu")
    grad_scaler.load_state_dict(sd)
    assert grad_scaler.state_dict() == sd

    fresh = LossScaler("cpu")
    held = fresh.scale_tensor()  # a graph already holds the scale before the checkpoint arrives
    fresh.load_state_dict(grad_scaler.state_dict())
    assert fresh.state_dict() == sd
    assert fresh.scale_tensor() is held and held.item() == 2.0**8

    # A GradScaler that has been used (scale tensor created) loads a LossScaler checkpoint too.
    used = torch.amp.GradScaler("cpu")
    used.scale(torch.ones(()))
    used.load_state_dict(fresh.state_dict())
    assert used.state_dict() == sd

    # Pickling/deepcopy keeps the state (GradScaler supports it between iterations).
    assert pickle.loads(pickle.dumps(fresh)).state_dict() == sd
    assert copy.deepcopy(fresh).state_dict() == sd


def test_load_state_dict_clamps_to_bounds() -> None:
    scaler = LossScaler("cpu", min_scale=4.0, max_scale=2.0**10)
    held = scaler.scale_tensor()
    scaler.load_state_dict({**torch.amp.GradScaler("cpu").state_dict(), "scale": 2.0**20})
    assert held.item() == 2.0**10 and scaler.get_scale() == 2.0**10
    scaler.load_state_dict({**torch.amp.GradScaler("cpu").state_dict(), "scale": 0.5})
    assert held.item() == 4.0
    unborn = LossScaler("cpu", max_scale=2.0**10)
    unborn.load_state_dict({**torch.amp.GradScaler("cpu").state_dict(), "scale": 2.0**20})
    assert unborn.get_scale() == 2.0**10 and unborn.scale_tensor().item() == 2.0**10


def test_invalid_bounds_raise() -> None:
    with pytest.raises(LossScalerError, match="min_scale must be > 0"):
        LossScaler("cpu", min_scale=0.0)
    with pytest.raises(LossScalerError, match="must not exceed max_scale"):
        LossScaler("cpu", min_scale=8.0, max_scale=4.0)
    assert issubclass(LossScalerError, AmpCompilerError)


# --------------------------------------------------------------------------- fault injection


@pytest.mark.parametrize("opt_kind", ["sgd_momentum", "adam"])
def test_overflow_steps_are_skipped_and_named(opt_kind: str) -> None:
    model = make_model()
    opt = make_optimizer(opt_kind, model)
    scaler = LossScaler("cpu", init_scale=2.0**12, growth_interval=1000).track(model.named_parameters())
    batches = make_batches(9)
    # step -> gradient poison (None: a poisoned batch, which reaches every parameter)
    faults: dict[int, dict[str, float] | None] = {
        2: {"0.weight": INF, "4.bias": INF},
        5: {"2.weight": NAN},
        6: {"0.bias": -INF, "2.bias": NAN},
        7: None,
    }
    all_names = [name for name, _ in model.named_parameters()]
    expected_scale = 2.0**12
    skipped = 0
    for step, (x, y) in enumerate(batches):
        if faults.get(step, {}) is None:
            x = x.clone()
            x[0, 0] = NAN
        before = clone_state(model, opt)
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if faults.get(step):
            poison(model, faults[step])
        scaler.step(opt)
        scaler.update()
        after = clone_state(model, opt)
        if step in faults:
            skipped += 1
            expected_scale /= 2
            assert_bitwise_equal(before, after)  # every parameter and optimizer-state bit
            expected = all_names if faults[step] is None else sorted(faults[step])
            assert sorted(scaler.last_overflow) == sorted(expected)
        else:
            assert not torch.equal(before[0]["0.weight"], after[0]["0.weight"])
            assert scaler.last_overflow == []
        assert scaler.get_scale() == expected_scale
    assert skipped == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_overflow_names_fall_back_to_optimizer_positions() -> None:
    model = make_model()
    opt = torch.optim.SGD(
        [{"params": list(model[0].parameters())}, {"params": list(model[4].parameters()), "lr": 0.1}], lr=0.05
    )
    scaler = LossScaler("cpu")
    x, y = make_batches(1)[0]
    scaler.scale(loss_fn(model, x, y)).backward()
    poison(model, {"0.bias": INF, "4.weight": NAN})
    scaler.step(opt)
    scaler.update()
    # Flat positions across param groups: 0.weight, 0.bias, 4.weight, 4.bias.
    assert scaler.last_overflow == ["param[1]", "param[2]"]


def test_growth_after_interval_clean_steps() -> None:
    model = make_model()
    opt = make_optimizer("sgd_momentum", model)
    scaler = LossScaler("cpu", init_scale=2.0**10, growth_interval=3)
    scales = []
    for step, (x, y) in enumerate(make_batches(8)):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if step == 4:
            poison(model, {"2.weight": INF})
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    # Doubles after 3 clean steps; an overflow halves it and restarts the count.
    assert scales == [2.0**10, 2.0**10, 2.0**11, 2.0**11, 2.0**10, 2.0**10, 2.0**10, 2.0**11]


def test_min_scale_floor_under_repeated_overflows() -> None:
    model = make_model()
    opt = make_optimizer("adam", model)
    scaler = LossScaler("cpu", init_scale=2.0**4, min_scale=2.0, growth_interval=3)
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=3)
    held = scaler.scale_tensor()
    scales, reference_scales = [], []
    for x, y in make_batches(8):
        for s in (scaler, reference):
            opt.zero_grad()
            s.scale(loss_fn(model, x, y)).backward()
            poison(model, {"0.weight": NAN})
            s.step(opt)
            s.update()
        scales.append(scaler.get_scale())
        reference_scales.append(reference.get_scale())
    assert scales == [8.0, 4.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert min(reference_scales) < 2.0  # GradScaler alone would have gone below the floor
    assert scaler.scale_tensor() is held


def test_max_scale_ceiling() -> None:
    model = make_model()
    opt = make_optimizer("sgd_momentum", model)
    scaler = LossScaler("cpu", init_scale=2.0**3, max_scale=2.0**5, growth_interval=1)
    held = scaler.scale_tensor()
    scales = []
    for x, y in make_batches(5):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales == [16.0, 32.0, 32.0, 32.0, 32.0]
    assert scaler.scale_tensor() is held


def test_explicit_update_scale_is_clamped_in_place() -> None:
    scaler = LossScaler("cpu", min_scale=2.0, max_scale=2.0**20)
    held = scaler.scale_tensor()
    scaler.update(2.0**30)
    assert held.item() == 2.0**20
    scaler.update(torch.tensor(0.25))
    assert held.item() == 2.0
    scaler.update(64)
    assert held.item() == 64.0
    assert scaler.scale_tensor() is held


# --------------------------------------------------------------------------- identical trajectories


def test_identical_trajectory_to_gradscaler_with_natural_fp16_overflows() -> None:
    batches = make_batches(16, target_scale=4.0)
    runs = []
    for cls in (torch.amp.GradScaler, LossScaler):
        model = make_model()
        opt = make_optimizer("adam", model)
        scaler = cls("cpu", init_scale=2.0**14, growth_interval=3)
        losses, scales = fp16_train(scaler, model, opt, batches)
        runs.append((model, opt, losses, scales))
    (m_ref, o_ref, l_ref, s_ref), (m_our, o_our, l_our, s_our) = runs
    # The run must exercise both growth and backoff, or the comparison proves little.
    assert any(b > a for a, b in zip(s_ref, s_ref[1:])) and any(b < a for a, b in zip(s_ref, s_ref[1:]))
    assert s_our == s_ref
    assert_bitwise_equal(l_our, l_ref)
    assert_bitwise_equal(clone_state(m_our, o_our), clone_state(m_ref, o_ref))


def test_resume_from_state_dict_reproduces_trajectory() -> None:
    batches = make_batches(16, target_scale=4.0)
    k = 7

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, LossScaler]:
        model = make_model()
        return model, make_optimizer("adam", model), LossScaler("cpu", init_scale=2.0**14, growth_interval=3)

    model, opt, scaler = fresh()
    fp16_train(scaler, model, opt, batches[:k])
    checkpoint = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}
    )
    assert checkpoint["scaler"]["_growth_tracker"] != 0
    expected_losses, _ = fp16_train(scaler, model, opt, batches[k:])

    model2, opt2, scaler2 = fresh()
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    scaler2.load_state_dict(checkpoint["scaler"])
    resumed_losses, _ = fp16_train(scaler2, model2, opt2, batches[k:])
    assert_bitwise_equal(resumed_losses, expected_losses)
    assert params_equal(model2, model)

    # Control: without the scaler's state the run diverges, so the check above has teeth.
    model3, opt3, scaler3 = fresh()
    model3.load_state_dict(checkpoint["model"])
    opt3.load_state_dict(checkpoint["opt"])
    other_losses, _ = fp16_train(scaler3, model3, opt3, batches[k:])
    assert any(not torch.equal(a, b) for a, b in zip(other_losses, expected_losses))


class _InGraphScaled(nn.Module):
    """What the AMP pass produces: the graph multiplies its own loss gradient by the scale."""

    def __init__(self, model: nn.Module, scale: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self._amp_loss_scale = scale  # a plain attribute, like the pass installs it

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scale_loss_grad(loss_fn(self.model, x, y), self._amp_loss_scale)


@pytest.mark.parametrize("opt_kind", ["sgd_momentum", "adam_fused"])
def test_in_graph_scaling_matches_gradscaler_without_scale_calls(opt_kind: str) -> None:
    batches = make_batches(8)
    poisoned_step = 3

    model_ref = make_model()
    opt_ref = make_optimizer(opt_kind, model_ref)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    ref_losses = []
    for step, (x, y) in enumerate(batches):
        opt_ref.zero_grad()
        loss = loss_fn(model_ref, x, y)
        ref.scale(loss).backward()
        if step == poisoned_step:
            poison(model_ref, {"2.bias": INF})
        ref.unscale_(opt_ref)
        ref.step(opt_ref)
        ref.update()
        ref_losses.append(loss.detach())

    model = make_model()
    opt = make_optimizer(opt_kind, model)
    scaler = LossScaler("cpu", init_scale=2.0**8, growth_interval=2).track(model.named_parameters())
    graph = _InGraphScaled(model, scaler.scale_tensor())
    losses = []
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = graph(x, y)  # the true loss: no scaler.scale() anywhere in this loop
        loss.backward()
        if step == poisoned_step:
            poison(model, {"2.bias": INF})
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach())
        assert scaler.last_overflow == (["2.bias"] if step == poisoned_step else [])
    assert_bitwise_equal(losses, ref_losses)
    assert params_equal(model, model_ref)
    assert scaler.get_scale() == ref.get_scale() and graph._amp_loss_scale is scaler.scale_tensor()


def test_step_before_any_scale_raises() -> None:
    model = make_model()
    opt = make_optimizer("sgd_momentum", model)
    x, y = make_batches(1)[0]
    loss_fn(model, x, y).backward()
    scaler = LossScaler("cpu")
    for call in (lambda: scaler.step(opt), lambda: scaler.unscale_(opt), lambda: scaler.update()):
        with pytest.raises(LossScalerError, match="scale_tensor"):
            call()


# --------------------------------------------------------------------------- scale_loss_grad


def test_scale_loss_grad_forward_is_loss_and_backward_is_scaled() -> None:
    x, y = make_batches(1)[0]
    scaler = LossScaler("cpu", init_scale=2.0**5)
    scale = scaler.scale_tensor()
    assert scaler.scale_tensor() is scale

    model = make_model()
    plain = loss_fn(model, x, y)
    unscaled = torch.autograd.grad(plain, list(model.parameters()))
    out = scale_loss_grad(loss_fn(model, x, y), scale)
    assert torch.equal(out, plain)
    scaled = torch.autograd.grad(out, list(model.parameters()))
    for g, u in zip(scaled, unscaled):
        assert torch.equal(g, u * 2.0**5)

    # The scale is read at backward time: an update() between forward and backward (in place,
    # same tensor) is used and does not trip autograd's saved-tensor version check.
    out = scale_loss_grad(loss_fn(model, x, y), scale)
    scaler.update(2.0**9)
    assert scaler.scale_tensor() is scale
    scaled = torch.autograd.grad(out, list(model.parameters()))
    for g, u in zip(scaled, unscaled):
        assert torch.equal(g, u * 2.0**9)


def test_scale_loss_grad_supports_double_backward() -> None:
    # The gradient-penalty recipe differentiates through the scaled gradients.
    w = torch.tensor([1.5, -2.0], requires_grad=True)
    scale = torch.tensor(8.0)
    (g,) = torch.autograd.grad(scale_loss_grad((w**3).sum(), scale), w, create_graph=True)
    assert torch.equal(g.detach(), 8.0 * 3 * w.detach() ** 2)
    (gg,) = torch.autograd.grad(g.sum(), w)
    assert torch.equal(gg, 8.0 * 6 * w.detach())


def test_scale_loss_grad_under_torch_compile_without_graph_breaks_or_recompiles() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    x, y = make_batches(1)[0]
    model = make_model()
    scaler = LossScaler("cpu", init_scale=2.0**6)
    graph = _InGraphScaled(model, scaler.scale_tensor())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(graph, backend=counter, fullgraph=True)

    unscaled = torch.autograd.grad(loss_fn(model, x, y), list(model.parameters()))
    for scale in (2.0**6, 2.0**3, 2.0**11):
        scaler.update(scale)
        loss = compiled(x, y)
        assert torch.equal(loss, loss_fn(model, x, y))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for g, u in zip(grads, unscaled):
            torch.testing.assert_close(g, u * scale, rtol=1e-6, atol=0)
    assert counter.frame_count == 1  # one graph, no break, no recompile when the scale changes
    torch._dynamo.reset()


def test_scale_loss_grad_stays_one_node_under_fx_tracing() -> None:
    x, y = make_batches(1)[0]
    scale = torch.tensor(16.0)
    graph = _InGraphScaled(make_model(), scale)
    gm = torch.fx.symbolic_trace(graph)
    gm = torch.fx.symbolic_trace(gm)  # re-tracing the generated code keeps the leaf too
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(scale_loss_grad) == 1
    loss = gm(x, y)
    grads = torch.autograd.grad(loss, list(graph.model.parameters()))
    unscaled = torch.autograd.grad(loss_fn(graph.model, x, y), list(graph.model.parameters()))
    assert all(torch.equal(g, u * 16.0) for g, u in zip(grads, unscaled))


# --------------------------------------------------------------------------- GradScaler doc recipes


def _run_recipe(cls: type, recipe: Callable[..., Any]) -> tuple[nn.Module, Any]:
    model = make_model()
    scaler = cls("cpu", init_scale=2.0**10, growth_interval=2)
    return model, recipe(scaler, model, make_batches(18))


def _clipping(scaler: torch.amp.GradScaler, model: nn.Module, batches: list) -> Any:
    opt = make_optimizer("adam", model)
    norms = []
    for step, (x, y) in enumerate(batches[:6]):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if step == 2:
            poison(model, {"4.weight": INF})
        scaler.unscale_(opt)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1))
        scaler.step(opt)
        scaler.update()
    return opt.state_dict(), norms, scaler.get_scale()


def _accumulation(scaler: torch.amp.GradScaler, model: nn.Module, batches: list) -> Any:
    opt = make_optimizer("sgd_momentum", model)
    accumulate = 3
    for i, (x, y) in enumerate(batches):
        loss = loss_fn(model, x, y) / accumulate
        scaler.scale(loss).backward()
        if i == 7:  # a micro-batch of the third optimizer step overflows
            poison(model, {"0.weight": NAN})
        if (i + 1) % accumulate == 0:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    return opt.state_dict(), scaler.get_scale()


def _two_optimizers(scaler: torch.amp.GradScaler, model: nn.Module, batches: list) -> Any:
    opt0 = torch.optim.SGD(list(model[0].parameters()) + list(model[2].parameters()), lr=0.05, momentum=0.9)
    opt1 = torch.optim.Adam(model[4].parameters(), lr=1e-2)
    for step, (x, y) in enumerate(batches[:6]):
        opt0.zero_grad()
        opt1.zero_grad()
        out = model(x)
        loss0 = nn.functional.mse_loss(out, y)
        loss1 = out.abs().mean()
        scaler.scale(loss0).backward(retain_graph=True)
        scaler.scale(loss1).backward()
        if step == 3:
            poison(model, {"4.bias": INF})  # only opt1 skips; opt0 still steps
        scaler.unscale_(opt0)
        scaler.step(opt0)
        scaler.step(opt1)
        scaler.update()
    return opt0.state_dict(), opt1.state_dict(), scaler.get_scale()


@pytest.mark.parametrize("recipe", [_clipping, _accumulation, _two_optimizers])
def test_gradscaler_doc_recipes_match_bit_for_bit(recipe: Callable[..., Any]) -> None:
    ref_model, ref_state = _run_recipe(torch.amp.GradScaler, recipe)
    model, state = _run_recipe(LossScaler, recipe)
    assert_bitwise_equal(state, ref_state)
    assert params_equal(model, ref_model)
    # 6 optimizer steps with growth every 2 and one injected overflow at the 3rd or 4th step end at
    # 2**11 (2**13 had nothing overflowed): the fault really went through the scaler.
    assert state[-1] == 2.0**11


def test_two_optimizers_overflow_names_only_the_skipping_optimizer() -> None:
    model = make_model()
    scaler = LossScaler("cpu").track(model)
    opt0 = torch.optim.SGD(model[0].parameters(), lr=0.05)
    opt1 = torch.optim.SGD(list(model[2].parameters()) + list(model[4].parameters()), lr=0.05)
    x, y = make_batches(1)[0]
    scaler.scale(loss_fn(model, x, y)).backward()
    poison(model, {"2.weight": INF})
    before0 = model[0].weight.detach().clone()
    before1 = model[2].weight.detach().clone()
    scaler.step(opt0)
    scaler.step(opt1)
    scaler.update()
    assert not torch.equal(model[0].weight, before0) and torch.equal(model[2].weight, before1)
    assert scaler.last_overflow == ["2.weight"]


# --------------------------------------------------------------------------- fp16 master weights


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_raise_named_error(dtype: torch.dtype) -> None:
    model = make_model().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_batches(1)[0]
    dtype_name = str(dtype).removeprefix("torch.")
    for tracked, name in ((True, "0.weight"), (False, "param[0]")):
        scaler = LossScaler("cpu")
        if tracked:
            scaler.track(model.named_parameters())
        opt.zero_grad()
        scaler.scale(loss_fn(model, x.to(dtype), y.to(dtype)).float()).backward()
        for call in (scaler.unscale_, scaler.step):
            with pytest.raises(LossScalerError) as info:
                call(opt)
            assert not isinstance(info.value, ValueError)
            message = str(info.value)
            assert f"parameter '{name}' is {dtype_name}" in message
            assert "fp32 master weights" in message and "amp_compiler.convert(model)" in message


def test_frozen_low_precision_parameter_is_allowed() -> None:
    model = make_model()
    frozen = nn.Parameter(torch.ones(3, dtype=torch.float16), requires_grad=False)
    opt = torch.optim.SGD([*model.parameters(), frozen], lr=0.1)
    scaler = LossScaler("cpu")
    x, y = make_batches(1)[0]
    scaler.scale(loss_fn(model, x, y)).backward()
    before = model[0].weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(before, model[0].weight)


# --------------------------------------------------------------------------- fused optimizer path


def _fused_adam_available_on_cpu() -> bool:
    try:
        opt = torch.optim.Adam([nn.Parameter(torch.zeros(2))], fused=True)
        return bool(getattr(opt, "_step_supports_amp_scaling", False))
    except (RuntimeError, ValueError):
        return False


@pytest.mark.skipif(not _fused_adam_available_on_cpu(), reason="fused Adam not available on CPU")
def test_fused_adam_matches_gradscaler_and_step_has_no_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    batches = make_batches(7)
    poisoned = {3: {"0.weight": INF, "2.bias": NAN}}
    results = []
    for cls in (torch.amp.GradScaler, LossScaler):
        model = make_model()
        opt = make_optimizer("adam_fused", model)
        assert opt._step_supports_amp_scaling
        scaler = cls("cpu", init_scale=2.0**10, growth_interval=2)
        if isinstance(scaler, LossScaler):
            scaler.track(model)
        overflow_log, skipped = [], []
        for step, (x, y) in enumerate(batches):
            before = clone_state(model, opt)
            opt.zero_grad()
            scaler.scale(loss_fn(model, x, y)).backward()
            if step in poisoned:
                poison(model, poisoned[step])
            if isinstance(scaler, LossScaler):
                # The fused path hands found_inf to the optimizer: nothing may be read on the host.
                with monkeypatch.context() as m:
                    for attr in ("item", "tolist", "__bool__", "__float__"):
                        m.setattr(torch.Tensor, attr, _forbidden_sync)
                    scaler.step(opt)
            else:
                scaler.step(opt)
            scaler.update()
            skipped.append(_tensors_all_equal(before, clone_state(model, opt)))
            if isinstance(scaler, LossScaler):
                opt.zero_grad()  # names must survive zero_grad on CPU (resolved at update())
                overflow_log.append(sorted(scaler.last_overflow))
        results.append((model, opt, scaler.get_scale(), skipped, overflow_log))
    (m_ref, o_ref, s_ref, skip_ref, _), (m_our, o_our, s_our, skip_our, log) = results
    assert skip_ref == skip_our == [step in poisoned for step in range(len(batches))]
    assert s_our == s_ref
    assert_bitwise_equal(clone_state(m_our, o_our), clone_state(m_ref, o_ref))
    assert log == [sorted(poisoned[s]) if s in poisoned else [] for s in range(len(batches))]


def _forbidden_sync(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("host read of a tensor on the fused-optimizer step path")


def _tensors_all_equal(a: Any, b: Any) -> bool:
    try:
        assert_bitwise_equal(a, b)
        return True
    except AssertionError:
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_adam_step_and_update_do_not_sync() -> None:
    torch.manual_seed(0)
    model = make_model().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = LossScaler("cuda", init_scale=2.0**10).track(model)
    graph = _InGraphScaled(model, scaler.scale_tensor())
    assert graph._amp_loss_scale.is_cuda
    torch.cuda.set_sync_debug_mode("error")
    try:  # control: the debug mode does catch a host read, so the checks below have teeth
        with pytest.raises(RuntimeError):
            graph._amp_loss_scale.item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for step, (x, y) in enumerate(make_batches(4)):
        x, y = x.cuda(), y.cuda()
        opt.zero_grad()
        graph(x, y).backward()
        if step == 2:
            poison(model, {"4.weight": INF})
        before = model[4].weight.detach().clone()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert scaler.last_overflow == (["4.weight"] if step == 2 else [])
        assert torch.equal(before, model[4].weight) == (step == 2)
    assert scaler.get_scale() == 2.0**9


# --------------------------------------------------------------------------- disabled mode


def test_disabled_is_a_pass_through() -> None:
    model = make_model()
    opt = make_optimizer("sgd_momentum", model)
    scaler = LossScaler("cpu", enabled=False)
    assert not scaler.is_enabled() and scaler.state_dict() == {} and scaler.get_scale() == 1.0
    unit = scaler.scale_tensor()
    assert unit.item() == 1.0 and scaler.scale_tensor() is unit
    x, y = make_batches(1)[0]
    loss = loss_fn(model, x, y)
    assert scaler.scale(loss) is loss
    scale_loss_grad(loss, unit).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = model[0].weight.detach().clone()
    scaler.unscale_(opt)  # no-op: gradients untouched
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(before, model[0].weight) and scaler.last_overflow == []


# --------------------------------------------------------------------------- torch.distributed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_case(
    rank: int, scaler: torch.amp.GradScaler, poison_step: int, where: str, fused: bool = False
) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(seed=0))  # same initial weights on every rank
    if isinstance(scaler, LossScaler):
        scaler.track(model)
    if fused:
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    skipped, overflow = [], []
    for step, (x, y) in enumerate(make_batches(5, seed=100 + rank)):  # each rank its own data
        if where == "batch" and step == poison_step and rank == 1:
            x = x.clone()
            x[0, 0] = INF
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()  # DDP all-reduces gradients here
        if where == "grad" and step == poison_step and rank == 1:
            model.module[0].weight.grad.view(-1)[0] = INF  # after the all-reduce: rank 1 only
        scaler.step(opt)
        scaler.update()
        skipped.append(all(torch.equal(b, p) for b, p in zip(before, model.parameters())))
        overflow.append(scaler.last_overflow if isinstance(scaler, LossScaler) else None)
    return {
        "skipped": skipped,
        "scale": scaler.get_scale(),
        "overflow": overflow,
        "params": [p.detach().clone() for p in model.parameters()],
    }


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {
            "batch": _ddp_case(rank, LossScaler("cpu", init_scale=2.0**10), 2, "batch"),
            "grad": _ddp_case(rank, LossScaler("cpu", init_scale=2.0**10), 3, "grad"),
            "grad_plain_gradscaler": _ddp_case(rank, torch.amp.GradScaler("cpu", init_scale=2.0**10), 3, "grad"),
        }
        if _fused_adam_available_on_cpu():
            # Both ranks overflow: fused kernels skip only when found_inf == 1, so the flags must
            # be combined with MAX (a SUM would hand them 2 and corrupt the parameters).
            results["batch_fused"] = _ddp_case(rank, LossScaler("cpu", init_scale=2.0**10), 2, "batch", fused=True)
            results["grad_fused"] = _ddp_case(rank, LossScaler("cpu", init_scale=2.0**10), 3, "grad", fused=True)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_skip_the_same_steps(tmp_path: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(rank, 2, port, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    cases = [("batch", 2), ("grad", 3)]
    if _fused_adam_available_on_cpu():
        cases += [("batch_fused", 2), ("grad_fused", 3)]
    for case, step in cases:
        expected = [s == step for s in range(5)]
        assert r0[case]["skipped"] == expected == r1[case]["skipped"], case
        assert r0[case]["scale"] == r1[case]["scale"] == 2.0**9, case
        assert all(torch.equal(a, b) for a, b in zip(r0[case]["params"], r1[case]["params"])), case
        assert all(torch.isfinite(p).all() for p in r0[case]["params"]), case
    # Rank 1 names its poisoned gradient; rank 0 skipped only because rank 1 overflowed.
    for case in [c for c, step in cases if step == 3]:
        assert r1[case]["overflow"][3] == ["module.0.weight"] and r0[case]["overflow"][3] == [], case
    # Control: plain GradScaler lets rank 0 step alone, so the ranks drift apart.
    plain0, plain1 = r0["grad_plain_gradscaler"], r1["grad_plain_gradscaler"]
    assert plain0["skipped"][3] is False and plain1["skipped"][3] is True
    assert not all(torch.equal(a, b) for a, b in zip(plain0["params"], plain1["params"]))
    assert math.isclose(plain0["scale"], 2.0**10) and plain1["scale"] == 2.0**9
