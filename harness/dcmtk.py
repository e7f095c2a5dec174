"""Find dcmtk's command-line tools, not the same-named Python apps that pynetdicom installs into a venv."""

from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = ["dcmtk"]


@functools.cache
def dcmtk(tool: str) -> str:
    """Absolute path of dcmtk's ``tool`` (storescu, storescp, echoscu, ...).

    pynetdicom puts Python scripts called storescu, storescp, echoscu ... into the bin/ of every venv it is
    installed in; with such a venv first on PATH a bare ``storescu`` runs pynetdicom, not dcmtk. dcmtk's tools
    are native executables, so the first candidate on PATH that is not a ``#!`` script is the one.
    """
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        candidate = Path(folder or ".") / tool
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with candidate.open("rb") as fh:
            if fh.read(2) != b"#!":
                return str(candidate)
    raise FileNotFoundError(f"dcmtk's {tool} not found on PATH: apt-get install dcmtk")
