"""What `envelope build` reads from each node's own answers: whose counts are left out, and how far each
node's counts alone move the thresholds (an honest federation of alike clinics, then one node whose counts
are made up to widen the envelope)."""

from __future__ import annotations

import numpy as np

from edge_node.protocol.envelope_moments import HISTOGRAM_BINS, histogram_quantile
from edge_node.protocol.envelope_rounds import (
    EMBEDDING,
    INTENSITY,
    EnvelopeRounds,
    added_up,
    fitted_envelope,
    held_out_params,
    node_histograms,
    node_moments,
)
from hub.rounds.envelope_influence import INFLUENCE_WARNING, audit_answers, thresholds_of

ROUNDS = EnvelopeRounds("chest", "1.0.0", embedding_dim=6, levels=(0.1, 0.5, 0.9), folds=5)
Q = 0.99


def _clinic(n: int, seed: int) -> tuple[list[str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    grey = np.sort(rng.uniform(size=(n, 3)), axis=1)
    return [f"2.25.{seed}.{i}" for i in range(n)], {EMBEDDING: rng.normal(size=(n, 6)), INTENSITY: grey}


Answers = dict[str, dict[str, np.ndarray]]


def _rounds(clinics: dict[str, tuple[list[str], dict[str, np.ndarray]]]) -> tuple[Answers, Answers]:
    sums = {c: node_moments(f, keys, ROUNDS) for c, (keys, f) in clinics.items()}
    params = held_out_params(added_up(list(sums.values())), ROUNDS)
    counts = {c: node_histograms(f, keys, ROUNDS, params) for c, (keys, f) in clinics.items()}
    return sums, counts


def test_alike_clinics_each_move_the_threshold_little() -> None:
    clinics = {f"n-{k}": _clinic(120, k) for k in range(4)}
    sums, counts = _rounds(clinics)
    audit = audit_answers(sums, counts, ROUNDS, Q)
    envelope = fitted_envelope(added_up(list(sums.values())), audit.histograms, ROUNDS, Q)
    thresholds = thresholds_of(envelope)
    assert [(n.node_id, n.images, n.counted) for n in audit.influence] == [
        (f"n-{k}", 120, 120) for k in range(4)
    ]
    for node in audit.influence:
        for part, without in node.threshold_without.items():
            rest = added_up([counts[c] for c in clinics if c != node.node_id])[f"{part}/histogram"]
            assert without == histogram_quantile(rest, ROUNDS.dims[part], Q)
            assert 1 / INFLUENCE_WARNING < thresholds[part] / without < INFLUENCE_WARNING
    assert audit.strong(thresholds) == [] and audit.without_sums == []


def test_made_up_counts_are_named_and_counts_without_sums_left_out() -> None:
    clinics = {f"n-{k}": _clinic(120, k) for k in range(3)}
    sums, counts = _rounds(clinics)
    # A node sums its 120 images honestly, then counts 30 of them far out in the tail.
    hostile = {name: value.copy() for name, value in counts["n-2"].items()}
    moved = hostile[f"{EMBEDDING}/histogram"]
    taken = 30
    for b in np.flatnonzero(moved)[:taken]:
        moved[HISTOGRAM_BINS - 5] += moved[b]
        moved[b] = 0
    counts["n-2"] = hostile
    # A node that refused the sums round but counted its distances.
    late_keys, late = _clinic(50, 9)
    params = held_out_params(added_up(list(sums.values())), ROUNDS)
    counts["n-late"] = node_histograms(late, late_keys, ROUNDS, params)

    audit = audit_answers(sums, counts, ROUNDS, Q)
    assert audit.without_sums == ["n-late"]
    np.testing.assert_array_equal(
        audit.histograms[f"{INTENSITY}/histogram"],
        added_up([counts[c] for c in clinics])[f"{INTENSITY}/histogram"],
    )
    envelope = fitted_envelope(added_up(list(sums.values())), audit.histograms, ROUNDS, Q)
    thresholds = thresholds_of(envelope)
    strong = audit.strong(thresholds)
    assert [(node, part) for node, part, _ in strong] == [("n-2", EMBEDDING)]
    assert strong[0][2] > 10.0  # the tail it made up lifts the threshold tenfold and more


def test_a_lone_node_is_the_whole_envelope_and_is_not_named() -> None:
    sums, counts = _rounds({"n-0": _clinic(120, 0)})
    audit = audit_answers(sums, counts, ROUNDS, Q)
    envelope = fitted_envelope(added_up(list(sums.values())), audit.histograms, ROUNDS, Q)
    (node,) = audit.influence
    assert node.threshold_without == {EMBEDDING: None, INTENSITY: None}
    assert node.widens == {EMBEDDING: None, INTENSITY: None}
    assert audit.named(thresholds_of(envelope)) == []


def test_build_says_when_a_federation_is_too_small_to_tell() -> None:
    from hub.commands.envelope import FEW_NODES, _audit_warnings

    wide_keys, wide = _clinic(120, 5)
    wide = {part: f.mean(axis=0) + 4.0 * (f - f.mean(axis=0)) for part, f in wide.items()}
    clinics = {"n-0": _clinic(120, 0), "n-1": _clinic(120, 1), "n-2": (wide_keys, wide)}
    sums, counts = _rounds(clinics)
    audit = audit_answers(sums, counts, ROUNDS, Q)
    envelope = fitted_envelope(added_up(list(sums.values())), audit.histograms, ROUNDS, Q)
    warnings = _audit_warnings(audit, envelope, {"n-2": "clinic-wide"})
    assert audit.named(thresholds_of(envelope)) == ["n-2"] and len(clinics) < FEW_NODES
    widened = "node clinic-wide (n-2): its sums alone widen the embedding fit"
    assert any(w.startswith(widened) and "`envelope start --exclude-node n-2`" in w for w in warnings)
    assert warnings[-1].startswith("with 3 nodes each is a large part of the envelope")
