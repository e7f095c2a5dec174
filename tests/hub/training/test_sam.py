"""Sharpness-aware minimisation: the step's gradient is the loss's at the ρ-perturbed weights, the weights
come back exactly, and a clinic's local training takes SAM's steps over the same batches and views as
without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hub.models.fl_cnn import fl_cnn
from hub.training.learners import LocalConfig, to_params, train_local
from hub.training.sam import sharpness_aware_backward
from tests.hub.training.conftest import make_clinic


def _quartic_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(3, 2), torch.randn(16, 3), torch.randn(16, 2)


def _loss(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((model(x) - t) ** 4).mean()  # not quadratic: the gradient moves with the weights


def test_the_gradient_is_taken_at_the_perturbed_weights_and_the_weights_come_back_exactly() -> None:
    model, x, t = _quartic_problem()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = sharpness_aware_backward(model, lambda: _loss(model, x, t), rho=0.5)

    # By hand: the gradient g at w, then the gradient at w + ρ g / ‖g‖.
    twin, _, _ = _quartic_problem()
    plain = torch.autograd.grad(_loss(twin, x, t), list(twin.parameters()))
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in plain]))
    with torch.no_grad():
        for p, g in zip(twin.parameters(), plain, strict=True):
            p.add_(0.5 * g / norm)
    perturbed = torch.autograd.grad(_loss(twin, x, t), list(twin.parameters()))

    assert loss == pytest.approx(float(_loss(model, x, t).detach()))  # the loss at the weights as they were
    for (name, p), g_plain, g_sam in zip(model.named_parameters(), plain, perturbed, strict=True):
        assert torch.equal(p.detach(), before[name])
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g_sam)
        assert not torch.allclose(p.grad, g_plain)


def test_a_flat_gradient_has_nowhere_to_perturb_and_a_radius_must_be_positive() -> None:
    model, x, _ = _quartic_problem()
    sharpness_aware_backward(model, lambda: model(x).sum() * 0.0, rho=0.1)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    with pytest.raises(ValueError, match="above 0"):
        sharpness_aware_backward(model, lambda: model(x).sum(), rho=0.0)


def _train(rho: float) -> tuple[dict[str, object], torch.Tensor]:
    torch.manual_seed(0)
    model = fl_cnn(norm="group")
    clinic = make_clinic("C", 48, seed=4)
    gen = torch.Generator().manual_seed(1)
    cfg = LocalConfig(batch_size=16, augment=True, randconv=True, consistency=4.0, sam_rho=rho)
    train_local(model, clinic.train_x, clinic.train_y, cfg, gen)
    return dict(to_params(model)), gen.get_state()


def test_local_training_takes_sams_steps_over_the_same_batches_and_views() -> None:
    plain, plain_rng = _train(0.0)
    sam, sam_rng = _train(0.05)
    assert torch.equal(plain_rng, sam_rng)  # SAM draws nothing more: the runs stay paired
    assert any(not (plain[n] == sam[n]).all() for n in plain)  # type: ignore[attr-defined]
    clinic = make_clinic("C", 16, seed=4)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="a radius"):
            train_local(fl_cnn(), clinic.train_x, clinic.train_y, LocalConfig(sam_rho=bad), torch.Generator())
