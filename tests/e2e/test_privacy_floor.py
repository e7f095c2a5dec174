"""The clinic's privacy floor over the wire: real hub and node processes over HTTPS on loopback.

Must-shows (issue 11, 3): a node whose floor requires secure aggregation refuses a plain round; a node whose
minimum cohort is larger than the round gets its refusal recorded at the hub with the reason, visible in
``fedclinic-hub rounds status --format json``; a refusal counts as a failure for k-of-n; the node that
takes part charges its privacy ledger before its update leaves.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.federation import enroll, make_hub, make_node, wait_for

pytestmark = pytest.mark.slow

#: Each clinic's [privacy] table in its edge.toml.
FLOORS = {
    "clinic-strict": "require_secure_aggregation = true\n",
    "clinic-big": "min_cohort = 4\n",
    "clinic-plain": "min_cohort = 3\n",
}


@pytest.mark.timeout(600)
def test_nodes_refuse_rounds_below_their_floor_and_the_hub_records_why(tmp_path: Path) -> None:
    hub = make_hub(tmp_path / "hub")
    hub.start()
    nodes = {}
    try:
        for name, floor in FLOORS.items():
            node = make_node(tmp_path, name)
            with node.config.open("a") as config:
                config.write("\n[privacy]\n" + floor)
            enroll(hub, node, name)
            node.start()
            nodes[name] = node
        ids = {name: info["node_id"] for name, info in hub.nodes().items()}
        wait_for("three heartbeats", lambda: all(n["last_heartbeat"] for n in hub.nodes().values()))

        started = hub.cli_json(
            "rounds",
            "start",
            "--strategy",
            "stats",
            "--config",
            "num_classes=2",
            "-k",
            "2",
            "--deadline",
            "60",
        )

        def status() -> dict[str, Any]:
            # `rounds status` exits 2 for a failed round; its JSON is still the round.
            shown = hub.cli("rounds", "status", started["round_id"], "--format", "json", check=False)
            return dict(json.loads(shown.stdout))

        done = wait_for("the round to end", lambda: (r := status())["state"] in ("published", "failed") and r)
        # Two refusals before the deadline end the round at once: one accepted update is below k = 2.
        assert done["state"] == "failed", done
        assert "1 of the 2 results required" in done["reason"] and "2 refused" in done["reason"]
        assert done["accepted"] == 1 and done["missing"] == 2
        reasons = {r["node_id"]: r["reason"] for r in done["refusals"]}
        assert set(reasons) == {ids["clinic-strict"], ids["clinic-big"]}
        assert "only under secure aggregation" in reasons[ids["clinic-strict"]]
        assert "asks 3 clinics" in reasons[ids["clinic-big"]] and "at least 4" in reasons[ids["clinic-big"]]
        # The hub stated the round's size to every node; the plain round states no protection.
        assert done["protection"] is None

        # The node that took part charged its ledger; the ones that refused computed and spent nothing.
        def ledger(name: str) -> list[tuple[Any, ...]]:
            path = nodes[name].data_dir / "privacy-ledger.sqlite3"
            if not path.exists():
                return []
            with sqlite3.connect(path) as db:
                return list(db.execute("SELECT round, kind, payload_bytes, noise_multiplier FROM releases"))

        (entry,) = ledger("clinic-plain")
        assert entry[0] == done["round"] and entry[1] == "stats" and entry[2] > 0 and entry[3] is None
        assert ledger("clinic-strict") == [] and ledger("clinic-big") == []

        # A round that states clipping and noise carries it to the nodes, and the status shows it.
        protected = hub.cli_json(
            "rounds", "start", "--strategy", "stats", "--config", "num_classes=2",
            "--clip", "1000", "--epsilon", "8", "--deadline", "60",
        )  # fmt: skip
        assert protected["protection"]["epsilon"] == 8 and protected["protection"]["clip_norm"] == 1000
        started = protected
        second = wait_for(  # past "aggregating", which a poll can catch between collecting and the end
            "the protected round to end",
            lambda: (r := status())["state"] in ("published", "failed") and r,
        )
        assert second["state"] == "published" and second["accepted"] == 1, second
        assert {r["node_id"] for r in second["refusals"]} == {ids["clinic-strict"], ids["clinic-big"]}
        # Its update carried noise calibrated to epsilon 8, and the ledger says so.
        _plain, noised = ledger("clinic-plain")
        assert noised[0] == second["round"] and noised[3] is not None and noised[3] > 0
        # `fedclinic-edge updates` shows both: kind, measured bytes, round, hub, privacy spent.
        shown = nodes["clinic-plain"].cli("updates", "--format", "json")
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert report["hub_url"] == hub.url
        rows = report["updates"]
        assert [(r["round"], r["kind"], r["state"]) for r in rows] == [
            (done["round"], "stats", "sent"),
            (second["round"], "stats", "sent"),
        ]
        assert [r["payload_bytes"] for r in rows] == [entry[2], noised[2]]
        assert rows[0]["noise_multiplier"] is None and rows[1]["epsilon"] == 8
        assert report["privacy"]["unbounded"] is True  # the first, plain round carried no noise
        text = nodes["clinic-plain"].cli("updates")
        assert text.returncode == 0 and "2 updates left this clinic" in text.stdout
        assert "no noise" in text.stdout and "ε 8" in text.stdout
        empty = nodes["clinic-strict"].cli("updates", "--format", "json")
        assert json.loads(empty.stdout)["updates"] == []
        refused = hub.cli(
            "rounds",
            "start",
            "--strategy",
            "stats",
            "--config",
            "num_classes=2",
            "--epsilon",
            "8",
            check=False,
        )
        assert refused.returncode != 0 and "clip_norm" in refused.stdout + refused.stderr
    finally:
        for node in nodes.values():
            if node.alive():
                node.stop()
        hub.stop()
