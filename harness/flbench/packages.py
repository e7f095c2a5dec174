"""The installed versions a benchmark record's figures depend on, so that a report says what made them.

numpy, scipy and Pillow are not pinned by the project: an environment installed on another day can move a
record's AUCs in the third decimal (seen between sessions 27 and 28: up to 0.005 in the test means). Within
one set of versions a run repeats to the last digit. Each record carries the set it was made under and the
report names every set among its records.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

#: The distributions whose versions can change a bench figure (data rendering, training, metrics).
FIGURE_PACKAGES: tuple[str, ...] = ("numpy", "scipy", "pillow", "torch", "scikit-learn")


def package_versions() -> dict[str, str]:
    """Python's version and each of ``FIGURE_PACKAGES``'s ("absent" where it is not installed)."""
    versions = {"python": platform.python_version()}
    for name in FIGURE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def package_sets(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each distinct version set among the records, with how many records were made under it, most first;
    records made before versions were recorded count under ``versions`` None."""
    counts: dict[tuple[tuple[str, str], ...] | None, int] = {}
    for record in records:
        versions = record.get("packages")
        key = tuple(versions.items()) if versions else None
        counts[key] = counts.get(key, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (kv[0] is None, -kv[1]))
    return [{"versions": dict(key) if key else None, "records": n} for key, n in ordered]


def describe_package_sets(sets: Sequence[Mapping[str, Any]]) -> str:
    """One markdown paragraph naming the version sets (empty when there are no records)."""
    if not sets:
        return ""
    named = [s for s in sets if s["versions"]]
    unrecorded = sum(s["records"] for s in sets if not s["versions"])
    parts = [
        ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + f" ({s['records']} records)" for s in named
    ]
    if unrecorded:
        parts.append(f"not recorded ({unrecorded} records made before versions were kept)")
    if len(parts) == 1 and not unrecorded:
        return f"Made under {parts[0]}."
    return (
        f"Records made under {len(parts)} sets of package versions; figures can differ in the third decimal "
        "between sets: " + "; ".join(parts) + "."
    )
