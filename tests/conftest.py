"""Fixtures shared by every test package: data location and process settings for a 2-core box."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.orthanc_fixtures"]

# One thread per process (ENVIRONMENT.md: two OpenMP threads on a busy 2-core box collapse), and no Nagle
# stalls for the dcmtk / Orthanc processes the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TCP_NODELAY", "1")
# Every node a test runs in this process or starts with this environment keeps a spool reserve of 8 slots,
# not the 512 MiB of a clinic's node: the reserve's path runs, without writing half a gigabyte per node (tests
# of the reserve set their own; nodes started with a clean environment write it in their edge.toml).
os.environ.setdefault("FEDCLINIC_EDGE_SPOOL_RESERVE_BYTES", str(8 * 1024 * 1024))

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("FEDCLINIC_DATA")
    return Path(env).resolve() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (MedMNIST + DICOM samples); $FEDCLINIC_DATA overrides ../shared/data."""
    root = shared_data_dir()
    if not (root / "medmnist").is_dir() or not (root / "dicom").is_dir():
        pytest.fail(
            f"shared data not found at {root}: set FEDCLINIC_DATA to the folder with medmnist/ and dicom/"
        )
    return root
