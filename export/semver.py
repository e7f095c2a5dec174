"""Semantic versions (semver.org 2.0.0) for model bundles: checked before an export does any work."""

from __future__ import annotations

import re

from export.errors import ExportError

__all__ = ["SEMVER", "check_semver"]

#: MAJOR.MINOR.PATCH, optional -prerelease and +build, no leading zeros in numeric parts.
SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)


def check_semver(version: str) -> str:
    """``version`` if it is a semantic version, else ExportError with an example of one."""
    if SEMVER.fullmatch(version) is None:
        raise ExportError(
            f"{version!r} is not a semantic version; use MAJOR.MINOR.PATCH such as 1.0.0 or 1.1.0-rc.1"
        )
    return version
