"""A real signed bundle (student trained on PneumoniaMNIST, exported, signed) shared by the contract tests.

The prebuilt test bundle ($FEDCLINIC_TEST_BUNDLE: bundle/, hub.pub, keys/hub.key) when there is one, so
these tests also run where a clinic runs the verification: an edge-only environment without torch. Without
it the bundle is built here, which needs torch (the hub extra); without torch either, the tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.bundle import build_test_bundle, existing_bundle


def _prebuilt(out: Path) -> tuple[Path, Path] | None:
    """A copy of the prebuilt bundle, its public key and the hub key that signed it, or None."""
    env = os.environ.get("FEDCLINIC_TEST_BUNDLE")
    if not env:
        return None
    root = Path(env)
    if existing_bundle(root) is None or not (root / "keys" / "hub.key").is_file():
        return None
    for name in ("bundle", "keys"):  # not run/: checkpoints are not part of the contract
        shutil.copytree(root / name, out / name)
    shutil.copy(root / "hub.pub", out / "hub.pub")
    return out / "bundle", out / "hub.pub"


@pytest.fixture(scope="session")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, Path]:
    """(bundle dir, public key). Its folder also holds keys/hub.key for re-signing altered manifests."""
    out = tmp_path_factory.mktemp("signed")
    found = _prebuilt(out)
    if found is not None:
        return found
    if importlib.util.find_spec("torch") is None:
        pytest.skip(
            "no prebuilt test bundle ($FEDCLINIC_TEST_BUNDLE) and no torch to build one: "
            "run `make test-bundle` in a hub environment, or set FEDCLINIC_TEST_BUNDLE"
        )
    return build_test_bundle(out, epochs=1, max_train_samples=512, data_root=shared_data)


@pytest.fixture()
def bundle_copy(signed_bundle: tuple[Path, Path], tmp_path: Path) -> Callable[[], Path]:
    """A fresh copy of the signed bundle that a test may tamper with."""

    def copy() -> Path:
        dest = tmp_path / f"bundle{len(list(tmp_path.iterdir()))}"
        shutil.copytree(signed_bundle[0], dest)
        return dest

    return copy
