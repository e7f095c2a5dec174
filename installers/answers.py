"""The installer's answers: from an answers file (TOML), flags, the kit, then the prompts, in that order."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from installers.errors import AnswersError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Answers", "PacsAnswer", "load_answers"]


def _ae(value: str) -> str:
    # PS3.5 6.2: 1-16 characters of the default repertoire, no backslash.
    if not value.strip() or len(value) > 16 or not value.isascii() or "\\" in value:
        raise ValueError("an AE title is 1 to 16 ASCII characters without a backslash, e.g. FEDCLINIC")
    return value.strip()


class PacsAnswer(BaseModel):
    """A DICOM peer: the PACS that sends studies and receives results."""

    model_config = ConfigDict(extra="forbid")

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return _ae(value)


class Answers(BaseModel):
    """Everything the wizard asks; an answers file holds any subset (``answers.example.toml``)."""

    model_config = ConfigDict(extra="forbid")

    #: This node's AE title, as the PACS will call it.
    ae_title: str = "FEDCLINIC"
    #: Address the node listens on (0.0.0.0: every interface).
    listen_host: str = "0.0.0.0"
    #: The node's DICOM port; below 1024 (e.g. 104) the service gets CAP_NET_BIND_SERVICE.
    port: int = Field(default=11112, ge=1, le=65535)
    #: AE titles allowed to send studies; empty allows any.
    allowed_calling_aes: list[str] = Field(default_factory=list)
    #: The PACS: results go there and C-ECHO tests it.
    pacs: PacsAnswer | None = None
    #: Where test results go if the clinic prefers not to touch the clinical PACS (default: the PACS).
    test_destination: PacsAnswer | None = None
    #: Spool, database and models.
    data_dir: Path = Path("/var/lib/fedclinic-edge")
    prefix: Path = Path("/opt/fedclinic")
    config_path: Path = Path("/etc/fedclinic/edge.toml")
    unit_dir: Path = Path("/etc/systemd/system")
    service_user: str = "fedclinic"
    #: One-time join code from the hub operator; empty uses the kit's, or skips enrollment.
    join_code: str = ""
    #: HTTPS address of the hub, for the clock check (the join code carries the rest).
    hub_url: str = ""
    #: Seconds to wait for the PACS to send a C-ECHO or a study during the install (0 skips that test).
    wait_for_pacs_seconds: float = Field(default=0.0, ge=0)
    #: Send a test report to the PACS (or test_destination) during the install.
    send_test_report: bool = True
    #: Memory limit of the service (systemd MemoryMax).
    memory_max: str = "4G"

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return _ae(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_calling(cls, value: list[str]) -> list[str]:
        return [_ae(v) for v in value]

    @field_validator("service_user")
    @classmethod
    def _check_user(cls, value: str) -> str:
        if not value or not value.replace("-", "").replace("_", "").isalnum() or len(value) > 31:
            raise ValueError("a user name is letters, digits, - and _ (at most 31), e.g. fedclinic")
        return value


def load_answers(path: Path | None, overrides: dict[str, Any]) -> Answers:
    """Answers from a TOML file (optional) with ``overrides`` (flags) on top; AnswersError names bad keys."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise AnswersError(f"cannot read answers file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise AnswersError(f"answers file {path} is not valid TOML: {exc}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Answers(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise AnswersError(f"answers are not valid: {problems}") from None
