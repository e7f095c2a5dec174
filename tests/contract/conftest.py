"""A real signed bundle (student trained on PneumoniaMNIST, exported, signed) shared by the contract tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.bundle import build_test_bundle


@pytest.fixture(scope="session")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, Path]:
    """(bundle dir, public key). Its folder also holds keys/hub.key for re-signing altered manifests."""
    out = tmp_path_factory.mktemp("signed")
    return build_test_bundle(out, epochs=1, max_train_samples=512, data_root=shared_data)


@pytest.fixture()
def bundle_copy(signed_bundle: tuple[Path, Path], tmp_path: Path) -> Callable[[], Path]:
    """A fresh copy of the signed bundle that a test may tamper with."""

    def copy() -> Path:
        dest = tmp_path / f"bundle{len(list(tmp_path.iterdir()))}"
        shutil.copytree(signed_bundle[0], dest)
        return dest

    return copy
