"""The edge node's one settings object: environment (FEDCLINIC_EDGE_*) over an optional TOML file.

The file is the one named with ``--config``, else the one ``FEDCLINIC_EDGE_CONFIG`` names, else
``/etc/fedclinic/edge.toml`` when it exists. Relative paths in the file are relative to the file, not to
the working directory (a service starts in ``/``); relative paths in the environment are relative to the
working directory, as a shell user expects.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from edge_node.delivery.destination import Destination
from edge_node.errors import ConfigError
from edge_node.ingest.retention import RetentionPolicy
from edge_node.ingest.slot_pool import SpoolReserve
from edge_node.learning.options import LearningSettings
from edge_node.page.bind_address import is_loopback
from edge_node.page.password import is_password_hash
from edge_node.protection.floor import PrivacyFloor

if sys.version_info >= (3, 11):
    import tomllib
else:  # the tomli backport, a dependency on Python 3.10
    import tomli as tomllib

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "LAN_NEEDS_PASSWORD",
    "PROVIDER_PREFERENCE",
    "DestinationSettings",
    "EdgeSettings",
    "config_file",
    "installed_providers",
    "load_settings",
]

ENV_PREFIX = "FEDCLINIC_EDGE_"
#: Names the settings file when ``--config`` is not given.
CONFIG_ENV = "FEDCLINIC_EDGE_CONFIG"
#: Why a page on a LAN address is refused without a password, and the fix.
LAN_NEEDS_PASSWORD = (
    "page_host {host!r} is not a loopback address, so the clinician page needs a password: set"
    " page_password_hash (make one with `fedclinic-edge page-password`), or set page_host to 127.0.0.1"
)
#: The settings file a service reads when neither ``--config`` nor FEDCLINIC_EDGE_CONFIG names one.
DEFAULT_CONFIG = Path("/etc/fedclinic/edge.toml")

#: The execution providers the node uses by default, best first, among those the installed runtime offers.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

#: Settings that hold paths: in the TOML file they are relative to the file.
_PATH_KEYS = ("data_dir", "trusted_keys", "trt_engine_cache_dir")


def installed_providers() -> list[str]:
    """The providers of PROVIDER_PREFERENCE this onnxruntime build offers, best first (CPU at least).

    A CPU-only runtime gets [CPU], so a node that was never told otherwise does not report a fallback.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PROVIDER_PREFERENCE if p in available] or ["CPUExecutionProvider"]


class _TomlFile(InitSettingsSource):
    """The TOML settings file, with its relative paths made relative to the file's directory."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        base = path.resolve().parent
        for key in _PATH_KEYS:
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                data[key] = str(base / value)
        super().__init__(settings_cls, init_kwargs=data)


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, no backslash, not all spaces.
    stripped = value.strip()
    if not stripped or len(value) > 16 or not value.isascii() or "\\" in value:
        raise ValueError("an AE title is 1 to 16 ASCII characters without a backslash, e.g. FEDCLINIC")
    if any(not ch.isprintable() for ch in value):
        raise ValueError("an AE title has no control characters")
    return stripped


class DestinationSettings(BaseModel):
    """A DICOM node that receives the results (usually the PACS that sent the study)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return _check_ae_title(value)


