"""The runner's path end to end with a numpy learner: tasks -> local steps -> codec -> aggregate."""

from __future__ import annotations

import numpy as np

import hub.fl
from hub.fl import (
    ClientFailure,
    ClientResult,
    ErrorFeedback,
    TopKCompressor,
    UpdateKind,
    UploadLedger,
    decode_or_failure,
    decompress_result,
    encode_result,
    make_strategy,
    spec_of,
)
from hub.fl.strategy import Params


def test_public_api_is_explicit_and_importable() -> None:
    assert sorted(hub.fl.__all__) == sorted(set(hub.fl.__all__))
    for name in hub.fl.__all__:
        assert getattr(hub.fl, name) is not None, name


def _clients(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    true_w = np.array([2.0, -1.0, 0.5])
    data = {}
    for cid, n in [("big", 200), ("mid", 60), ("small", 12)]:
        x = rng.normal(size=(n, 3))
        data[cid] = (x, x @ true_w + 0.01 * rng.normal(size=n))
    return data


def _train(params: Params, x: np.ndarray, y: np.ndarray, steps: int = 20, lr: float = 0.1) -> Params:
    w = params["w"].copy()
    for _ in range(steps):
        w -= lr * 2 * x.T @ (x @ w - y) / len(y)  # least-squares gradient
    return {"w": w}


def test_fedavg_through_the_codec_learns_a_linear_model() -> None:
    rng = np.random.default_rng(0)
    data = _clients(rng)
    strategy = make_strategy("fedavg")
    strategy.initialize({"w": np.zeros(3)}, list(data))
    ledger = UploadLedger()
    for rnd in range(1, 11):
        envelopes = []
        failures: list[ClientFailure] = []
        for task in strategy.configure_round(rnd, list(data)):
            if task.client_id == "small" and rnd == 3:
                failures.append(ClientFailure("small", rnd, "timeout"))
                continue
            after = _train(task.params, *data[task.client_id])
            delta = {n: after[n] - task.params[n] for n in task.params}
            n_ex = len(data[task.client_id][1])
            envelopes.append(encode_result(ClientResult(task.client_id, rnd, n_ex, delta, {"loss": 0.0})))
        results = []
        for env, payload in envelopes:
            ledger.record(env)
            got = decode_or_failure(env, payload)
            assert isinstance(got, ClientResult)
            results.append(got)
        assert strategy.aggregate(rnd, results, failures) is not None
    np.testing.assert_allclose(strategy.global_params["w"], [2.0, -1.0, 0.5], atol=0.01)
    assert strategy.history[2].failures == (ClientFailure("small", 3, "timeout"),)
    assert len(ledger.per_client_round()) == 29 and ledger.total() > 0


def test_pfednet_with_a_stats_round_and_compressed_uploads() -> None:
    rng = np.random.default_rng(1)
    data = _clients(rng)
    ids = list(data)
    strategy = make_strategy("pfednet", lam=0.0, eta=0.1, personal=lambda n: n == "head")
    strategy.initialize({"w": np.zeros(3), "head": np.zeros(1)}, ids)
    stats_tasks = strategy.configure_round(1, ids)
    assert {t.kind for t in stats_tasks} == {UpdateKind.STATS}
    counts = {"big": [150, 50], "mid": [40, 20], "small": [2, 10]}
    stats = [ClientResult(c, 1, 1, {"label_counts": np.array(counts[c])}) for c in ids]
    assert strategy.aggregate(1, stats, []) is None
    feedback = {c: ErrorFeedback(TopKCompressor(1.0)) for c in ids}
    for rnd in range(2, 12):
        results = []
        for task in strategy.configure_round(rnd, ids):
            after = {
                **_train({"w": task.params["w"]}, *data[task.client_id]),
                "head": task.params["head"] + 1,
            }
            delta = {n: after[n] - task.params[n] for n in task.params}
            wire = feedback[task.client_id].compress(delta)
            env, payload = encode_result(
                ClientResult(task.client_id, rnd, len(data[task.client_id][1]), wire)
            )
            got = decode_or_failure(env, payload)
            assert isinstance(got, ClientResult)
            results.append(decompress_result(got, TopKCompressor(1.0), spec_of(task.params)))
        assert strategy.aggregate(rnd, results, []) is not None
    np.testing.assert_allclose(strategy.global_params["w"], [2.0, -1.0, 0.5], atol=0.01)
    # λ = 0: each round the head moves by delta/N = 1/3; ten rounds -> 10/3
    np.testing.assert_allclose(strategy.params_for("small")["head"], [10 / 3], atol=1e-12)
