"""A DICOM destination for results: a typed value from the settings through the outbox to the sender."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Destination"]


@dataclass(frozen=True)
class Destination:
    """A DICOM node that takes results: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``AE@host:port``, as logs and errors name it."""
        return f"{self.ae_title}@{self.host}:{self.port}"
