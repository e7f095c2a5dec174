"""The hub's node-by-node reading of a training round (hub.fl.update_audit) on updates made to look like a
round's: honest clinics whose updates share a small common direction in a lot of noise, as measured on the
benchmark (their pairwise cosines lie around 0), and hostile ones that flip or scale theirs."""

from __future__ import annotations

import numpy as np
import pytest

from hub.fl.aggregate import norm_filtered_mean, weighted_mean, within_norm_filter
from hub.fl.errors import AggregationError, StrategyConfigError
from hub.fl.registry import make_strategy
from hub.fl.robust import Robust, audited_weighted_mean, norm_filtered_weighted_mean
from hub.fl.strategy import Params
from hub.fl.update_audit import CONTESTED, MIN_NODES, SHORT, UpdateAudit, audit_updates
from hub.fl.validation import l2_norm

DIM = 2_000
COMMON = np.random.default_rng(99).normal(size=DIM)


def honest(seed: int, scale: float = 1.0, noise: float = 1.5) -> Params:
    """A clinic's update: the round's common direction plus ``noise`` times as much noise of its own
    (pairwise cosines about 0.3 at 1.5, within what the benchmark measured in a healthy round; about 0.8 at
    0.5, as in a round after a hostile one, when every honest clinic corrects the same damage), split over
    three tensors (a head's weight and bias among them), with an integer counter beside them."""
    rng = np.random.default_rng(seed)
    flat = scale * (COMMON + noise * rng.normal(size=DIM))
    return {
        "conv.weight": flat[:1_500].reshape(30, 50).astype(np.float32),
        "fc.weight": flat[1_500:1_990].reshape(10, 49).astype(np.float32),
        "fc.bias": flat[1_990:].astype(np.float32),
        "norm.num_batches_tracked": np.array(seed * 1_000, dtype=np.int64),  # not part of any norm
    }


def scaled(update: Params, factor: float) -> Params:
    return {k: (factor * a).astype(a.dtype) if a.dtype.kind == "f" else a for k, a in update.items()}


def round_of(counts: dict[str, int], noise: float = 1.5, **lies: float) -> dict[str, tuple[Params, int]]:
    """Each node's honest update (larger clinics take more steps: norm ∝ √images), with ``lies`` scaling
    some of them (−1: sign-flipped at its own norm)."""
    out = {}
    for k, (node, n) in enumerate(sorted(counts.items())):
        update = honest(k, scale=float(np.sqrt(n / 100)), noise=noise)
        out[node] = (scaled(update, lies[node]) if node in lies else update, n)
    return out


def figure(audit: UpdateAudit, key: str) -> dict[str, float]:
    """Node → one of its figures (``keeps``, ``agreement``, ``norm_ratio``), each of which must be there."""
    out = {n.node_id: getattr(n, key) for n in audit.nodes}
    assert all(isinstance(v, float) for v in out.values()), out
    return out


SIX = {"A": 2_000, "B": 700, "C": 70, "D": 60, "E": 40, "F": 25}


def test_honest_clinics_are_not_named_and_the_largest_moves_the_mean_most() -> None:
    audit = audit_updates(round_of(SIX))
    assert audit.named() == []
    by = {n.node_id: n for n in audit.nodes}
    assert [n.node_id for n in audit.nodes] == sorted(SIX)
    assert sum(n.share for n in audit.nodes) == pytest.approx(1.0)
    assert by["A"].share == pytest.approx(2_000 / 2_895)
    keeps = figure(audit, "keeps")
    # The hospital with most images turns the mean most, and still not round; the small ones barely.
    assert 0.0 < keeps["A"] < min(v for k, v in keeps.items() if k != "A")
    assert min(keeps[k] for k in "CDEF") > 0.99
    # Pairwise agreement is the same modest figure for everyone.
    assert all(0.2 < v < 0.4 for v in figure(audit, "agreement").values())
    # The two largest honest updates are beyond the norm filter's bound: the filter would drop them.
    assert [n.node_id for n in audit.dropped()] == ["A", "B"] and figure(audit, "norm_ratio")["A"] > 5.0


def test_a_large_node_that_flips_its_update_is_named_at_its_own_norm() -> None:
    flipped = audit_updates(round_of(SIX, A=-1.0))
    (named,) = flipped.named()
    node, reason = named
    assert node.node_id == "A" and node.keeps is not None and node.keeps < 0
    assert "point the other way" in reason
    # Its norm is unchanged, so norms alone do not tell it from the honest round.
    assert node.norm == pytest.approx(audit_updates(round_of(SIX)).nodes[0].norm)


