"""The signed student bundle that e2e tests deploy: prebuilt by `make test`, or built here."""

from __future__ import annotations

from pathlib import Path

from harness.demo.clinic import BundleFiles, find_bundle

__all__ = ["find_bundle", "obtain_bundle"]


def obtain_bundle(workdir: Path) -> BundleFiles:
    """The prebuilt test bundle, or a fresh one trained and signed here (~20 s; needs the hub extra)."""
    found = find_bundle()
    if found is not None:
        return found
    from tests.support.bundle import build_test_bundle

    bundle, pub = build_test_bundle(workdir / "test-bundle")
    return BundleFiles(bundle, pub)