class EdgeSettings(BaseSettings):
    """Everything a running edge node needs; built once in the entry point and passed down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        toml_file=None,
    )

    #: This node's AE title; the PACS must call it exactly.
    ae_title: str = "FEDCLINIC"
    #: Address the DICOM listener binds to. 0.0.0.0 listens on every interface.
    host: str = "127.0.0.1"
    #: DICOM listener port (0 picks a free port, useful in tests; the port in use is logged).
    port: int = Field(default=11112, ge=0, le=65535)
    #: Calling AE titles allowed to associate; empty allows any.
    allowed_calling_aes: list[str] = Field(default_factory=list)
    #: Spool, database, models and results live here. Required.
    data_dir: Path
    #: A study with no association release is considered complete after this many quiet seconds.
    quiet_seconds: float = Field(default=30.0, gt=0)
    #: A study is analysed only once no new instance came for this many seconds, even after its sender
    #: released: a PACS that sends each instance in its own association then causes one run, not one each.
    #: A PACS that sends a whole study in one association (Orthanc does) can set 0: the study then runs as
    #: soon as the association is released, which takes this wait off every result's latency.
    study_quiet_seconds: float = Field(default=2.0, ge=0)
    #: Spool retention: instances of finished studies older than this many days are removed (none: kept).
    spool_retention_days: float | None = Field(default=30.0, gt=0)
    #: Spool retention: above this many bytes, finished studies are removed oldest first (none: no limit).
    #: A study waiting for or in analysis is never touched, so the spool can stay above it for a while.
    spool_max_bytes: int | None = Field(default=None, ge=0)
    #: Labeled studies (what the node learns from) stay in the spool, whatever spool_retention_days and
    #: spool_max_bytes say, until their latest label is this many days old (none: as long as they are
    #: labeled; 0: labels do not keep a study).
    labeled_retention_days: float | None = Field(default=365.0, ge=0)
    #: Seconds between automatic spool purges in a running node.
    spool_purge_interval_seconds: float = Field(default=3600.0, gt=0)
    #: Where results go (C-STORE). Empty keeps results only in data_dir/results.
    destinations: list[DestinationSettings] = Field(default_factory=list)
    #: ONNX Runtime execution providers in order of preference; the first that loads is used. Default: those
    #: of TensorRT, CUDA, CPU that the installed onnxruntime offers.
    providers: list[str] = Field(default_factory=installed_providers, min_length=1)
    #: Threads per inference (ORT intra-op).
    intra_op_threads: int = Field(default=1, ge=1, le=256)
    #: Which of the bundle's model files to run: "fp32" (the full-precision model.onnx), "int8" (smaller and
    #: faster on a CPU) or "fp16" (for GPUs). A bundle that ships no such variant runs its fp32 model, and the
    #: log and `fedclinic-edge status` say so.
    precision: Literal["fp32", "int8", "fp16"] = "fp32"
    #: TensorRT builds an engine for this GPU on first use (this can take minutes) and keeps it here, so later
    #: starts are fast. Defaults to data_dir/trt-cache. Only used with TensorrtExecutionProvider.
    trt_engine_cache_dir: Path | None = None
    #: Let TensorRT run in half precision (faster on most GPUs, slightly different scores).
    trt_fp16: bool = False
    #: Public key file or directory of *.pub files trusted to sign model bundles.
    trusted_keys: Path | None = None
    #: Also send the secondary capture (an image with the result burnt in), not only the SR.
    send_secondary_capture: bool = False
    #: Associations open at once (pynetdicom refuses more with "local limit exceeded").
    max_associations: int = Field(default=16, ge=1)
    #: Connections one source address may hold open (refused at accept beyond it): no peer starves the PACS.
    max_associations_per_peer: int = Field(default=4, ge=1)
    #: Seconds a new connection may take to request an association (silent sockets are closed after it).
    acse_timeout_s: float = Field(default=10.0, gt=0)
    #: Seconds to wait for the next DIMSE message inside an association (the pynetdicom transport; the
    #: native one bounds every read inside an association by network_timeout_s).
    dimse_timeout_s: float = Field(default=30.0, gt=0)
    #: Seconds an association may stay idle on the network before it is aborted.
    network_timeout_s: float = Field(default=30.0, gt=0)
    #: Largest PDU (P-DATA-TF) the listener accepts, in bytes: announced to senders, and a connection whose
    #: PDU claims more is closed before it is read. 1 MiB: as fast as unlimited with dcmtk-based senders.
    max_pdu_bytes: int = Field(default=1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    #: How the DICOM listener receives: "native" (one blocking reader per connection, PDUs parsed by hand,
    #: data written straight into the spool as it arrives; about twice as fast) or "pynetdicom" (the
    #: pynetdicom 3.0 server). Both acknowledge an instance only after it is fsynced, answer the same
    #: statuses and apply the same limits; docs/benchmarks.md ("DICOM ingest") compares them.
    receive_transport: Literal["native", "pynetdicom"] = "native"
    #: Processes that receive associations (native transport): the node's process accepts, applies the
    #: limits and hands each connection to the receiver process holding the fewest. 0 receives every
    #: association in a thread of the node's own process: one interpreter lock shared by all of them, so
    #: several associations at once gain little. 2, one per core of a small box, lets two associations
    #: receive in parallel; a receiver that dies is started again (its open associations drop, and their
    #: senders retry what was not acknowledged). The pynetdicom transport ignores it.
    receive_processes: int = Field(default=2, ge=0, le=64)
    #: A study whose runs killed the node this many times in a row is set aside as failed, not retried.
    max_run_attempts: int = Field(default=3, ge=1)
    #: Instances larger than this are refused with "out of resources" (0xA700).
    max_instance_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    #: Instances are refused (0xA700) when the spool's file system has less free space than this.
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    #: Disk the spool keeps written through ahead of time, in idle time, for each process that receives
    #: (each receiver process; the node's own with receive_processes = 0): an instance written into such a
    #: slot is flushed without waiting for the file system's journal (0.55-0.77 of the time for a CT
    #: slice: bench/bench_flush.py), most of the node's time per instance when a PACS sends one at a time.
    #: 512 MiB holds a CT series of ~500 slices; a burst beyond it is received as without a reserve. 0: none.
    spool_reserve_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    #: Size of one reserve slot: an instance up to this size gets the fast flush (a 512x512 CT slice is
    #: ~0.53 MB); a larger one grows its slot, at the cost of an ordinary write.
    spool_slot_bytes: int = Field(default=1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
    #: First retry delay for a failed send; doubles per attempt up to send_retry_max_seconds.
    send_retry_base_seconds: float = Field(default=5.0, gt=0)
    send_retry_max_seconds: float = Field(default=900.0, gt=0)
    #: The clinician page (confirm or correct results; what left the clinic): address it listens on.
    #: Loopback by default; any other address needs page_password_hash.
    page_host: str = "127.0.0.1"
    #: Serve the clinician page in `fedclinic-edge serve`.
    page_enabled: bool = True
    #: The page's TCP port (0 picks a free one, logged at start).
    page_port: int = Field(default=8480, ge=0, le=65535)
    #: scrypt hash of the page's password, made at install with `fedclinic-edge page-password`. When set,
    #: every request to the page needs the password (user name free).
    page_password_hash: str | None = None
    #: Python log level for the node's stderr log.
    log_level: str = "INFO"
    #: The clinic's privacy floor (edge.toml ``[privacy]``): the least protection a round must state for
    #: this node to take part; a task below it is refused with the reason, before anything is computed.
    privacy: PrivacyFloor = Field(default_factory=PrivacyFloor)
    #: How this node trains for rounds (edge.toml ``[learning]``): the external torch learner, its data.
    learning: LearningSettings = Field(default_factory=LearningSettings)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_calling(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in value]

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: list[str]) -> list[str]:
        bad = [p for p in value if not p.endswith("ExecutionProvider")]
        if bad:
            raise ValueError(f"unknown provider names {bad}; use e.g. {list(PROVIDER_PREFERENCE)}")
        return value

    @field_validator("trusted_keys")
    @classmethod
    def _check_keys(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"{value} does not exist; point it at the hub's hub.pub or a directory of *.pub")
        return value

    @field_validator("precision", mode="before")
    @classmethod
    def _check_precision(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("page_password_hash")
    @classmethod
    def _check_page_password(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Runs for the default too (validate_default), after page_host and page_enabled (declared before it).
        if value is not None and not is_password_hash(value):
            raise ValueError("not a hash made by `fedclinic-edge page-password` (scrypt$N$r$p$salt$hash)")
        host, enabled = info.data.get("page_host", "127.0.0.1"), info.data.get("page_enabled", True)
        if value is None and enabled and not is_loopback(str(host)):
            raise ValueError(LAN_NEEDS_PASSWORD.format(host=host))
        return value

    @model_validator(mode="after")
    def _default_trt_cache(self) -> EdgeSettings:
        if self.trt_engine_cache_dir is None:
            self.trt_engine_cache_dir = self.data_dir / "trt-cache"
        return self

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("use one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments win, then the environment, then the TOML file (if load_settings named one).
        path = cls._config_path
        if path is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, _TomlFile(settings_cls, path))

    #: The TOML file this settings class reads (set on the subclass load_settings makes for a file).
    _config_path: ClassVar[Path | None] = None

    # Which hint to give for a key, besides the generic "set it".
    _HINTS: ClassVar[dict[str, str]] = {
        "data_dir": "a writable directory for the spool and database, e.g. /var/lib/fedclinic-edge",
        "destinations": 'a list like [{"ae_title": "PACS", "host": "10.0.0.5", "port": 104}]',
        "port": "a TCP port 1-65535 (104 or 11112 are usual for DICOM)",
        "precision": 'one of "fp32", "int8", "fp16"',
    }

    @property
    def retention_policy(self) -> RetentionPolicy:
        return RetentionPolicy(
            max_age_days=self.spool_retention_days,
            max_bytes=self.spool_max_bytes,
            labeled_keep_days=self.labeled_retention_days,
        )

    @property
    def destination_values(self) -> list[Destination]:
        """The destinations as the typed values the worker, outbox and sender carry."""
        return [Destination(d.ae_title, d.host, d.port) for d in self.destinations]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "edge.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def spool_reserve(self) -> SpoolReserve:
        """The spool's reserve of written-through slots (``edge_node.ingest.slot_pool``)."""
        return SpoolReserve(
            slots=self.spool_reserve_bytes // self.spool_slot_bytes, slot_bytes=self.spool_slot_bytes
        )

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def serving_path(self) -> Path:
        """What the running node loaded (model file, precision, provider really used), for ``status``."""
        return self.data_dir / "serving.json"

    @property
    def trt_cache_dir(self) -> Path:
        """The TensorRT engine cache (``trt_engine_cache_dir``, data_dir/trt-cache unless set)."""
        return self.trt_engine_cache_dir or self.data_dir / "trt-cache"