def test_a_small_node_s_update_too_long_for_its_size_is_named_before_it_turns_the_mean() -> None:
    # ×−10 at 1 % of the images moves FedAvg's mean a little (no turn), but is ten times too long for 40
    # images: named for its length (the scale-blind norm filter drops it too).
    quiet = audit_updates(round_of(SIX, E=-10.0))
    ((node, reason),) = quiet.named()
    assert node.node_id == "E" and node.keeps is not None and node.keeps > 0.9
    assert node.norm_for_size == pytest.approx(10.0, rel=0.15) and "as long as the round's" in reason
    assert [n.node_id for n in quiet.left_out()] == ["E"]
    assert [n.node_id for n in quiet.dropped()] == ["E"]
    # Honest clinics' updates are about as long as their size makes them: the hospital's too.
    sizes = figure(audit_updates(round_of(SIX)), "norm_for_size")
    assert all(0.5 < v < 1.6 for v in sizes.values()), sizes
    # ×−5000 turns it round as well: both reasons.
    loud = audit_updates(round_of(SIX, E=-5_000.0))
    ((node, reason),) = loud.named()
    assert node.node_id == "E" and "point the other way" in reason and "as long as" in reason
    # A node that claims no images has no size to compare with, and no weight in the mean.
    zero = audit_updates({**round_of(SIX), "G": (scaled(honest(9), 100.0), 0)})
    (g,) = [n for n in zero.nodes if n.node_id == "G"]
    assert g.norm_for_size is None and g.share == 0.0 and zero.named() == []


def test_a_node_that_claims_far_more_images_than_its_update_shows_is_named() -> None:
    updates = round_of(SIX)
    f_update, f_images = updates["F"]
    # A count lie: F's honest update, claimed for 100× its images (46 % of the round's weight).
    inflated = audit_updates({**updates, "F": (f_update, 100 * f_images)})
    # A free rider: 1,000× its images claimed (90 % of the weight), next to nothing sent; FedAvg's mean
    # all but stops.
    rider = audit_updates({**updates, "F": (scaled(f_update, 0.01), 1_000 * f_images)})
    for audit, share in ((inflated, 0.45), (rider, 0.89)):
        f = {n.node_id: n for n in audit.nodes}["F"]
        # Neither turns the mean, so keeps is silent; the length for its size is not.
        assert f.keeps is not None and f.keeps > 0.9 and f.share > share
        assert f.norm_for_size is not None and f.norm_for_size <= SHORT
        ((node, reason),) = audit.named()
        assert node is f and "claims far more images than its update shows" in reason
        assert f"{f.share:.0%} of the round's weight" in reason
        assert [n.node_id for n in audit.left_out()] == ["F"]
    # A lie of 4× reads half as long as the round's for its size: within what honest clinics read.
    assert audit_updates({**updates, "F": (f_update, 4 * f_images)}).named() == []
    # The audited mean is FedAvg without the free rider; FedAvg's own mean is a tenth of it.
    params = [updates[k][0] for k in "ABCDE"] + [scaled(f_update, 0.01)]
    weights = [float(updates[k][1]) for k in "ABCDE"] + [1_000.0 * f_images]
    honest_mean = weighted_mean(params[:5], weights[:5])["fc.bias"]
    np.testing.assert_allclose(audited_weighted_mean(params, weights)["fc.bias"], honest_mean, rtol=1e-5)
    frozen = weighted_mean(params, weights)["fc.bias"]
    assert np.linalg.norm(frozen) < 0.15 * np.linalg.norm(honest_mean)


def test_where_the_nodes_clipped_their_updates_the_length_rules_name_nobody() -> None:
    # Clipped at the round's median norm, the hospital's long update reads short for the images it claims.
    updates = round_of(SIX)
    clip = float(np.median([l2_norm(u) for u, _ in updates.values()]))
    clipped = {node: (scaled(u, min(1.0, clip / l2_norm(u))), n) for node, (u, n) in updates.items()}
    audit = audit_updates(clipped)
    assert [n.node_id for n, _ in audit.named()] == ["A"]  # an honest hospital, "too short"
    assert audit.named(sizes=False) == [] and audit.left_out(sizes=False) == []


def test_of_two_large_nodes_pulling_apart_the_one_the_others_disagree_with_is_named() -> None:
    counts = {"A": 1_000, "B": 1_000, "C": 60, "D": 60, "E": 60, "F": 60}
    assert audit_updates(round_of(counts, noise=0.5)).named() == []
    audit = audit_updates(round_of(counts, noise=0.5, A=-1.0))
    keeps, agreement = figure(audit, "keeps"), figure(audit, "agreement")
    # Neither turns the mean round alone, both pull it more than 60°.
    assert all(0.0 <= keeps[x] < CONTESTED for x in "AB")
    ((node, reason),) = audit.named()
    assert node.node_id == "A" and "agrees least" in reason and "B" in reason
    assert agreement["A"] < 0 < agreement["B"]


def test_fewer_than_three_nodes_name_nobody() -> None:
    assert MIN_NODES == 3
    pair = audit_updates(round_of({"A": 100, "B": 100}, A=-5.0))
    assert pair.named() == [] and all(n.keeps is not None for n in pair.nodes)
    (alone,) = audit_updates(round_of({"A": 100})).nodes
    assert alone.agreement is None and alone.keeps is None and alone.share == 1.0


