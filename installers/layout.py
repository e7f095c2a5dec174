"""Where an installation lives: PREFIX/versions/<v>/venv, the PREFIX/current link, and PREFIX/install.json."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from installers.errors import StepError

__all__ = ["InstallRecord", "Layout"]


@dataclass(frozen=True)
class InstallRecord:
    """What uninstall, upgrade and doctor need to find again; written at the end of an install."""

    config: str
    data_dir: str
    service_user: str
    unit_path: str
    version_dir: str
    ae_title: str
    port: int
    listen_host: str
    previous_version_dir: str | None = None
    hub_url: str = ""


@dataclass(frozen=True)
class Layout:
    prefix: Path

    @property
    def current(self) -> Path:
        return self.prefix / "current"

    @property
    def record_path(self) -> Path:
        return self.prefix / "install.json"

    def edge_binary(self, through_current: bool = True, version_dir: Path | None = None) -> Path:
        base = self.current if through_current or version_dir is None else version_dir
        return base / "venv" / "bin" / "fedclinic-edge"

    def activate(self, version_dir: Path) -> Path | None:
        """Point PREFIX/current at ``version_dir`` atomically; returns what it pointed at before."""
        before = self.current.resolve() if self.current.is_symlink() else None
        tmp = self.prefix / ".current.new"
        tmp.unlink(missing_ok=True)
        os.symlink(version_dir.relative_to(self.prefix), tmp)
        os.replace(tmp, self.current)
        return before

    def read_record(self) -> InstallRecord:
        try:
            return InstallRecord(**json.loads(self.record_path.read_text()))
        except FileNotFoundError:
            raise StepError(
                f"no installation found under {self.prefix} (no install.json); "
                "install first, or pass --prefix"
            ) from None
        except (ValueError, TypeError) as exc:
            raise StepError(f"{self.record_path} is damaged ({exc}); reinstall from the kit") from None

    def write_record(self, record: InstallRecord) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
        os.replace(tmp, self.record_path)
