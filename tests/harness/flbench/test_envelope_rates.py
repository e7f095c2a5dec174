"""The bench's envelope counts: the pooled, hub and federated envelopes (over the validation images and over
each clinic's analysed images), each place embedded once."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck
from export.envelope import fit_envelope, fit_intensity_envelope
from harness.flbench.datasets import BenchData
from harness.flbench.envelope_rates import envelope_rates, federated_envelope
from hub.rounds.envelope_influence import INFLUENCE_WARNING
from hub.training.datasets import ClinicData

#: A fixed projection of each image's 7 × 7 mean-pooled grey values: a small, smooth embedding.
_PROJECTION = torch.from_numpy(np.random.default_rng(5).normal(size=(49, 6)).astype(np.float32))


class _Embed:
    """A deterministic embedder that counts the images it is given (each place is embedded once)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        self.calls.append(len(x))
        pooled = torch.nn.functional.avg_pool2d(x, 4).reshape(len(x), -1)  # (N, 49)
        return torch.tanh(2.0 * (pooled - 0.4) @ _PROJECTION).numpy().astype(np.float64)


def _images(n: int, seed: int, brightness: float) -> torch.Tensor:
    """(n, 1, 28, 28) in [0, 1]: a dark background, a brighter square of random size, noise."""
    gen = torch.Generator().manual_seed(seed)
    x = brightness + 0.15 * torch.rand(n, 1, 28, 28, generator=gen)
    for i in range(n):
        side = int(torch.randint(6, 16, (1,), generator=gen))
        x[i, :, 14 - side // 2 : 14 + side // 2, 10:20] += 0.3 + 0.2 * float(torch.rand(1, generator=gen))
    return x.clamp(0.0, 1.0)


def _data(val_sizes: dict[str, int]) -> BenchData:
    """A BenchData-like setting: each clinic its own brightness, test and validation splits."""
    clinics = {}
    for k, (c, n_val) in enumerate(val_sizes.items()):
        b = 0.15 + 0.05 * k
        x = _images(30, seed=10 * k, brightness=b)
        y = (torch.arange(30) % 2).float()
        val_x = _images(n_val, seed=10 * k + 1, brightness=b)
        clinics[c] = ClinicData(c, x, y, _images(25, seed=10 * k + 2, brightness=b), y[:25], val_x, y[:n_val])
    unseen = _images(40, seed=99, brightness=0.3)
    return BenchData(
        task="pneumonia",
        skew="combined",
        seed=0,
        clinics=clinics,
        unseen_x=unseen,
        unseen_y=(torch.arange(40) % 2).float(),
        public_x=unseen[:4],
        public_y=torch.zeros(4),
        names=tuple(val_sizes),
        small=tuple(val_sizes)[-1:],
        panel={"inverted": 1.0 - unseen, "dark": 0.5 * unseen},
        hub_val_x=_images(50, seed=77, brightness=0.2),
    )


def _per_clinic(data: BenchData, embed: _Embed) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    images = {c: d.val_x for c, d in data.clinics.items()}
    return {c: embed(x) for c, x in images.items()}, images


def test_the_federated_envelope_is_the_pooled_fit_over_the_same_images() -> None:
    # Every clinic holds at least 5 × MIN_FOLD_IMAGES images, so each fills all five folds (a smaller node
    # deals its images over fewer: its held-out distances are then from an envelope fitted mostly without
    # its own images, and the threshold comes out larger than the pooled fit's, whose folds are row-wise).
    data = _data({"A": 100, "B": 60, "C": 50})
    embed = _Embed()
    embeddings, images = _per_clinic(data, embed)
    fed = federated_envelope(embeddings, images, 0.99)
    assert fed.nodes == ("A", "B", "C") and fed.images == 210 and fed.envelope is not None
    pooled_x, _ = data.pooled_val()
    pooled = fit_envelope(np.concatenate(list(embeddings.values())), quantile=0.99)
    grey = fit_intensity_envelope(pooled_x[:, 0].numpy(), quantile=0.99, copies=0)
    assert fed.envelope.intensity is not None
    for got, want in ((fed.envelope, pooled), (fed.envelope.intensity, grey)):
        # The sums add up: the same mean, shrinkage and whitening as the exporter's fit on the pooled rows.
        np.testing.assert_allclose(got.mean, want.mean, rtol=0, atol=1e-8)
        np.testing.assert_allclose(got.whitening, want.whitening, rtol=0, atol=1e-8)
        assert got.shrinkage == pytest.approx(want.shrinkage, abs=1e-8)
        assert got.fitted_on == want.fitted_on == 210 and got.folds == want.folds
        # The folds are dealt differently (hashed per node; the row index there): near, not equal.
        assert 0.7 <= got.threshold / want.threshold <= 1.4, (got.threshold, want.threshold)
    assert fed.envelope.intensity.augmented_copies == 0


def test_a_clinic_with_nine_validation_images_sends_nothing() -> None:
    data = _data({"A": 30, "B": 20, "C": 12, "D": 9})
    embed = _Embed()
    embeddings, images = _per_clinic(data, embed)
    fed = federated_envelope(embeddings, images, 0.99)
    assert fed.nodes == ("A", "B", "C") and fed.images == 62 and fed.envelope is not None
    sent = fit_envelope(np.concatenate([embeddings[c] for c in "ABC"]), quantile=0.99)
    np.testing.assert_allclose(fed.envelope.mean, sent.mean, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fed.envelope.whitening, sent.whitening, rtol=0, atol=1e-8)
    out = envelope_rates(data, _Embed())
    assert out["federated"]["nodes"] == 3 and out["federated"]["images"] == 62
    assert set(out["federated"]["clinics"]) == set("ABCD")  # D's test images are still counted


def test_too_few_images_over_the_nodes_fit_no_federated_envelope() -> None:
    data = _data({"A": 30, "B": 9, "C": 9})  # 30 < 40 images sent: the hub fits nothing
    fed = federated_envelope(*_per_clinic(data, _Embed()), 0.99)
    assert fed.envelope is None and fed.nodes == ("A",) and fed.images == 30
    out = envelope_rates(data, _Embed())
    assert out["federated"] == {"nodes": 1, "images": 30, "influence": {}, "warned": []}
    assert "clinics" in out and "hub" in out  # the other two are counted as ever


def _judged(check: EnvelopeCheck, grey: IntensityCheck, e: np.ndarray, x: torch.Tensor) -> dict[str, int]:
    """The counting rule as the node applies it: outside either part; ``negative`` from ``judge``."""
    embedding = check.outside(e)
    seen = grey.judge(x[:, 0].numpy())
    return {
        "outside": int((embedding | seen.outside).sum()),
        "n": len(x),
        "embedding": int(embedding.sum()),
        "intensity": int(seen.outside.sum()),
        "negative": int(seen.negative.sum()),
    }


def _expected(data: BenchData, embed: _Embed, check: EnvelopeCheck, grey: IntensityCheck) -> dict[str, Any]:
    def count(x: torch.Tensor) -> dict[str, int]:
        return _judged(check, grey, embed(x), x)

    return {
        "clinics": {c: count(data.clinics[c].test_x) for c in data.names},
        "unseen": count(data.unseen_x),
        "panel": {n: count(x) for n, x in data.panel.items()},
    }


def test_every_place_is_embedded_once_and_judged_by_all_three_envelopes() -> None:
    data = _data({"A": 30, "B": 20, "C": 12, "D": 9})
    embed = _Embed()
    out = envelope_rates(data, embed, quantile=0.95)
    # The pooled validation split, the hub's, then each place's test images: one call each.
    places = [len(data.clinics[c].test_x) for c in data.names] + [40, 40, 40]
    assert sorted(embed.calls) == sorted([71, 50, *places])

    ref = _Embed()
    val_x, _ = data.pooled_val()
    pooled = fit_envelope(ref(val_x), quantile=0.95)
    pooled_grey = fit_intensity_envelope(val_x[:, 0].numpy(), quantile=0.95, copies=0)
    assert data.hub_val_x is not None
    hub = fit_envelope(ref(data.hub_val_x), quantile=0.95)
    hub_grey = fit_intensity_envelope(data.hub_val_x[:, 0].numpy(), quantile=0.95)
    fed = federated_envelope(*_per_clinic(data, ref), 0.95)
    assert fed.envelope is not None and fed.envelope.intensity is not None

    # The keys and counts of the pooled and hub envelopes are what they were (each place judged apart).
    want = _expected(data, ref, EnvelopeCheck.of(pooled), IntensityCheck.of(pooled_grey))
    assert {k: out[k] for k in want} == want and out["quantile"] == 0.95
    assert out["thresholds"] == {"embedding": pooled.threshold, "intensity": pooled_grey.threshold}
    assert out["hub"] == _expected(data, ref, EnvelopeCheck.of(hub), IntensityCheck.of(hub_grey))
    federated = _expected(
        data, ref, EnvelopeCheck.of(fed.envelope), IntensityCheck.of(fed.envelope.intensity)
    )
    assert out["federated"] == {
        "nodes": 3,
        "images": 62,
        "influence": fed.influence,
        "warned": list(fed.warned),
        **federated,
        "thresholds": {"embedding": fed.envelope.threshold, "intensity": fed.envelope.intensity.threshold},
    }
    # The inverted panel lies outside the grey-value part and looks negative: the rule is exercised.
    assert out["panel"]["inverted"]["negative"] > 0
    assert out["federated"]["panel"]["inverted"]["negative"] > 0


def test_the_rounds_over_each_clinics_analysed_images_take_in_every_clinic() -> None:
    """``traffic``: the rounds over what each clinic analysed, so the clinic with nine validation images
    takes part too; its fit is ``federated_envelope`` over those images, and it judges every place."""
    data = _data({"A": 30, "B": 20, "C": 12, "D": 9})
    traffic = {c: _images(40, seed=200 + k, brightness=0.15 + 0.05 * k) for k, c in enumerate(data.names)}
    data = replace(data, traffic_x=traffic)
    out = envelope_rates(data, _Embed(), quantile=0.95)
    ref = _Embed()
    fit = federated_envelope({c: ref(x) for c, x in traffic.items()}, traffic, 0.95)
    assert (
        fit.nodes == ("A", "B", "C", "D") and fit.envelope is not None and fit.envelope.intensity is not None
    )
    assert set(fit.influence) == set("ABCD")
    assert out["traffic"] == {
        "nodes": 4,
        "images": 160,
        "influence": fit.influence,
        "warned": list(fit.warned),
        **_expected(data, ref, EnvelopeCheck.of(fit.envelope), IntensityCheck.of(fit.envelope.intensity)),
        "thresholds": {"embedding": fit.envelope.threshold, "intensity": fit.envelope.intensity.threshold},
    }
    assert out["federated"]["nodes"] == 3  # the validation images' rounds leave D out, as before
    # One hostile node (every clinic analysed 40: the first by name) answers as if spread 3 times wider:
    # its sums pass the hub's checks, widen the fit, and `envelope build` names it.
    hostile = out["traffic_hostile"]
    assert hostile["hostile"] == "A" and "A" in hostile["warned"] and "A" not in out["traffic"]["warned"]

    def factors(fit: dict[str, Any]) -> list[float]:
        return [f for kind in ("threshold", "spread") for f in fit["influence"]["A"][kind].values()]

    assert max(factors(hostile)) >= INFLUENCE_WARNING
    assert all(1 / INFLUENCE_WARNING < f < INFLUENCE_WARNING for f in factors(out["traffic"]))
