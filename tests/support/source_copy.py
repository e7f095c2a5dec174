"""A copy of the package sources for a test to ``pip install`` from.

pip builds a local project in place, writing ``build/`` and ``fedclinic.egg-info`` into it, so two installs
from the checkout itself at once (the packaging tests on two pytest workers) race over those folders. Each
test installs from its own copy of what the wheel is built from instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["PACKAGE_ITEMS", "copy_package_sources"]

REPO_ROOT = Path(__file__).resolve().parents[2]
# What pyproject.toml builds the wheel from: its packages, and the README it names as the long description.
PACKAGE_ITEMS = ("pyproject.toml", "README.md", "edge_node", "hub", "export", "harness", "installers")


def copy_package_sources(dest: Path) -> Path:
    """Copy the package sources of this checkout to ``dest`` (created) and return it."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for item in PACKAGE_ITEMS:
        path = REPO_ROOT / item
        if path.is_dir():
            shutil.copytree(path, dest / item, ignore=ignore)
        else:
            shutil.copy2(path, dest / item)
    return dest
