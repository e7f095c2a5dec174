"""The node's model slot: install a verified bundle, switch the active model atomically, roll back, hot-swap.

Layout: ``data_dir/models/<model_id>/<version>/`` holds a verified copy of each installed bundle; the
registry's ``activations`` table is the active pointer (the latest row wins, one INSERT is the atomic switch)
and its history is what ``rollback`` walks back along. Installing never touches the model in use: a bundle
that fails verification or does not load is refused with a message, and the node keeps serving what it had.

The serving process notices a switch made by another process (``fedclinic-edge install-bundle``) through
``ModelRegistry.activation_id`` before each study, loads the new model, and only then drops the old one, so a
study in progress finishes on the model it started with. Every load runs one dummy image through the new model
(``LoadedModel.warm_up``) before it serves: a model that cannot run is refused, and the session's first-run
cost does not land on a study.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_node.errors import ConfigError, ModelError
from edge_node.inference.backend import CPU
from edge_node.inference.loaded_model import LoadedModel, Precision, load_model
from edge_node.inference.personal_head import PersonalHeadStore
from edge_node.protocol.bundle import VerifiedBundle, open_no_link, safe_relative_path, verify_bundle
from edge_node.protocol.errors import BundleError
from edge_node.protocol.manifest import MANIFEST_FILE, SIGNATURE_FILE
from edge_node.protocol.signing import load_public_keys
from edge_node.state.model_registry import ModelRecord, ModelRegistry

if TYPE_CHECKING:
    from edge_node.settings import EdgeSettings

__all__ = ["LoadOptions", "Loader", "ModelSlot"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """How the node opens a model: the inference part of the settings."""

    providers: tuple[str, ...]
    threads: int = 1
    precision: Precision = "fp32"
    trt_engine_cache_dir: Path | None = None
    trt_fp16: bool = False


Loader = Callable[[VerifiedBundle, LoadOptions], LoadedModel]

# Model ids and versions become directory names: keep them to a safe alphabet.
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def _version_key(version: str) -> tuple[int, ...] | None:
    """``1.10.2`` -> (1, 10, 2) for ordering (pre-release/build suffixes ignored); None if not numeric."""
    core = re.split(r"[-+]", version, maxsplit=1)[0]
    parts = core.split(".")
    if not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def _copy_listed(verified: VerifiedBundle, dest: Path) -> None:
    """Copy the manifest, its signature and the files it lists from the verified bundle into ``dest``.

    Nothing else is copied (an unlisted file, however it got there, stays behind), and every file is
    opened without following links.
    """
    names = [MANIFEST_FILE, SIGNATURE_FILE, *(entry.path for entry in verified.manifest.files)]
    for name in names:
        rel = safe_relative_path(name)
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            os.fdopen(open_no_link(verified.root.joinpath(*rel.parts)), "rb") as src,
            target.open("xb") as out,
        ):
            shutil.copyfileobj(src, out, 1024 * 1024)


def _default_loader(bundle: VerifiedBundle, options: LoadOptions) -> LoadedModel:
    return load_model(
        bundle,
        options.providers,
        options.threads,
        precision=options.precision,
        trt_engine_cache_dir=options.trt_engine_cache_dir,
        trt_fp16=options.trt_fp16,
    )


class ModelSlot:
    """Installed bundles and the active model of one node."""

    def __init__(
        self,
        registry: ModelRegistry,
        models_dir: Path,
        trusted_keys: Path | None,
        *,
        providers: Sequence[str],
        threads: int,
        precision: Precision = "fp32",
        trt_engine_cache_dir: Path | None = None,
        trt_fp16: bool = False,
        loader: Loader = _default_loader,
        on_loaded: Callable[[LoadedModel], None] | None = None,
        personal_heads: PersonalHeadStore | None = None,
    ) -> None:
        self.registry = registry
        self.models_dir = models_dir
        self.trusted_keys = trusted_keys
        self.options = LoadOptions(
            providers=tuple(providers),
            threads=threads,
            precision=precision,
            trt_engine_cache_dir=trt_engine_cache_dir,
            trt_fp16=trt_fp16,
        )
        self.loader = loader
        #: Called (under the slot's lock) with each model that is about to serve, e.g. to record it.
        self.on_loaded = on_loaded
        #: Where the clinic's personal head lives; the served model gets it whenever the file changes.
        self.personal_heads = personal_heads
        self._personal_seen: tuple[LoadedModel, tuple[int, int] | None] | None = None
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._loaded_activation = -1
        self._failed_activation = -1

    @classmethod
    def from_settings(
        cls,
        registry: ModelRegistry,
        settings: EdgeSettings,
        *,
        on_loaded: Callable[[LoadedModel], None] | None = None,
    ) -> ModelSlot:
        """The slot of the node ``settings`` describe (providers, threads, precision, TensorRT options)."""
        return cls(
            registry,
            settings.models_dir,
            settings.trusted_keys,
            providers=settings.providers,
            threads=settings.intra_op_threads,
            precision=settings.precision,
            trt_engine_cache_dir=settings.trt_cache_dir,
            trt_fp16=settings.trt_fp16,
            on_loaded=on_loaded,
            personal_heads=PersonalHeadStore.in_data_dir(settings.data_dir),
        )

    def _load(self, bundle: VerifiedBundle, options: LoadOptions) -> LoadedModel:
        """Load and warm up: a model that loads but cannot run one image is a ModelError too."""
        loaded = self.loader(bundle, options)
        seconds = loaded.warm_up()
        logger.info(
            "model %s %s warmed up in %.0f ms on %s",
            loaded.model_id,
            loaded.model_version,
            seconds * 1000,
            loaded.provider,
        )
        return loaded

    # -- verification ----------------------------------------------------------------------------------------

    def _keys(self) -> list[Ed25519PublicKey]:
        if self.trusted_keys is None:
            raise ConfigError(
                "trusted_keys is not set; set FEDCLINIC_EDGE_TRUSTED_KEYS (or trusted_keys in the config) "
                "to the hub's public key file or a directory of *.pub files"
            )
        try:
            return list(load_public_keys(self.trusted_keys))
        except BundleError as exc:
            raise ConfigError(f"trusted_keys {self.trusted_keys}: {exc}") from exc

    def _verify(self, root: Path, extract_to: Path | None = None) -> VerifiedBundle:
        try:
            return verify_bundle(root, self._keys(), extract_to=extract_to)
        except BundleError as exc:
            raise ModelError(f"bundle refused: {exc}") from exc

    # -- install / rollback ----------------------------------------------------------------------------------

    def _refuse_downgrade(self, model_id: str, version: str, allow_downgrade: bool) -> None:
        active = self.registry.active()
        if allow_downgrade or active is None or active.model_id != model_id:
            return
        new, current = _version_key(version), _version_key(active.version)
        if new is not None and current is not None and new < current:
            raise ModelError(
                f"bundle {model_id} {version} is older than the active {active.version}: a downgrade is "
                "refused unless it is an explicit rollback (`fedclinic-edge models rollback`, or install "
                "with allow_downgrade); the active model is unchanged"
            )

    def install(self, bundle: Path, *, allow_downgrade: bool = False) -> ModelRecord:
        """Verify ``bundle`` (dir or .zip), copy it into the models dir, check it loads, make it active.

        A lower version of the active model is refused unless ``allow_downgrade`` (an explicit rollback).
        """
        if not bundle.exists():
            raise ModelError(f"bundle {bundle} does not exist")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.models_dir, prefix=".incoming-") as tmp:
            staging = Path(tmp)
            # A .zip is extracted (safely) into the staging directory by the verification itself.
            verified = self._verify(bundle, extract_to=staging / "unzipped")
            manifest = verified.manifest
            model_id, version = manifest.model_id, manifest.model_version
            if not _SAFE.match(model_id) or not _SAFE.match(version):
                raise ModelError(
                    f"bundle model id/version {model_id!r} {version!r} is not a safe name; refused"
                )
            digest = hashlib.sha256(manifest.canonical_bytes()).hexdigest()
            existing = self.registry.by_id(model_id, version)
            if existing is not None:
                if existing.manifest_sha256 != digest:
                    raise ModelError(
                        f"{model_id} {version} is already installed with a different manifest; "
                        "a changed model needs a new version"
                    )
                self.registry.activate(existing.row, "install (already present)")
                logger.info("model %s %s was installed already; it is active again", model_id, version)
                return existing
            self._refuse_downgrade(model_id, version, allow_downgrade)
            # Copy only what the manifest lists (and the manifest and its signature), never through a link,
            # then verify the copy: what gets loaded later is exactly what was checked.
            copy = staging / "bundle"
            _copy_listed(verified, copy)
            copied = self._verify(copy)
            if hashlib.sha256(copied.manifest.canonical_bytes()).hexdigest() != digest:
                raise ModelError("the bundle changed while it was being installed; install it again")
            try:
                # On the CPU (a GPU may be busy serving): the check is that the file the node will use,
                # in the configured precision, loads and runs.
                self._load(copied, replace(self.options, providers=(CPU,), threads=1))
            except ModelError as exc:
                raise ModelError(f"bundle {model_id} {version} verified but does not load: {exc}") from exc
            final = self.models_dir / model_id / version
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # left over from an install interrupted before it was recorded
                shutil.rmtree(final)
            copy.rename(final)
        row = self.registry.add(model_id, version, final, digest, verified.key_fingerprint)
        self.registry.activate(row, "install")
        logger.info(
            "installed model %s %s (key %s); it is now active", model_id, version, verified.key_fingerprint
        )
        record = self.registry.by_id(model_id, version)
        assert record is not None
        return record

    def rollback(self) -> ModelRecord:
        """Make the model that was active before the current one active again."""
        previous = self.registry.previous()
        if previous is None:
            raise ModelError("there is no previous model to roll back to")
        self.registry.activate(previous.row, "rollback")
        logger.info("rolled back to model %s %s", previous.model_id, previous.version)
        return previous

    # -- serving ---------------------------------------------------------------------------------------------

    def current(self) -> LoadedModel | None:
        """The model to use for the next study, reloading when the active pointer moved (hot swap).

        A model that fails to load leaves the previous one in service (and is not retried until the pointer
        moves again); None only when nothing was ever loaded.
        """
        with self._lock:
            return self._personalised(self._current())

    def _personalised(self, loaded: LoadedModel | None) -> LoadedModel | None:
        """``loaded`` with the personal head on file when it fits; a head that does not fit is retired."""
        if loaded is None or self.personal_heads is None:
            return loaded
        stamp = self.personal_heads.stamp()
        seen = self._personal_seen
        if seen is not None and seen[0] is loaded and seen[1] == stamp:
            return loaded
        head = self.personal_heads.load() if stamp is not None else None
        if head is not None:
            reason = head.misfit(loaded.manifest)
            if reason is not None:
                self.personal_heads.retire(f"a new bundle: {reason}")
                head = None
        loaded.personal = head
        if head is not None:
            logger.info("serving a personalised head (trained in round %d, never sent)", head.trained_round)
        self._personal_seen = (loaded, self.personal_heads.stamp())
        return loaded

    def _current(self) -> LoadedModel | None:
        activation = self.registry.activation_id()
        if activation in (self._loaded_activation, self._failed_activation):
            return self._loaded
        record = self.registry.active()
        if record is None:
            return None
        try:
            verified = self._verify(record.path)
            loaded = self._load(verified, self.options)
            if self.on_loaded is not None:
                self.on_loaded(loaded)
        except (ModelError, ConfigError) as exc:
            self._failed_activation = activation
            if self._loaded is not None:
                logger.error(
                    "model %s %s cannot be used (%s); still serving %s %s",
                    record.model_id,
                    record.version,
                    exc,
                    self._loaded.model_id,
                    self._loaded.model_version,
                )
                return self._loaded
            raise ModelError(f"model {record.model_id} {record.version} cannot be used: {exc}") from exc
        self._loaded, self._loaded_activation = loaded, activation
        logger.info(
            "serving model %s %s (%s, %s) on %s",
            loaded.model_id,
            loaded.model_version,
            loaded.model_file,
            loaded.precision,
            loaded.provider,
        )
        return loaded
