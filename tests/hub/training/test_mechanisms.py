"""Each algorithm's own mechanism does something measurable: HSL's anchor task, FedHelp's foundation head,
and the ablations switch exactly their mechanism off."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from edge_node.protocol.updates import UpdateKind
from hub.fl.strategy import ClientTask
from hub.models.fedhelp_nets import fedhelp_small
from hub.models.fl_cnn import fl_cnn
from hub.models.hsl_mmoe import ANCHOR, PRIMARY, Fusion, hsl_mmoe
from hub.training.datasets import ClinicData
from hub.training.fedhelp_kd import kl_to_soft_labels
from hub.training.fedhelp_train import FedHelpSmallLearner
from hub.training.hsl_train import HslLearner, HslStepsLearner, balance_primary, padded_order
from hub.training.learners import LocalConfig, normalize, to_params
from tests.hub.training.conftest import make_clinic

T = TypeVar("T")
NO_DECAY = LocalConfig(epochs=1, batch_size=16, weight_decay=0.0)


def _hsl_update(weights: tuple[float, float], seed: int = 0) -> dict[str, np.ndarray]:
    """One HSL local round with (primary, anchor) loss weights; returns the uploaded update."""
    torch.manual_seed(seed)
    net = hsl_mmoe()
    clinic = make_clinic("C", 32, seed=1)
    anchor = make_clinic("public", 48, seed=2)
    learner = HslLearner("C", net, clinic, anchor.train_x, anchor.train_y, NO_DECAY, seed)
    task = ClientTask(
        "C",
        1,
        UpdateKind.WEIGHTS_DELTA,
        to_params(net),
        {"primary_weight": weights[0], "sat_weight": weights[1]},
    )
    return dict(learner.fit(task).update)


def _norm(update: dict[str, np.ndarray], prefix: str) -> float:
    return float(np.sqrt(sum(float((v**2).sum()) for k, v in update.items() if k.startswith(prefix))))


def test_hsl_anchor_gradient_reaches_the_primary_encoder_and_the_shared_experts() -> None:
    torch.manual_seed(0)
    net = hsl_mmoe().train()
    xp, xa = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        net(normalize(xp), normalize(xa))[:, ANCHOR], torch.tensor([0.0, 1.0] * 4)
    )
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    enc = sum(
        float(g.abs().sum())
        for n, g in grads.items()
        if n.startswith(f"encoders.{PRIMARY}.") and g is not None
    )
    experts = sum(
        float(g.abs().sum()) for n, g in grads.items() if n.startswith("experts.") and g is not None
    )
    assert enc > 0 and experts > 0
    # The primary tower is the primary task's own: the anchor loss leaves it untouched.
    assert all(
        g is None or float(g.abs().sum()) == 0 for n, g in grads.items() if n.startswith(f"towers.{PRIMARY}.")
    )


def test_hsl_anchor_loss_alone_moves_the_shared_encoder() -> None:
    none = _hsl_update((0.0, 0.0))
    anchor_only = _hsl_update((0.0, 1.0))
    primary_only = _hsl_update((1.0, 0.0))
    # No loss, no weight decay: Adam takes zero steps, nothing moves.
    assert _norm(none, "") == 0.0
    # The anchor task alone moves the primary image's encoder and the shared experts...
    enc, experts = _norm(anchor_only, f"encoders.{PRIMARY}."), _norm(anchor_only, "experts.")
    assert enc > 1e-3 and experts > 1e-3
    # ...by an amount of the same order as the primary task moves them (it is not an inert side branch).
    assert enc > 0.05 * _norm(primary_only, f"encoders.{PRIMARY}.")
    # And adding it changes the primary encoder's update.
    both = _hsl_update((1.0, 1.0))
    diff = {k: both[k] - primary_only[k] for k in both}
    assert _norm(diff, f"encoders.{PRIMARY}.") > 1e-3


def test_fedhelp_foundation_head_loss_decreases_toward_the_soft_labels() -> None:
    torch.manual_seed(0)
    model = fedhelp_small(public_classes=3)
    clinic: ClinicData = make_clinic("C", 64, seed=3)
    public = make_clinic("public", 96, seed=4).train_x
    # Soft labels that depend on the image (its mean brightness), so a head can learn them.
    brightness = public.mean(dim=(1, 2, 3))
    logits = torch.stack(
        [-8 * (brightness - 0.4), torch.zeros_like(brightness), 8 * (brightness - 0.4)], dim=1
    )
    soft = torch.softmax(logits, dim=1)
    learner = FedHelpSmallLearner("C", model, clinic, public, soft, LocalConfig(epochs=1, batch_size=16), 0)

    def head_kl() -> float:
        model.eval()
        with torch.no_grad():
            return float(kl_to_soft_labels(soft, model.forward_public(normalize(public))))

    before = head_kl()
    params = to_params(model)
    for rnd in range(1, 6):
        result = learner.fit(ClientTask("C", rnd, UpdateKind.WEIGHTS_DELTA, params, {}))
        params = {k: params[k] + result.update[k] for k in params}
    after = head_kl()
    assert after < 0.7 * before, (before, after)


def _encoder_grad_ratio(fusion: Fusion, seed: int) -> float:
    """‖∂L_anchor/∂encoder A‖ / ‖∂L_primary/∂encoder A‖ at initialisation, on one batch."""
    torch.manual_seed(seed)
    net = hsl_mmoe(fusion=fusion).train()
    xp, xa = torch.rand(32, 1, 28, 28), torch.rand(32, 1, 28, 28)
    out = net(normalize(xp), normalize(xa))
    y = (torch.arange(32) % 2).float()
    norms = []
    for task in (PRIMARY, ANCHOR):
        net.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(out[:, task], y).backward(retain_graph=True)
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(f"encoders.{PRIMARY}.")]
        norms.append(float(torch.sqrt(sum(((g**2).sum() for g in grads if g is not None), torch.zeros(())))))
    return norms[1] / norms[0]


def test_the_softmax_fusion_keeps_the_anchor_gradient_away_from_the_primary_encoder() -> None:
    # The temperature softmax over the 128 fused dims flattens them to ≈ 1/128: the anchor task's gradient
    # reaches encoder A about a thousand times weaker than the primary task's. Without it, a fifth as strong.
    for seed in range(3):
        assert _encoder_grad_ratio("softmax", seed) < 0.01
        assert _encoder_grad_ratio("concat", seed) > 0.05


def _counting_steps(run: Callable[[], T]) -> tuple[int, T]:
    """(optimiser steps taken by any torch optimiser during ``run``, its result)."""
    counted = [0]

    def hook(*_: object) -> None:
        counted[0] += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        result = run()
    finally:
        handle.remove()
    return counted[0], result


def test_fedhelp_without_the_foundation_head_never_touches_it() -> None:
    torch.manual_seed(0)
    model = fedhelp_small(public_classes=3)
    clinic = make_clinic("C", 48, seed=3)
    public = make_clinic("public", 32, seed=4).train_x
    soft = torch.full((32, 3), 1 / 3)
    before = to_params(model)
    steps = {}
    for fm in (0.0, 1.0):
        model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()})
        learner = FedHelpSmallLearner(
            "C", model, clinic, public, soft, LocalConfig(batch_size=16), 0, fm_weight=fm
        )
        task = ClientTask("C", 1, UpdateKind.WEIGHTS_DELTA, before, {})
        steps[fm], result = _counting_steps(lambda: learner.fit(task))  # noqa: B023 (called at once)
        update = result.update
        head = _norm(dict(update), "public_head.")
        assert (head == 0.0) if fm == 0.0 else (head > 0.0)
    assert steps == {0.0: 3, 1.0: 6}  # 48 images / batch 16: one private step each, plus one public step


def test_fedavg_with_hsl_steps_takes_as_many_balanced_steps_as_hsl() -> None:
    torch.manual_seed(0)
    model = fl_cnn(norm="group")
    clinic = make_clinic("C", 20, seed=5, prevalence=0.2)
    learner = HslStepsLearner("C", model, clinic, 96, LocalConfig(batch_size=16), 0)
    steps, _ = _counting_steps(
        lambda: learner.fit(ClientTask("C", 1, UpdateKind.WEIGHTS_DELTA, to_params(model), {}))
    )
    assert steps == 6  # max(20, 96) items per epoch in batches of 16
    # The primary items are class-balanced as HSL's are (expected 50/50 from a 20 % clinic).
    order = balance_primary(padded_order(20, 4000, torch.Generator().manual_seed(1)), clinic.train_y,
                            torch.Generator().manual_seed(2))  # fmt: skip
    assert abs(float(clinic.train_y[order].mean()) - 0.5) < 0.05
