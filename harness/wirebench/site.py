"""One benchmark clinic as a real edge node: its training images as DICOM, imported as labels, enrolled.

The clinic's rendered training images (float in [0, 1], its acquisition profile applied) become 8-bit DICOM
instances — the only pixel format a PACS would hand the node — in the simulation's order, with a
``labels.csv`` of SOP instance UIDs and class names; ``fedclinic-edge labels import`` spools them in file
order, which is the order the node's learner then reads them in. The node is read back only through its CLI
(``updates --format json``) and its personal-head file (the head it serves; it is not in its database).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from edge_node.inference.personal_head import PersonalHead, PersonalHeadStore
from harness.demo.clinic import EdgeNode
from harness.demo.hub import HubService
from harness.demo.orthanc import free_port
from hub.data.dicomize import WrappedImage, dicomize_images
from hub.data.medmnist import LABELS

__all__ = ["SiteError", "WireSite", "join_code", "to_uint8"]

DATASET = "pneumoniamnist"


class SiteError(RuntimeError):
    """A node command failed; the message carries its output."""


def join_code(hub: HubService, name: str) -> str:
    """A join code from the hub's admin API (what ``fedclinic-hub nodes enroll`` asks, without a process)."""
    token = (hub.data_dir / "admin.token").read_text().strip()
    context = ssl.create_default_context(cafile=str(hub.data_dir / "tls" / "cert.pem"))
    with httpx.Client(base_url=hub.url, verify=context, timeout=60.0) as client:
        answer = client.post(
            "/v1/admin/nodes", json={"node_name": name}, headers={"Authorization": f"Bearer {token}"}
        )
    if answer.status_code != 201:
        raise SiteError(f"{name}: the hub refused to enroll it: {answer.status_code} {answer.text}")
    return str(answer.json()["join_code"])


def to_uint8(x01: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) float in [0, 1] → (N, H, W) uint8, as an 8-bit detector would store it."""
    x = x01.numpy().reshape(x01.shape[0], x01.shape[-2], x01.shape[-1])
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


@dataclass
class WireSite:
    """A clinic's node directory, its labeled archive and its ``fedclinic-edge serve`` process."""

    name: str
    root: Path
    node: EdgeNode

    @classmethod
    def create(cls, name: str, root: Path, trusted_key: Path, more: dict[str, Any] | None = None) -> WireSite:
        """``more``: further edge settings (``{"learning": {...}}`` for the torch learner)."""
        root = root.resolve()
        settings: dict[str, Any] = {
            "ae_title": f"EDGE{name}"[:16],
            "host": "127.0.0.1",
            "port": free_port(),
            "page_port": free_port(),
            "data_dir": str(root / "data"),
            "providers": ["CPUExecutionProvider"],
            "intra_op_threads": 1,
            "quiet_seconds": 1.0,
            "trusted_keys": str(trusted_key),
            "log_level": "INFO",
            # A site learns from a few hundred small images: a small spool reserve, not 512 MiB per process.
            "spool_reserve_bytes": 16 * 1024 * 1024,
            **(more or {}),
        }
        node = EdgeNode(root=root, settings=settings)
        node.write_config()
        return cls(name, root, node)

    def _run(self, *args: str, timeout: float = 600.0) -> str:
        done = self.node.cli(*args, timeout=timeout)
        if done.returncode != 0:
            raise SiteError(f"{self.name}: fedclinic-edge {args[0]} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def install(self, bundle: Path) -> None:
        self._run("install-bundle", str(bundle))

    def import_labels(
        self, x01: torch.Tensor, y: torch.Tensor, *, dataset: str = DATASET, modality: str = "CR"
    ) -> list[WrappedImage]:
        """Write the images as DICOM (``dataset``'s class names, ``modality``) with their labels.csv and
        import the folder; returns the instances written, in the order the node learns from them."""
        folder = self.root / "archive"
        written = dicomize_images(to_uint8(x01), folder, dataset=dataset, split="train", modality=modality)
        names = LABELS[dataset]
        labels = y.numpy().astype(np.int64).reshape(-1)
        lines = ["sop_instance_uid,label"]
        lines += [f"{w.sop_instance_uid},{names[int(labels[w.index])]}" for w in written]
        (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._run("labels", "import", str(folder))
        return written

    def enroll(self, hub: HubService) -> None:
        self._run("enroll", join_code(hub, self.name))

    def start(self) -> None:
        self.node.start()

    def stop(self) -> None:
        self.node.stop()

    def update_bytes(self) -> dict[int, int]:
        """Payload bytes of each update that left the clinic, by hub round (``fedclinic-edge updates``)."""
        out: dict[int, int] = {}
        for row in self.node.updates()["updates"]:
            out[int(row["round"])] = out.get(int(row["round"]), 0) + int(row["payload_bytes"])
        return out

    def personal_head(self) -> PersonalHead | None:
        """The personal head the node serves with (kept beside its database, never sent)."""
        return PersonalHeadStore.in_data_dir(self.root / "data").load()