def _describe(exc: ValidationError, config_file: Path | None) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = loc[0] if loc else "?"
        where = f"{ENV_PREFIX}{key.upper()}"
        if config_file is not None:
            where += f" or `{key} = ...` in {config_file}"
        hint = EdgeSettings._HINTS.get(key, "")
        what = "is missing" if err["type"] == "missing" else f"is wrong: {err['msg']}"
        if err["type"] == "extra_forbidden":
            what = "is not a known setting (check the spelling)"
        detail = ".".join(loc)
        lines.append(f"setting {detail!r} {what}; set {where}" + (f" ({hint})" if hint else ""))
    return "invalid edge settings:\n  " + "\n  ".join(lines)


def config_file(explicit: Path | None) -> Path | None:
    """The settings file to read: ``--config``, else FEDCLINIC_EDGE_CONFIG, else DEFAULT_CONFIG if present.

    A file named by the variable must exist (ConfigError otherwise); the default one may be absent.
    """
    if explicit is not None:
        return explicit
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(
                f"{CONFIG_ENV}={named} does not exist; point it at the node's TOML settings file"
            )
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> EdgeSettings:
    """Build the settings from explicit overrides, FEDCLINIC_EDGE_* variables and an optional TOML file.

    Raises ConfigError naming every bad key and how to set it.
    """
    cls: type[EdgeSettings] = EdgeSettings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(
                f"config file {config_file} does not exist; pass an existing TOML file to --config"
            )
        cls = type("EdgeSettingsFromFile", (EdgeSettings,), {"_config_path": config_file})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None
    except ValueError as exc:  # a TOML syntax error surfaces as tomllib.TOMLDecodeError (a ValueError)
        raise ConfigError(f"config file {config_file} cannot be read: {exc}; fix the TOML syntax") from None
