"""HubSettings: one per hub process, from ``hub.toml`` in the data directory and FEDCLINIC_HUB_* vars."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from hub.service.errors import SetupError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["CONFIG_FILE", "DEFAULT_DATA_DIR", "HubSettings", "load_settings"]

CONFIG_FILE = "hub.toml"
DEFAULT_DATA_DIR = Path("hub-data")


class HubSettings(BaseSettings):
    """Everything a hub process needs to know; environment variables win over ``hub.toml``."""

    model_config = SettingsConfigDict(env_prefix="FEDCLINIC_HUB_", extra="forbid")

    data_dir: Path = DEFAULT_DATA_DIR
    #: SQLAlchemy URL; empty means SQLite ``hub.db`` in the data directory.
    database_url: str = ""
    #: The address nodes use to reach the hub (goes into join codes), e.g. https://hub.example.org:8443.
    public_url: str = ""
    #: The TLS certificate served (its sha256 goes into join codes); empty means tls/cert.pem.
    tls_cert: str = ""
    max_update_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    #: An update's npz may not unpack to more than this (a compression bomb is refused before decoding).
    max_unpacked_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    #: How often the server closes rounds whose deadline passed.
    tick_s: float = Field(default=1.0, gt=0)
    #: An aggregation claimed longer ago than this (its process died) is taken over.
    aggregation_lease_s: float = Field(default=15.0, gt=0)
    publication_ttl_days: float = Field(default=365.0, gt=0)
    #: Longest long-poll of ``GET /v1/node/tasks?wait=`` and ``GET /v1/secagg/{round}/{step}?wait=``.
    max_wait_s: float = Field(default=30.0, ge=0)
    #: How long a secure-aggregation step waits for missing nodes after the previous step closed.
    secagg_step_s: float = Field(default=60.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides hub.toml (passed as init values), so a deployment can adjust one key.
        return env_settings, init_settings

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'hub.db').resolve()}"

    @property
    def tls_cert_path(self) -> Path:
        return Path(self.tls_cert) if self.tls_cert else self.tls_dir / "cert.pem"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"


def load_settings(data_dir: Path | None = None, **overrides: Any) -> HubSettings:
    """Settings for the data directory (``--data-dir``, else FEDCLINIC_HUB_DATA_DIR, else ./hub-data)."""
    import os

    chosen = data_dir or Path(os.environ.get("FEDCLINIC_HUB_DATA_DIR", str(DEFAULT_DATA_DIR)))
    values: dict[str, Any] = {}
    config = chosen / CONFIG_FILE
    if config.is_file():
        try:
            values = tomllib.loads(config.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SetupError(
                f"cannot read {config}: {exc}; fix the file or run `fedclinic-hub init`"
            ) from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["data_dir"] = chosen
    try:
        settings = HubSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SetupError(
            f"bad hub setting ({problems}); fix {config} or the FEDCLINIC_HUB_* variable"
        ) from exc
    # An explicit --data-dir beats the environment's FEDCLINIC_HUB_DATA_DIR.
    return settings.model_copy(update={"data_dir": chosen})
