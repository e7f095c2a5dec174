"""Must-show 4: the hub is down during a round; every clinic keeps answering its PACS, and each node's update
reaches the hub exactly once after it returns.

Real processes: ``fedclinic-hub serve`` over HTTPS (SQLite), three clinics each with an Orthanc PACS and a
``fedclinic-edge serve`` node enrolled with a join code. The outage is the issue's two minutes (kill -9 of
the hub); the nodes' retry backoff is capped at a minute, so each is back within a minute of the hub's return.
The round is opened while the hub is down (the operator's CLI writes to the hub's store, not through the
API), so no node can have its task before the outage: every update goes after the hub returns.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from export.signing import load_private_key
from harness.demo.clinic import Clinic
from harness.demo.hub import HubService
from harness.demo.orthanc import orthanc_available
from harness.demo.traffic import send_studies
from hub.data.medmnist import load_medmnist
from tests.e2e.federation import signed_bundle, wait_for
from tests.edge_node.conftest import require_test_bundle

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed (apt-get install orthanc)"),
]

NAMES = ("clinic-north", "clinic-south", "clinic-east")
#: Two minutes down, as the issue states; the checks below run inside them.
OUTAGE_S = 120.0
#: How long before the hub returns the PACS send their last studies of the outage.
LATE_STUDY_S = 20.0


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[HubService, dict[str, Clinic]]]:
    found = require_test_bundle()
    hub = HubService(tmp_path / "hub").init()
    clinics: dict[str, Clinic] = {}
    try:
        hub.start()
        for i, name in enumerate(NAMES):
            code = hub.join_code(name)
            clinics[name] = Clinic(
                workdir=tmp_path / name, join_code=code, ae_title=f"EDGE{i + 1}", quiet_seconds=1.0
            ).start()
        key = load_private_key(hub.data_dir / "keys" / "hub.key")
        bundle = signed_bundle(found.bundle, tmp_path / "bundle", key, version="1.0.0")
        hub.publish(bundle)
        for name, clinic in clinics.items():

            def serves_1_0_0(c: Clinic = clinic) -> bool:
                return (c.edge.status(limit=1)["model"] or {}).get("version") == "1.0.0"

            wait_for(f"{name} to serve 1.0.0", serves_1_0_0, timeout=120, every=1.0)
        yield hub, clinics
    finally:
        for clinic in clinics.values():
            clinic.stop()
        hub.stop()


@pytest.mark.timeout(900)
def test_hub_down_during_a_round_nodes_serve_their_pacs_and_each_update_arrives_once(
    federation: tuple[HubService, dict[str, Clinic]], tmp_path: Path
) -> None:
    hub, clinics = federation
    images = load_medmnist("pneumoniamnist", "test")
    hub.stop(signal.SIGKILL)
    down_at = time.monotonic()
    started = hub.start_round(
        "stats", "--config", "num_classes=2", "-k", str(len(NAMES)), "--deadline", "600"
    )
    round_id = started["round_id"]
    assert len(started["nodes"]) == len(NAMES)

    def each_pacs_sends_a_study(first: int, tag: str) -> None:
        # The nodes never need the hub for this: the study goes PACS → node → SR back in the PACS.
        for i, (name, clinic) in enumerate(clinics.items()):
            sent = send_studies(
                clinic,
                images.images[first + i : first + i + 1],
                images.labels,
                tmp_path / tag / name,
                tag=tag,
                timeout=120,
            )
            assert len(sent) == 1 and 0.0 <= sent[0].score <= 1.0, (name, tag)

    each_pacs_sends_a_study(0, "outage-start")
    # And each node says the hub is unreachable (it noticed the outage; nothing was answered yet).
    for name, clinic in clinics.items():

        def reports_hub_unreachable(c: Clinic = clinic) -> bool:
            return "hub unreachable" in c.edge.cli("status").stdout

        wait_for(f"{name} to report the hub unreachable", reports_hub_unreachable, timeout=90, every=1.0)
        assert clinic.edge.updates()["updates"] == []
    assert hub.round_status(round_id)["accepted"] == 0
    # Late in the outage, with every node's retries long since at their cap, each PACS is still answered.
    time.sleep(max(0.0, OUTAGE_S - LATE_STUDY_S - (time.monotonic() - down_at)))
    each_pacs_sends_a_study(len(NAMES), "outage-end")
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    assert all(clinic.edge.updates()["updates"] == [] for clinic in clinics.values())

    hub.start()
    done = hub.wait_round(round_id, timeout=240)
    assert done["state"] == "published", done
    assert done["accepted"] == len(NAMES) and done["missing"] == 0
    for name, clinic in clinics.items():
        rows = [u for u in clinic.edge.updates()["updates"] if u["round"] == started["round"]]
        # Exactly one update left each clinic for this round, and the hub took it (a second copy would have
        # been refused by the hub and listed here as refused).
        assert [u["state"] for u in rows] == ["sent"], (name, rows)
        assert clinic.edge.alive()
