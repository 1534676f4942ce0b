"""SAM behaviour: the perturbation, exact restore, BN/dropout in the second pass, resume."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from fmnist.sam import SAM, disable_running_stats, rng_streams, same_rng

torch.set_num_threads(1)

SGD_KWARGS = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


def mlp(seed: int = 0, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def batch(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(16, 6, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)


def loss_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def sam_step(model: nn.Module, opt: SAM, x: torch.Tensor, y: torch.Tensor) -> None:
    """The two-call API, as the training loop uses it."""
    loss_at(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_at(model, x, y).backward()
    opt.second_step(zero_grad=True)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_perturbation_has_norm_rho_and_follows_gradient() -> None:
    model = mlp(dtype=torch.float64)
    opt = SAM(model.parameters(), rho=0.05, lr=0.1)
    loss_at(model, *batch(0, torch.float64)).backward()
    before = flat(model.parameters())
    grad = flat(p.grad for p in model.parameters())
    opt.first_step()
    e = flat(model.parameters()) - before
    assert torch.linalg.vector_norm(e).item() == pytest.approx(0.05, rel=1e-9)
    cosine = torch.nn.functional.cosine_similarity(e, grad, dim=0).item()
    assert cosine == pytest.approx(1, abs=1e-12)


def test_global_norm_and_per_group_rho_on_a_quadratic_by_hand() -> None:
    # L = (|a|^2 + |b|^2) / 2, so g = w = (1, 2, 2, 4) and ||g|| = 5 over BOTH tensors.
    a = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([2.0, 4.0], dtype=torch.float64))
    groups = [{"params": [a], "rho": 0.5, "lr": 0.1}, {"params": [b], "rho": 1.0, "lr": 0.2}]
    opt = SAM(groups, rho=0.05, lr=0.01)

    def loss() -> torch.Tensor:
        return 0.5 * (a.square().sum() + b.square().sum())

    loss().backward()
    opt.first_step(zero_grad=True)
    # e_a = 0.5 (1, 2) / 5, e_b = 1.0 (2, 4) / 5
    assert torch.allclose(a, torch.tensor([1.1, 2.2], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(b, torch.tensor([2.4, 4.8], dtype=torch.float64), atol=1e-12)
    loss().backward()  # gradient at w + e is w + e
    opt.second_step()
    assert torch.allclose(a, torch.tensor([1 - 0.11, 2 - 0.22], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(b, torch.tensor([2 - 0.48, 4 - 0.96], dtype=torch.float64), atol=1e-12)


def test_asam_perturbation_by_hand_with_eta_zero() -> None:
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = SAM([w], rho=0.5, adaptive=True, eta=0.0, lr=0.1)
    (w * torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64)).sum().backward()  # g = (3, 2, 0)
    opt.first_step()
    # |w| g = (3, 4, 0), norm 5; e = rho w^2 g / 5 = 0.5 (3, 8, 0) / 5 = (0.3, 0.8, 0)
    assert torch.allclose(w, torch.tensor([1.3, -1.2, 0.5], dtype=torch.float64), atol=1e-12)


def test_asam_eta_perturbs_zero_weights_as_kwon_et_al_write_it() -> None:
    """e(w) = rho T^2 g / ||T g||, T = |w| + eta (ASAM, Kwon et al. 2021, eq. 11)."""
    w = nn.Parameter(torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64))
    opt = SAM([w], rho=0.5, adaptive=True, eta=0.5, lr=0.1)
    (w * torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)).sum().backward()  # g = (1, 2, 4)
    opt.first_step()
    # T = (2, 1, 0.5), T g = (2, 2, 2), ||T g|| = sqrt(12); T^2 g = (4, 2, 1)
    e = 0.5 * torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64) / 12**0.5
    assert torch.allclose(w, torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64) + e,
                          atol=1e-12)
    assert w[2] > 0.14  # the zero weight moved: with eta = 0 it could not


def test_asam_default_eta_is_the_papers() -> None:
    w = nn.Parameter(torch.zeros(2))
    assert SAM([w], adaptive=True, lr=0.1).param_groups[0]["eta"] == 0.01


def test_rho_zero_matches_sgd_bit_for_bit() -> None:
    sam_model, sgd_model = mlp(), mlp()
    sam = SAM(sam_model.parameters(), rho=0.0, **SGD_KWARGS)
    sgd = torch.optim.SGD(sgd_model.parameters(), **SGD_KWARGS)
    for i in range(5):
        x, y = batch(i)
        sam_step(sam_model, sam, x, y)
        loss_at(sgd_model, x, y).backward()
        sgd.step()
        sgd.zero_grad()
    assert_same_params(sam_model, sgd_model)
    for ps, pg in zip(sam_model.parameters(), sgd_model.parameters(), strict=True):
        buf = sam.base_optimizer.state[ps]["momentum_buffer"]
        assert torch.equal(buf, sgd.state[pg]["momentum_buffer"])


def test_restore_is_bit_exact_even_without_gradient_in_second_pass() -> None:
    torch.manual_seed(0)
    body, head1, head2 = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)
    params = [*body.parameters(), *head1.parameters(), *head2.parameters()]
    before = [p.detach().clone() for p in params]
    opt = SAM(params, rho=0.5, lr=0.0)
    x, y = batch(0)
    h = body(x)
    (loss_at(head1, h, y) + loss_at(head2, h, y)).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(head2.weight, before[4])  # head2 was perturbed
    loss_at(head1, body(x), y).backward()  # head2 gets no gradient now
    assert head2.weight.grad is None
    opt.second_step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


def test_bf16_autocast_keeps_fp32_weights_and_restores_exactly() -> None:
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), rho=0.05, lr=0.0)
    x, y = batch(0)
    for step in (opt.first_step, opt.second_step):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_at(model, x, y)
        loss.backward()
        step(zero_grad=True)
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, b)


def test_norm_of_bf16_gradients_is_accumulated_in_fp32() -> None:
    # A float32 weight at 0 moves by exactly rho g / ||g||, where ||g|| includes bf16 gradients;
    # a norm rounded to bf16 (8 significant bits) would be off by up to ~0.4%.
    w32 = nn.Parameter(torch.zeros(2))
    w16 = nn.Parameter(torch.zeros(300, dtype=torch.bfloat16))
    g32 = torch.tensor([0.3, 0.7])
    g16 = (torch.arange(300) % 7 + 1).to(torch.bfloat16) / 8
    w32.grad, w16.grad = g32.clone(), g16.clone()
    norm = math.sqrt(g32.double().square().sum() + g16.double().square().sum())
    assert abs(float(torch.tensor(norm).to(torch.bfloat16)) - norm) / norm > 1e-4  # meaningful
    SAM([w32, w16], rho=0.05, lr=0.1).first_step()
    assert torch.allclose(w32.double(), 0.05 * g32.double() / norm, rtol=1e-6, atol=0)
    assert w32.dtype == torch.float32 and w16.dtype == torch.bfloat16


def test_second_pass_leaves_bn_stats_of_first_pass_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    x, y = batch(0)
    reference(x)  # one plain training forward: the buffers SAM should end with
    opt = SAM(model.parameters(), rho=0.5, lr=0.0)
    loss_at(model, x, y).backward()
    opt.first_step(zero_grad=True)
    with disable_running_stats(model):
        loss_at(model, x, y).backward()
    opt.second_step()
    bn, ref = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    assert bn.track_running_stats


def test_disabled_running_stats_still_normalize_with_batch_statistics() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    bn.running_mean.fill_(3.0)  # far from the batch mean, so eval-style output differs
    x = torch.randn(10, 4)
    expected = copy.deepcopy(bn)(x)  # train mode: batch statistics
    with disable_running_stats(bn):
        out = bn(x)
    assert torch.equal(out, expected)
    assert bn.running_mean.eq(3.0).all() and bn.num_batches_tracked.item() == 0


def test_disable_running_stats_restores_tracking_after_an_exception() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(KeyError), disable_running_stats(model):
        assert not model[0].track_running_stats
        raise KeyError("boom")
    assert model[0].track_running_stats and not model[1].track_running_stats
    model(torch.randn(5, 4))
    assert model[0].num_batches_tracked.item() == 1


def test_same_rng_replays_the_dropout_mask_and_continues_like_one_pass() -> None:
    drop = nn.Dropout(0.5)
    x = torch.ones(1000)
    torch.manual_seed(0)
    with same_rng() as replay:
        first = drop(x)
        torch.rand(3)  # whatever else draws between the passes
        with replay():
            second = drop(x)
        third = drop(x)  # outside the replay: a fresh mask
    after_sam = torch.rand(4)
    torch.manual_seed(0)
    drop(x)
    torch.rand(3)
    plain_third = drop(x)
    after_plain = torch.rand(4)
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert torch.equal(third, plain_third) and torch.equal(after_sam, after_plain)


def _accelerator(kind: str):
    present = getattr(torch, kind, None) is not None and getattr(torch, kind).is_available()
    return pytest.param(kind, marks=pytest.mark.skipif(not present, reason=f"no {kind} device"))


@pytest.mark.parametrize("device", ["cpu", _accelerator("cuda"), _accelerator("xpu")])
def test_same_rng_replays_dropout_on_the_device_it_runs_on(device: str) -> None:
    # Dropout on an accelerator draws from that device's generator, not the CPU's.
    drop = nn.Dropout(0.5)
    x = torch.ones(1000, device=device)
    torch.manual_seed(0)
    with same_rng(torch.device(device)) as replay:
        first = drop(x)
        with replay():
            second = drop(x)
        third = drop(x)
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_only_the_cpu_generator_is_replayed_on_the_cpu() -> None:
    assert rng_streams(torch.device("cpu")) == rng_streams(None)
    assert len(rng_streams("cpu")) == 1


def test_rho_zero_with_dropout_and_same_rng_matches_sgd() -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))

    sam_model, sgd_model = build(), build()
    sam = SAM(sam_model.parameters(), rho=0.0, **SGD_KWARGS)
    sgd = torch.optim.SGD(sgd_model.parameters(), **SGD_KWARGS)
    torch.manual_seed(1)
    for i in range(3):
        x, y = batch(i)
        with same_rng() as replay:
            loss_at(sam_model, x, y).backward()
            sam.first_step(zero_grad=True)
            with replay():
                loss_at(sam_model, x, y).backward()
        sam.second_step(zero_grad=True)
    torch.manual_seed(1)
    for i in range(3):
        loss_at(sgd_model, *batch(i)).backward()
        sgd.step()
        sgd.zero_grad()
    assert_same_params(sam_model, sgd_model)


def test_closure_api_equals_two_call_api() -> None:
    model_a, model_b = mlp(), mlp()
    opt_a = SAM(model_a.parameters(), rho=0.1, **SGD_KWARGS)
    opt_b = SAM(model_b.parameters(), rho=0.1, **SGD_KWARGS)
    for i in range(3):
        x, y = batch(i)
        sam_step(model_a, opt_a, x, y)

        def closure(x=x, y=y) -> torch.Tensor:
            loss = loss_at(model_b, x, y)
            loss.backward()
            return loss

        with torch.no_grad():  # step must turn gradients back on for the closure
            with torch.enable_grad():
                loss_at(model_b, x, y).backward()
            opt_b.step(closure)
        opt_b.zero_grad()
    assert_same_params(model_a, model_b)


def test_state_dict_round_trip_resumes_bit_for_bit() -> None:
    model = mlp()
    opt = SAM(model.parameters(), rho=0.1, adaptive=True, **SGD_KWARGS)
    for i in range(3):
        sam_step(model, opt, *batch(i))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for i in range(3, 6):
        sam_step(model, opt, *batch(i))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = SAM(resumed.parameters(), rho=0.7, lr=0.5)  # rho, momentum... come from the state
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["rho"] == 0.1 and opt2.param_groups[0]["adaptive"]
    for i in range(3, 6):
        sam_step(resumed, opt2, *batch(i))
    assert_same_params(model, resumed)
    for pa, pb in zip(model.parameters(), resumed.parameters(), strict=True):
        a, b = opt.base_optimizer.state[pa], opt2.base_optimizer.state[pb]
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_lr_scheduler_on_sam_changes_base_lr_without_warnings() -> None:
    model = mlp()
    opt = SAM(model.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sam_step(model, opt, *batch(0))
        scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)

    onecycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    assert onecycle.get_last_lr()[0] == pytest.approx(1.0 / 25)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1.0 / 25)


def test_base_optimizer_instance_is_driven_and_matches_class_built() -> None:
    model_a, model_b = mlp(), mlp()
    base = torch.optim.SGD(model_b.parameters(), **SGD_KWARGS)
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.1, **SGD_KWARGS)
    opt_b = SAM(model_b.parameters(), base, rho=0.1)
    assert opt_b.base_optimizer is base and opt_b.param_groups is base.param_groups
    for i in range(3):
        sam_step(model_a, opt_a, *batch(i))
        sam_step(model_b, opt_b, *batch(i))
    assert_same_params(model_a, model_b)
    assert len(base.state) == 4  # its momentum buffers: it took the steps
    with pytest.raises(TypeError, match="lr"):
        SAM(model_b.parameters(), base, rho=0.1, lr=0.5)


def test_first_step_twice_raises() -> None:
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="second_step"):
        opt.second_step()
    loss_at(model, *batch(0)).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


@pytest.mark.parametrize("gradient", ["none", "zero"])
def test_step_without_usable_gradient_is_safe(gradient: str) -> None:
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(2):
        if gradient == "zero":
            (0.0 * loss_at(model, *batch(0))).backward()
        opt.first_step()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        opt.second_step(zero_grad=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_non_finite_gradient_does_not_perturb_and_restores() -> None:
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), rho=0.05, lr=0.0)
    loss_at(model, *batch(0)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    loss_at(model, *batch(0)).backward()  # the second pass at w itself: finite
    opt.second_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
