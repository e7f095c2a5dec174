"""The edge node process: listener, worker and sender wired together, started in order, stopped on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from edge_node.analysis.result_warmup import warm_up_results
from edge_node.delivery.outbox import Outbox
from edge_node.delivery.sender import Sender
from edge_node.errors import ConfigError, ModelError, SpoolError
from edge_node.inference.loaded_model import LoadedModel
from edge_node.inference.model_slot import ModelSlot
from edge_node.inference.serving_record import ServingRecord, write_serving
from edge_node.ingest.listener import Listener, ListenerConfig
from edge_node.ingest.retention import purge_spool
from edge_node.ingest.spool import Spool
from edge_node.node_lock import NodeLock
from edge_node.page.server import ClinicianPage, PageConfig
from edge_node.service_notify import notify_service
from edge_node.settings import EdgeSettings
from edge_node.state.node_state import NodeState
from edge_node.uplink.sync import sync_loop_for
from edge_node.worker import Worker, WorkerConfig

__all__ = ["Node"]

logger = logging.getLogger(__name__)


class Node:
    """One edge node: ``start`` brings it up (recovering from any crash first), ``stop`` takes it down."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            settings.results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"data_dir {settings.data_dir} cannot be created ({exc.strerror}); "
                "set FEDCLINIC_EDGE_DATA_DIR to a writable directory"
            ) from exc
        self.state = NodeState.open(settings.db_path)
        self.outbox = Outbox(self.state.db)
        self.spool = Spool(
            settings.spool_dir,
            self.state.ingest,
            max_instance_bytes=settings.max_instance_bytes,
            min_free_bytes=settings.min_free_bytes,
            reserve=settings.spool_reserve,
        )
        self.models = ModelSlot.from_settings(self.state.models, settings, on_loaded=self._on_model_loaded)
        self.uplink = sync_loop_for(settings, self.models, self.state)  # None when not enrolled
        self._results_warm = False
        self.sender = Sender(
            self.outbox,
            settings.ae_title,
            base_seconds=settings.send_retry_base_seconds,
            max_seconds=settings.send_retry_max_seconds,
        )
        self.worker = Worker(
            self.state.runs,
            self.outbox,
            self.models,
            WorkerConfig(
                quiet_seconds=settings.quiet_seconds,
                results_dir=settings.results_dir,
                destinations=settings.destination_values,
                secondary_capture=settings.send_secondary_capture,
                max_attempts=settings.max_run_attempts,
                study_quiet_seconds=settings.study_quiet_seconds,
            ),
            on_results=self.sender.wake,
        )
        self.listener = Listener(
            ListenerConfig(
                settings.ae_title,
                settings.host,
                settings.port,
                settings.allowed_calling_aes,
                max_associations=settings.max_associations,
                max_associations_per_peer=settings.max_associations_per_peer,
                acse_timeout=settings.acse_timeout_s,
                dimse_timeout=settings.dimse_timeout_s,
                network_timeout=settings.network_timeout_s,
                max_pdu=settings.max_pdu_bytes,
                transport=settings.receive_transport,
                receive_processes=settings.receive_processes,
            ),
            self.spool,
            on_complete=self.worker.wake,
        )
        self.page = (
            ClinicianPage(PageConfig.from_settings(settings), self.state.db)
            if settings.page_enabled
            else None
        )
        self.lock = NodeLock(settings.data_dir)
        self._stopped = threading.Event()

    def _on_model_loaded(self, model: LoadedModel) -> None:
        """Record what really serves (for ``status``) and warm up the result builders once."""
        try:
            write_serving(self.settings.serving_path, ServingRecord.of(model, self.settings.precision))
        except OSError as exc:
            logger.warning("cannot record the model in use at %s: %s", self.settings.serving_path, exc)
        if not self._results_warm:
            self._results_warm = True
            try:
                seconds = warm_up_results(model.manifest)
            except Exception as exc:  # only a speed-up: a failure here must not keep the model from serving
                logger.warning("warming up the result builders failed (%s)", type(exc).__name__)
            else:
                logger.info("result builders (SR, SC) warmed up in %.0f ms", seconds * 1000)

    def _load_model(self) -> None:
        """Load and warm up the active model now, not on the first study (which would wait ~1 s for it)."""
        t0 = time.perf_counter()
        try:
            model = self.models.current()
        except (ModelError, ConfigError) as exc:
            logger.error("the active model cannot be used: %s", exc)
            return
        if model is not None:
            logger.info("ready to serve %s in %.2f s", model.model_id, time.perf_counter() - t0)

    def start(self) -> tuple[str, int]:
        """Lock the data dir, recover, listen, load the model, start worker and sender; then say ready.

        In this order: a second node on the same data directory is refused before it touches anything;
        recovery runs before any new instance can arrive; a port in use fails before the model loads
        (seconds, or minutes for a TensorRT engine); instances that arrive while the model loads are spooled
        and wait. Readiness goes to systemd (READY=1) only when all of it runs.
        """
        self.lock.acquire()
        try:
            return self._start()
        except BaseException:
            self.listener.stop()
            self.lock.release()
            raise

    def _start(self) -> tuple[str, int]:
        self.worker.recover()
        try:
            self.spool.recover()
        except OSError as exc:
            raise SpoolError(f"cannot read the spool at {self.spool.root}: {exc.strerror}") from exc
        try:
            address = self.listener.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.settings.host}:{self.settings.port} ({exc.strerror}); another "
                "service may hold the port: set FEDCLINIC_EDGE_PORT / FEDCLINIC_EDGE_HOST (or port / host "
                "in the config file)"
            ) from exc
        if self.state.models.active() is None:
            logger.warning(
                "no model installed: studies are spooled and wait; run `fedclinic-edge install-bundle PATH`"
            )
        else:
            self._load_model()
        if not self.settings.destinations:
            logger.warning("no destinations configured: results stay in %s", self.settings.results_dir)
        counts = self.state.status.counts()
        logger.info(
            "state at start: %d instances, %d studies waiting, %d results to send",
            counts["instances"],
            counts["received"] + counts["queued"],
            counts["outbox_pending"],
        )
        self._start_page()
        self.worker.start()
        self.sender.start()
        threading.Thread(target=self._purge_loop, name="edge-spool-purge", daemon=True).start()
        if self.uplink is not None:
            self.uplink.start()
        notify_service("READY=1")
        return address

    def _start_page(self) -> None:
        """The clinician page; a node whose page cannot listen still serves its PACS, and says why."""
        if self.page is None:
            return
        try:
            self.page.start()
        except OSError as exc:
            logger.error(
                "the clinician page cannot listen on %s:%d (%s); the node runs without it: set page_port"
                " (FEDCLINIC_EDGE_PAGE_PORT) to a free port",
                self.settings.page_host,
                self.settings.page_port,
                exc.strerror,
            )
            self.page = None

    def _purge_loop(self) -> None:
        """Apply the spool's retention policy at start and every spool_purge_interval_seconds."""
        while not self._stopped.is_set():
            try:
                purge_spool(self.spool, self.settings.retention_policy)
            except Exception:
                # A purge that fails leaves the spool as it was: log it, try again at the next interval.
                logger.exception("spool purge failed")
            self._stopped.wait(self.settings.spool_purge_interval_seconds)

    def stop(self) -> None:
        """Stop taking associations, let the worker finish its study, stop the sender, close the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        logger.info("stopping")
        notify_service("STOPPING=1")
        self.listener.stop()
        self.worker.stop()
        self.sender.stop()
        if self.uplink is not None:
            self.uplink.stop()
        if self.page is not None:
            self.page.stop()
        self.state.close()
        self.lock.release()
        logger.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        stop = threading.Event()

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("received %s", signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            stop.wait()
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
