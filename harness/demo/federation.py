"""The demo's federation: a hub and four clinics as separate processes, driven as their operators would.

The hub is a ``fedclinic-hub serve`` over HTTPS with its SQLite store; each clinic is an Orthanc PACS and a
``fedclinic-edge serve`` node with its own data directory and DICOM port, enrolled with a join code. The demo
reads the clinics through their PACS and their node's CLI (``status`` / ``updates --format json``), the hub
through ``fedclinic-hub … --format json``; never through anyone's database.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from harness.demo.clinic import Clinic
from harness.demo.cohort import DATASET, ClinicSite
from harness.demo.hub import HubError, HubService
from harness.demo.traffic import SentStudy, send_studies
from hub.data.medmnist import LABELS
from hub.training.supervised import binary_auc

__all__ = ["ClinicOutcome", "Federation", "auc_of", "running_federation"]

T = TypeVar("T")


def auc_of(studies: Sequence[SentStudy]) -> float:
    return binary_auc(np.array([s.truth for s in studies]), np.array([s.score for s in studies]))


@dataclass
class ClinicOutcome:
    """What the final table says about one clinic."""

    site: ClinicSite
    own: list[SentStudy] = field(default_factory=list)
    before: list[SentStudy] = field(default_factory=list)
    after: list[SentStudy] = field(default_factory=list)
    studies_processed: int = 0
    labels: int = 0
    update_bytes: int = 0
    rounds_joined: int = 0

    @property
    def auc_before(self) -> float:
        return auc_of(self.before) if self.before else math.nan

    @property
    def auc_after(self) -> float:
        return auc_of(self.after) if self.after else math.nan

    @property
    def outside_after(self) -> int | None:
        """Held-out studies whose SR said the image lay outside the final model's input envelope (None: the
        model has none)."""
        said = [s.outside_envelope for s in self.after if s.outside_envelope is not None]
        return sum(said) if said else None


@dataclass
class Federation:
    hub: HubService
    clinics: dict[str, Clinic]  # by clinic name
    sites: dict[str, ClinicSite]

    def each(self, work: Callable[[str, Clinic], T]) -> dict[str, T]:
        """Run ``work`` for every clinic at once (the clinics are separate processes; this only waits)."""
        with ThreadPoolExecutor(max_workers=len(self.clinics)) as pool:
            futures = {name: pool.submit(work, name, clinic) for name, clinic in self.clinics.items()}
            return {name: f.result() for name, f in futures.items()}

    def model_versions(self) -> dict[str, str | None]:
        """The model each node serves, from ``fedclinic-edge status --format json``."""

        def version(_: str, clinic: Clinic) -> str | None:
            model = clinic.edge.status(limit=1)["model"]
            return None if model is None else str(model["version"])

        return self.each(version)

    def wait_all_serving(self, version: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            versions = self.model_versions()
            if set(versions.values()) == {version}:
                return
            if time.monotonic() > deadline:
                raise HubError(f"nodes serve {versions} after {timeout:.0f} s, not all {version}")
            time.sleep(1.0)

    def send(self, which: str, workdir: Path) -> dict[str, list[SentStudy]]:
        """Every PACS sends its own studies (``which='own'``) or its held-out studies; SRs come back."""

        def run(name: str, clinic: Clinic) -> list[SentStudy]:
            site = self.sites[name]
            images, labels = (
                (site.studies, site.study_labels) if which == "own" else (site.held_out, site.held_out_labels)
            )
            tag = f"{which}-{time.monotonic_ns()}"
            return send_studies(clinic, images, labels, workdir / name / tag, tag=which)

        return self.each(run)

    def updates(self) -> dict[str, list[dict[str, Any]]]:
        """Each node's ``fedclinic-edge updates --format json`` rows: what left the clinic."""

        def rows(_: str, clinic: Clinic) -> list[dict[str, Any]]:
            return list(clinic.edge.updates()["updates"])

        return self.each(rows)

    def label(self, chosen: dict[str, list[SentStudy]]) -> dict[str, int]:
        """A clinician confirms results: each study in ``chosen`` gets its true class as a label, through its
        node's clinician page API (``POST /api/labels``). Returns the labels each node then holds
        (``fedclinic-edge labels list --format json``)."""
        classes = LABELS[DATASET]

        def run(name: str, clinic: Clinic) -> int:
            with httpx.Client(base_url=clinic.page_url, timeout=30.0) as page:
                for study in chosen[name]:
                    answer = page.post(
                        "/api/labels",
                        json={"study_instance_uid": study.study_uid, "label": classes[study.truth]},
                    )
                    if answer.status_code != 200:
                        raise RuntimeError(f"{name}: POST /api/labels -> {answer.status_code}: {answer.text}")
            listed = clinic.edge.cli("labels", "list", "--format", "json")
            if listed.returncode != 0:
                raise RuntimeError(f"{name}: labels list failed:\n{listed.stdout}\n{listed.stderr}")
            return len(json.loads(listed.stdout)["labels"])

        return self.each(run)

    def processed(self) -> dict[str, int]:
        def done(_: str, clinic: Clinic) -> int:
            return int(clinic.edge.status(limit=1)["totals"]["studies"]["done"])

        return self.each(done)


@contextmanager
def running_federation(
    workdir: Path,
    sites: Sequence[ClinicSite],
    *,
    on_step: Callable[[str], None],
    settings: Callable[[ClinicSite], dict[str, Any]] = lambda _: {},
) -> Iterator[Federation]:
    """Start the hub, enroll and start one clinic per site; everything stops on the way out."""
    hub = HubService(workdir / "hub").init()
    clinics: dict[str, Clinic] = {}
    try:
        on_step(f"hub: fedclinic-hub serve on {hub.url} (SQLite, HTTPS)")
        hub.start()
        for i, site in enumerate(sites):
            code = hub.join_code(site.name)
            on_step(f"{site.name}: Orthanc PACS + edge node enrolled with its join code")
            clinics[site.name] = Clinic(
                workdir=workdir / site.name,
                join_code=code,
                ae_title=f"EDGE{i + 1}",
                quiet_seconds=1.0,
                extra_settings=settings(site),
            ).start()
        yield Federation(hub, clinics, {s.name: s for s in sites})
    finally:
        # Each node drains and stops on its own; stopping them side by side saves the sum of their waits.
        with ThreadPoolExecutor(max_workers=max(1, len(clinics))) as pool:
            list(pool.map(Clinic.stop, clinics.values()))
        hub.stop()
