"""FedHelp's KD losses on tiny hand-computed tensors: KL terms and the ranking hinge with both signs."""

from __future__ import annotations

import math

import pytest
import torch

from hub.training.fedhelp_kd import binary_kl, kl_to_soft_labels, large_loss, proxy_loss, ranking_hinge

LN3 = math.log(3.0)


def test_binary_kl_hand_computed() -> None:
    # sample 0: p = 0.5, q = σ(ln 3) = 0.75 → 0.5·ln(0.5/0.75) + 0.5·ln(0.5/0.25) = 0.5·ln(4/3)
    # sample 1: identical logits → 0
    t = torch.tensor([0.0, 1.3])
    s = torch.tensor([LN3, 1.3])
    assert binary_kl(t, s).item() == pytest.approx(0.25 * math.log(4 / 3), abs=1e-7)


def test_binary_kl_temperature_scales_logits_and_multiplies_by_t_squared() -> None:
    # T = 2: teacher 2·ln 3 → p = 0.75; student 0 → q = 0.5; KL = 0.75·ln 1.5 + 0.25·ln 0.5, times T² = 4
    value = binary_kl(torch.tensor([2 * LN3]), torch.tensor([0.0]), temperature=2.0).item()
    assert value == pytest.approx(4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)), abs=1e-6)


def test_binary_kl_is_not_symmetric() -> None:
    a, b = torch.tensor([0.0]), torch.tensor([LN3])
    # KL(p=0.75 ‖ q=0.5) = 0.75 ln 1.5 + 0.25 ln 0.5 ≠ 0.5 ln(4/3)
    assert binary_kl(b, a).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-7)
    assert binary_kl(a, b).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)


def test_kl_to_soft_labels_hand_computed_with_zero_targets() -> None:
    target = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    logits = torch.tensor([[0.0, 0.0], [0.0, LN3]])  # softmax: [0.5, 0.5] and [0.25, 0.75]
    # row 0: 1·ln(1/0.5) + 0 = ln 2; row 1: target equals the prediction → 0
    assert kl_to_soft_labels(target, logits).item() == pytest.approx(math.log(2) / 2, abs=1e-7)


Z_LARGE = [2.0, -1.0, 0.5]
Z_PROXY = [1.0, 1.0, -3.0]  # proxy's top class: 1, 1, 0 → large gaps +2, −1, −0.5


def test_ranking_hinge_agree_sign_margin_zero_and_one() -> None:
    zl, zp = torch.tensor(Z_LARGE), torch.tensor(Z_PROXY)
    # relu(0 − gap) / 2 = [0, 0.5, 0.25] → mean 0.25
    assert ranking_hinge(zl, zp, margin=0.0, sign="agree").item() == pytest.approx(0.25)
    # relu(1 − gap) / 2 = [0, 1, 0.75] → mean 7/12
    assert ranking_hinge(zl, zp, margin=1.0, sign="agree").item() == pytest.approx(7 / 12)


def test_ranking_hinge_snapshot_sign_penalises_agreement() -> None:
    zl, zp = torch.tensor(Z_LARGE), torch.tensor(Z_PROXY)
    # relu(gap) / 2 = [1, 0, 0] → mean 1/3
    assert ranking_hinge(zl, zp, sign="snapshot").item() == pytest.approx(1 / 3)


def test_ranking_hinge_gradients_point_opposite_ways_for_the_two_signs() -> None:
    zl = torch.tensor(Z_LARGE, requires_grad=True)
    ranking_hinge(zl, torch.tensor(Z_PROXY), sign="agree").backward()
    assert zl.grad is not None
    # agree: only samples 1 and 2 are active; descent raises z_L[1] (proxy says class 1), lowers z_L[2]
    assert zl.grad.tolist() == pytest.approx([0.0, -1 / 6, 1 / 6])
    zl2 = torch.tensor(Z_LARGE, requires_grad=True)
    ranking_hinge(zl2, torch.tensor(Z_PROXY), sign="snapshot").backward()
    assert zl2.grad is not None
    # snapshot: only sample 0 (where the large model agrees with the proxy) is pushed, toward disagreeing
    assert zl2.grad.tolist() == pytest.approx([1 / 6, 0.0, 0.0])


def test_ranking_hinge_rejects_unknown_sign() -> None:
    with pytest.raises(ValueError, match="ranking sign"):
        ranking_hinge(torch.zeros(1), torch.zeros(1), sign="both")  # type: ignore[arg-type]


def test_proxy_loss_is_ce_plus_kl_from_the_frozen_large_model() -> None:
    proxy = torch.tensor([0.0], requires_grad=True)
    large = torch.tensor([LN3], requires_grad=True)
    y = torch.tensor([1.0])
    loss = proxy_loss(proxy, large, y)
    # CE = −ln σ(0) = ln 2; KL(p=0.75 ‖ q=0.5) = 0.75 ln 1.5 + 0.25 ln 0.5
    assert loss.item() == pytest.approx(math.log(2) + 0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    loss.backward()
    assert large.grad is None  # the large model is not trained by the proxy's step


def test_large_loss_weights_ce_kl_and_ranking() -> None:
    large = torch.tensor([-1.0], requires_grad=True)
    proxy = torch.tensor([LN3], requires_grad=True)  # proxy's top class is 1; the large gap is −1
    y = torch.tensor([1.0])
    ce = math.log(1 + math.e)  # −ln σ(−1)
    p, q = 0.75, 1 / (1 + math.e)  # KL(proxy ‖ large)
    kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    agree = large_loss(large, proxy, y, kl_weight=0.1, rank_weight=0.2, margin=0.5, sign="agree")
    assert agree.item() == pytest.approx(ce + 0.1 * kl + 0.2 * (0.5 + 1.0) / 2, abs=1e-6)
    snapshot = large_loss(large, proxy, y, kl_weight=0.1, rank_weight=0.2, sign="snapshot")
    assert snapshot.item() == pytest.approx(ce + 0.1 * kl, abs=1e-6)  # relu(−1) = 0
    agree.backward()
    assert proxy.grad is None
