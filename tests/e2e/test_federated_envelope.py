"""A bundle's input envelope refitted on the clinics' own images over real HTTPS: real hub and node processes.

Three clinics serve a bundle signed by the hub and analyse real pneumonia studies, each rendered by its own
scanner profile; two have enough of them, one has six. ``fedclinic-hub envelope start``, ``threshold`` and
``build --publish`` give a new signed version whose envelope must be the one computed directly from the
features the two clinics kept, and the nodes must move to it. The small clinic refuses both rounds, saying
why, and nothing of it reaches the fit.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from edge_node.protocol.bundle import verify_bundle
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
from edge_node.state.database import Database
from edge_node.state.envelope_features import envelope_features
from harness.flbench.profiles import CLINIC_PROFILES, render, to_unit
from hub.data.dicomize import dicomize_images
from hub.data.medmnist import load_medmnist
from tests.e2e.federation import (
    HubProcess,
    active_model,
    enroll,
    make_node,
    signed_bundle,
    wait_for,
)
from tests.edge_node.conftest import EdgeProcess, TrustedBundle, require_test_bundle

pytestmark = pytest.mark.slow

#: Studies each clinic analyses: two clinics with enough for the fit (at least 40 together), one with six.
STUDIES = {"clinic-north": 24, "clinic-south": 22, "clinic-small": 6}
PROFILES = {"clinic-north": "A", "clinic-south": "E", "clinic-small": "C"}


def _analysed(node: EdgeProcess) -> int:
    rows = node.query("SELECT COUNT(*) FROM envelope_results WHERE embedding IS NOT NULL")
    return int(str(rows[0][0]))


def _all_analysed(node: EdgeProcess, count: int) -> bool:
    return _analysed(node) >= count


def _published(hub: HubProcess, number: int) -> dict[str, object]:
    def probe() -> dict[str, object] | None:
        info = hub.cli_json("rounds", "status", str(number))
        return info if info["state"] in ("published", "failed") else None

    done = wait_for(f"round {number} to end", probe, timeout=240, every=1.0)
    assert done["state"] == "published", done
    return done


def test_the_federation_refits_the_envelope_on_its_own_images(
    hub: HubProcess, tmp_path: Path, shared_data: Path
) -> None:
    found: TrustedBundle = require_test_bundle()
    key = hub.signing_key()
    v1 = signed_bundle(found.bundle, tmp_path / "v1", key, version="1.0.0")
    hub_pub = tmp_path / "hub.pub"
    hub_pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    test = load_medmnist("pneumoniamnist", "test", shared_data)
    nodes: dict[str, EdgeProcess] = {}
    try:
        for i, (name, count) in enumerate(STUDIES.items()):
            node = make_node(tmp_path, name, trusted_keys=str(hub_pub))
            nodes[name] = node
            installed = node.cli("install-bundle", str(v1))
            assert installed.returncode == 0, installed.stderr
            enroll(hub, node, name)
            rng = np.random.default_rng(i)
            idx = rng.choice(test.labels.shape[0], count, replace=False)
            images = np.round(render(to_unit(test.images[idx]), CLINIC_PROFILES[PROFILES[name]], rng) * 255)
            written = dicomize_images(
                images.astype(np.uint8), node.root / "studies", dataset="pneumoniamnist", split="test"
            )
            # The studies come in as a clinic's archive does; the node analyses them like any others.
            with (node.root / "studies" / "labels.csv").open("w") as csv:
                csv.write("sop_instance_uid,label\n")
                csv.writelines(f"{w.sop_instance_uid},normal\n" for w in written)
            imported = node.cli("labels", "import", str(node.root / "studies"))
            assert imported.returncode == 0, imported.stdout + imported.stderr
            node.start()
        for name, node in nodes.items():
            wait_for(f"{name} to analyse its studies", partial(_all_analysed, node, STUDIES[name]), 180)

        started = hub.cli_json("envelope", "start", "--bundle", str(v1), "-k", "2", "--deadline", "600")
        assert started["strategy"] == "envelope_moments" and len(started["nodes"]) == 3
        moments = _published(hub, int(started["round"]))
        second = hub.cli_json("envelope", "threshold", "--round", str(started["round"]), "-k", "2")
        distances = _published(hub, int(second["round"]))
        for info in (moments, distances):
            refusals = info["refusals"]
            assert isinstance(refusals, list) and len(refusals) == 1
            refusal = refusals[0]
            assert refusal["node_id"] == hub.nodes()["clinic-small"]["node_id"]
            assert "analysed 6 images" in refusal["reason"] and "at least 10" in refusal["reason"]

        built = hub.cli_json(
            "envelope", "build", "--moments-round", str(started["round"]), "--distances-round",
            str(second["round"]), "--bundle", str(v1), "--out", str(tmp_path / "v2"), "--model-version",
            "1.1.0", "--publish",
        )  # fmt: skip
        assert built["nodes_moments"] == 2 and built["nodes_distances"] == 2
        # Each node's part, from its own answers: it counted the images it summed, and the threshold
        # without its counts is the one read from the other node's alone.
        assert sorted((n["name"], n["images"], n["counted"]) for n in built["nodes"]) == [
            (name, STUDIES[name], STUDIES[name]) for name in sorted(("clinic-north", "clinic-south"))
        ]
        assert all(t is not None and t > 0 for n in built["nodes"] for t in n["threshold_without"].values())
        assert built["counts_left_out"] == []
        # Two honest clinics of different scanners: each is half the envelope, so one may be named, and
        # the warning then says that with two nodes an honest clinic is named too.
        named = [w for w in built["warnings"] if "alone" in w]
        assert not named or built["warnings"][-1].startswith("with 2 nodes each is a large part")
        assert built["parts"]["embedding"]["fitted_on"] == 46

        # The same envelope, computed here from what the two clinics kept.
        manifest = verify_bundle(tmp_path / "v2", [key.public_key()]).manifest
        source = verify_bundle(v1, [key.public_key()]).manifest
        assert (
            source.head is not None and source.envelope is not None and source.envelope.intensity is not None
        )
        levels = tuple(source.envelope.intensity.levels)
        rounds = EnvelopeRounds(source.model_id, "1.0.0", source.head.embedding_dim, levels, folds=5)
        kept = {}
        for name in ("clinic-north", "clinic-south"):
            db = Database(nodes[name].data_dir / "edge.sqlite3")
            try:
                f = envelope_features(db, rounds.model_id, rounds.model_version)
            finally:
                db.close()
            assert f.intensity is not None
            kept[name] = (list(f.keys), {EMBEDDING: f.embedding, INTENSITY: f.intensity})
        summed_moments = added_up([node_moments(f, k, rounds) for k, f in kept.values()])
        params = held_out_params(summed_moments, rounds)
        summed_counts = added_up([node_histograms(f, k, rounds, params) for k, f in kept.values()])
        want = fitted_envelope(summed_moments, summed_counts, rounds, source.envelope.quantile)
        got = manifest.envelope
        assert got is not None and got.intensity is not None and want.intensity is not None
        for g, w in ((got, want), (got.intensity, want.intensity)):
            np.testing.assert_allclose(g.mean, w.mean, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(g.whitening, w.whitening, rtol=1e-7, atol=1e-9)
            assert (g.threshold, g.fitted_on) == (w.threshold, w.fitted_on)
        assert (manifest.model_version, manifest.provenance.round) == ("1.1.0", int(second["round"]))

        wait_for(
            "every node to serve 1.1.0",
            lambda: all((m := active_model(n)) and m[1] == "1.1.0" for n in nodes.values()),
            timeout=180,
        )
    finally:
        for node in nodes.values():
            if node.alive():
                node.stop()
