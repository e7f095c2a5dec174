"""Pytest fixtures for a real Orthanc; register: ``pytest_plugins = ["tests.support.orthanc_fixtures"]``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.demo.orthanc import Orthanc, orthanc_available

__all__ = ["orthanc", "orthanc_module"]


def _require() -> None:
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (apt-get install orthanc); it is needed for PACS tests")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh Orthanc for one test (empty database, free HTTP and DICOM ports)."""
    _require()
    server = Orthanc(workdir=tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def orthanc_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc shared by the tests of a module (starting one takes about a second)."""
    _require()
    server = Orthanc(workdir=tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop()
