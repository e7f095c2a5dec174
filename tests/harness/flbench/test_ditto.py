"""Ditto: the federation's side is FedAvg's to the bit, λ pulls the personal model toward the global one,
and a clinic resumed from its saved state goes on exactly as one that never stopped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.flbench.ditto import DittoLearner
from hub.fl.strategy import ClientTask, Params, UpdateKind
from hub.models.fl_cnn import fl_cnn
from hub.training.learners import LocalConfig, SupervisedLearner, normalize, supervised_loss, to_params
from tests.hub.training.conftest import make_clinic

LOCAL = LocalConfig(epochs=2, lr=1e-3, batch_size=16, augment=True)


def _learner(lam: float, seed: int = 5) -> DittoLearner:
    torch.manual_seed(0)
    model, personal = fl_cnn(norm="group"), fl_cnn(norm="group")
    personal.load_state_dict(model.state_dict())
    return DittoLearner("A", model, personal, make_clinic("A", 40, seed=1), LOCAL, seed, lam, lr=0.005)


def _global(seed: int) -> Params:
    torch.manual_seed(seed)
    return to_params(fl_cnn(norm="group"))


def _task(params: Params, rnd: int = 1) -> ClientTask:
    return ClientTask("A", rnd, UpdateKind.WEIGHTS_DELTA, params, {})


def _distance(a: Params, b: Params) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a if a[k].dtype.kind == "f")))


def test_the_update_sent_is_fedavg_s_to_the_bit() -> None:
    torch.set_num_threads(1)
    ditto = _learner(lam=0.1)
    torch.manual_seed(0)
    plain = SupervisedLearner("A", fl_cnn(norm="group"), make_clinic("A", 40, seed=1), LOCAL, 5)
    for rnd in (1, 2):
        params = _global(10 + rnd)
        got, want = ditto.fit(_task(params, rnd)).update, plain.fit(_task(params, rnd)).update
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert _distance(to_params(ditto.personal), to_params(ditto.model)) > 0  # it trained a model of its own


def test_lambda_holds_the_personal_model_near_the_global_one() -> None:
    torch.set_num_threads(1)
    gaps = {}
    for lam in (0.0, 10.0, 200.0):
        learner = _learner(lam)
        start = to_params(learner.personal)  # the global model it is sent each round: where it starts
        for rnd in (1, 2, 3):
            learner.fit(_task(start, rnd))
        gaps[lam] = _distance(to_params(learner.personal), start)
    assert gaps[200.0] < 0.9 * gaps[10.0] < 0.9 * 0.9 * gaps[0.0], gaps


def test_without_the_pull_the_personal_model_never_reads_the_global_one() -> None:
    torch.set_num_threads(1)
    a, b = _learner(0.0), _learner(0.0)
    a.fit(_task(_global(1)))
    b.fit(_task(_global(2)))
    pa, pb = to_params(a.personal), to_params(b.personal)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_a_resumed_clinic_goes_on_as_one_that_never_stopped() -> None:
    torch.set_num_threads(1)
    through, resumed = _learner(0.5), _learner(0.5)
    through.fit(_task(_global(1), 1))
    resumed.fit(_task(_global(1), 1))
    saved = resumed.state()
    fresh = _learner(0.5, seed=99)  # another seed: everything it goes on with comes from the saved state
    fresh.restore(saved)
    want, got = through.fit(_task(_global(2), 2)), fresh.fit(_task(_global(2), 2))
    assert all(np.array_equal(want.update[k], got.update[k]) for k in want.update)
    pw, pg = to_params(through.personal), to_params(fresh.personal)
    assert all(np.array_equal(pw[k], pg[k]) for k in pw)


def test_a_negative_lambda_is_refused() -> None:
    with pytest.raises(ValueError, match="λ must be ≥ 0"):
        _learner(-0.1)


def test_the_personal_steps_are_sgd_with_the_pull() -> None:
    """One step with λη = 1 from a personal model far from w lands on w less η × the task's gradient."""
    torch.set_num_threads(1)
    one = LocalConfig(epochs=1, lr=1e-3, batch_size=64, augment=False)  # 40 images: one minibatch
    learner = _learner(0.0)
    learner.default, learner.lam, learner.lr = one, 1 / 0.005, 0.005
    w = _global(7)
    torch.manual_seed(1)
    away = fl_cnn(norm="group")
    learner.personal.load_state_dict(away.state_dict())
    probe = fl_cnn(norm="group")
    probe.load_state_dict(away.state_dict())
    loss = supervised_loss(probe, normalize(learner.data.train_x), learner.data.train_y)
    loss.backward()
    want = {n: w[n] - 0.005 * p.grad.numpy() for n, p in probe.named_parameters() if p.grad is not None}
    learner.fit(_task(w))
    got = to_params(learner.personal)
    assert max(float(np.abs(got[n] - want[n]).max()) for n in want) < 1e-5
