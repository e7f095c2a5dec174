"""The signed student bundle that e2e tests and benchmarks deploy: prebuilt by `make test`, or built here."""

from __future__ import annotations

import os
from pathlib import Path

from hub.demo.clinic import BundleFiles

__all__ = ["find_bundle", "obtain_bundle"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def find_bundle() -> BundleFiles | None:
    """$FEDCLINIC_TEST_BUNDLE, else build/dev-bundle: a folder with bundle/ and hub.pub (a real student)."""
    env = os.environ.get("FEDCLINIC_TEST_BUNDLE")
    root = Path(env) if env else REPO_ROOT / "build" / "dev-bundle"
    if (root / "bundle" / "manifest.json").is_file() and (root / "hub.pub").is_file():
        return BundleFiles(root / "bundle", root / "hub.pub")
    return None


def obtain_bundle(workdir: Path) -> BundleFiles:
    """The prebuilt test bundle, or a fresh one trained and signed here (~20 s; needs the hub extra)."""
    found = find_bundle()
    if found is not None:
        return found
    from tests.support.bundle import build_test_bundle

    bundle, pub = build_test_bundle(workdir / "test-bundle")
    return BundleFiles(bundle, pub)