def test_the_norm_filter_drops_exactly_what_the_reading_says_it_drops() -> None:
    updates = round_of(SIX, B=-30.0)
    audit = audit_updates(updates)
    assert [n.node_id for n, _ in audit.named()] == ["B"]
    kept = [node for node, n in zip(sorted(updates), audit.nodes, strict=True) if n.within_filter]
    params = [updates[k][0] for k in sorted(updates)]
    weights = [float(updates[k][1]) for k in sorted(updates)]
    assert {n.node_id for n in audit.dropped()} == {"A", "B"}
    expected = np.mean([updates[k][0]["fc.bias"].astype(np.float64) for k in kept], axis=0)
    np.testing.assert_allclose(norm_filtered_mean(params)["fc.bias"], expected, rtol=1e-5)
    w = np.array([updates[k][1] for k in kept], dtype=np.float64)
    weighted = sum(wk * updates[k][0]["fc.bias"].astype(np.float64) for wk, k in zip(w, kept, strict=True))
    np.testing.assert_allclose(
        norm_filtered_weighted_mean(params, weights)["fc.bias"], weighted / w.sum(), rtol=1e-5
    )
    assert within_norm_filter([1.0, 1.0, 1.0, 3.0, 3.01], 3.0) == [True] * 4 + [False]  # the bound is kept
    with pytest.raises(AggregationError, match="factor must be >= 1"):
        within_norm_filter([1.0], 0.5)


def test_updates_that_cannot_be_read_together_are_refused() -> None:
    with pytest.raises(AggregationError, match="no updates"):
        audit_updates({})
    short = {"w": np.zeros(3, np.float32)}
    with pytest.raises(AggregationError, match="differ in size"):
        audit_updates({"a": (honest(0), 10), "b": (short, 10)})
    broken = {**honest(1), "conv.weight": np.full((30, 50), np.nan, np.float32)}
    with pytest.raises(AggregationError, match="non-finite"):
        audit_updates({"a": (honest(0), 10), "b": (broken, 10)})
    # No images claimed by anyone: every node weighs alike, as under FedAvg.
    audit = audit_updates({k: (honest(i), 0) for i, k in enumerate("abc")})
    assert [n.share for n in audit.nodes] == pytest.approx([1 / 3] * 3) and audit.named() == []


def test_the_audited_mean_is_fedavg_without_the_named_updates() -> None:
    strategy = make_strategy("fedavg", robust="audited")
    assert isinstance(strategy, Robust) and strategy.method == "audited"

    def fedavg(updates: dict[str, tuple[Params, int]], nodes: str) -> np.ndarray:
        """FedAvg's weighted mean of these nodes' ``fc.bias``."""
        w = np.array([updates[k][1] for k in nodes], dtype=np.float64)
        total = sum(wk * updates[k][0]["fc.bias"].astype(np.float64) for wk, k in zip(w, nodes, strict=True))
        return np.asarray(total / w.sum())

    for lies, kept in (({}, "ABCDEF"), ({"A": -1.0}, "BCDEF")):
        updates = round_of(SIX, **lies)
        mean = strategy.reduce(
            [updates[k][0] for k in sorted(updates)], [updates[k][1] for k in sorted(updates)]
        )
        np.testing.assert_allclose(mean["fc.bias"], fedavg(updates, kept), rtol=1e-5)
        assert mean["norm.num_batches_tracked"].dtype == np.int64  # counters averaged as FedAvg does
    # Of two equal clinics pulling apart, the one named for agreeing least stays in: the mean is FedAvg's.
    counts = {"A": 1_000, "B": 1_000, "C": 60, "D": 60, "E": 60, "F": 60}
    contested = round_of(counts, noise=0.5, A=-1.0)
    assert [n.node_id for n, _ in audit_updates(contested).named()] == ["A"]
    assert audit_updates(contested).left_out() == []
    mean = strategy.reduce([contested[k][0] for k in "ABCDEF"], [contested[k][1] for k in "ABCDEF"])
    np.testing.assert_allclose(mean["fc.bias"], fedavg(contested, "ABCDEF"), rtol=1e-5)
    # Unlike the norm filter, it keeps the honest hospital's long update.
    honest_round = round_of(SIX)
    params = [honest_round[k][0] for k in sorted(honest_round)]
    weights = [float(honest_round[k][1]) for k in sorted(honest_round)]
    filtered = norm_filtered_weighted_mean(params, weights)["fc.bias"]
    assert not np.allclose(filtered, fedavg(honest_round, "ABCDEF"), rtol=1e-3)
    with pytest.raises(AggregationError, match="weights"):
        audited_weighted_mean(params, weights[:2])


def test_the_audited_mean_refuses_the_head_rounds_it_was_not_measured_on() -> None:
    with pytest.raises(
        StrategyConfigError, match="robust=audited reads weights_delta rounds; head_avg sends"
    ):
        make_strategy("head_avg", robust="audited", head="fc.weight,fc.bias")
    assert isinstance(
        make_strategy("head_avg", robust="norm_filter_weighted", head="fc.weight,fc.bias"), Robust
    )
