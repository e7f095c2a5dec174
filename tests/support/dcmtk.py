"""dcmtk's command-line tools for the tests: the lookup lives in the harness, which bench/ uses too."""

from __future__ import annotations

from harness.dcmtk import dcmtk

__all__ = ["dcmtk"]
