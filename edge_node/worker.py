"""The worker (claims ready studies, analyses them, records the outcome) and the sender (drains the outbox).

Both are threads that sleep on a Condition until there is something to do: a study completes (the listener
calls ``wake``), a quiet deadline passes, or a send retry falls due. Idle, they use no CPU.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_node.analysis import StudyOutcome, analyze_study
from edge_node.dicom.sender import Destination, send_files
from edge_node.errors import InferenceError, ModelError, SendError
from edge_node.inference.model import LoadedModel
from edge_node.outbox import OutboxItem
from edge_node.store import Claim, FindingRow, Store
from edge_node.study import StudyEvent

__all__ = ["Analyzer", "Sender", "Waker", "Worker", "backoff_seconds"]

logger = logging.getLogger(__name__)

#: While studies wait for a model, look this often for a newly installed one (installed by another process).
MODEL_POLL_SECONDS = 5.0


class Analyzer(Protocol):
    def __call__(
        self, instances: Sequence[Path], model: LoadedModel, out_dir: Path, *, secondary_capture: bool
    ) -> StudyOutcome: ...


class ModelSource(Protocol):
    def current(self) -> LoadedModel | None: ...


class Waker:
    """A wake-up flag with a timed wait: ``wake`` from any thread, ``wait`` in the loop (no lost wake-ups)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._flag = False
        self.stopping = False

    def wake(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._cond.notify_all()

    def wait(self, timeout: float | None) -> None:
        with self._cond:
            if not self._flag and not self.stopping:
                self._cond.wait(timeout)
            self._flag = False


def _fsync_tree(paths: Sequence[Path]) -> None:
    """Make result files durable before the outbox points at them (no dangling rows after a power cut)."""
    dirs = set()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(p.parent)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class WorkerConfig:
    quiet_seconds: float
    results_dir: Path
    destinations: list[Destination]
    secondary_capture: bool


class Worker:
    """Takes ready studies one at a time and runs them through the analysis."""

    def __init__(
        self,
        store: Store,
        models: ModelSource,
        config: WorkerConfig,
        *,
        analyzer: Analyzer = analyze_study,
        on_results: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.models = models
        self.config = config
        self.analyzer = analyzer
        self.on_results = on_results
        self.waker = Waker()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self.waker.wake()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edge-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the study in hand (an ONNX run cannot be interrupted) and stop."""
        self.waker.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning(
                    "worker still busy after %.0f s; its run will be redone at the next start", timeout
                )

    def recover(self) -> None:
        """At start: interrupted runs are requeued; their partial result directories are removed."""
        for run_id in self.store.recover():
            shutil.rmtree(self._run_dir(run_id), ignore_errors=True)
            logger.warning("run %d was interrupted by a stop; its study is queued again", run_id)

    def _run_dir(self, run_id: int) -> Path:
        return self.config.results_dir / f"run-{run_id:08d}"

    def _loop(self) -> None:
        while not self.waker.stopping:
            try:
                timeout = self.step()
            except Exception:
                # A bug or a database error must not end the worker: log, back off, try again.
                logger.exception("worker step failed")
                timeout = MODEL_POLL_SECONDS
            if timeout is None or timeout > 0:
                self.waker.wait(timeout)

    def step(self) -> float | None:
        """Process at most one study; return how long to sleep (0: go again at once, None: until woken)."""
        quiet = self.config.quiet_seconds
        model = self._model()
        if model is None:
            return MODEL_POLL_SECONDS if self.store.has_ready(quiet) else self._until_quiet_deadline()
        claim = self.store.claim_next(quiet)
        if claim is None:
            return self._until_quiet_deadline()
        self.process(claim, model)
        return 0.0

    def _until_quiet_deadline(self) -> float | None:
        deadline = self.store.next_quiet_deadline(self.config.quiet_seconds)
        if deadline is None:
            return None
        # A small margin so that the claim's "quiet for quiet_seconds" test holds when we wake.
        return max(0.0, deadline - time.time()) + 0.01

    def _model(self) -> LoadedModel | None:
        try:
            return self.models.current()
        except ModelError as exc:
            logger.error("no usable model: %s", exc)
            return None

    def process(self, claim: Claim, model: LoadedModel) -> None:
        """Run one claimed study and record its outcome; never raises for a bad study."""
        sid = self.store.uid_hash(claim.study_uid)
        out_dir = self._run_dir(claim.run_id)
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        findings: list[FindingRow] = []
        outputs: list[Path] = []
        try:
            outcome = self.analyzer(
                claim.instances, model, out_dir, secondary_capture=self.config.secondary_capture
            )
            event = StudyEvent.DONE if outcome.status == "done" else StudyEvent.SKIPPED
            reason = outcome.reason
            findings = [FindingRow(f.sop_instance_uid, float(f.score), f.label) for f in outcome.findings]
            outputs = [Path(p) for p in outcome.outputs]
            _fsync_tree(outputs)
        except InferenceError as exc:
            event, reason = StudyEvent.FAILED, str(exc)
            logger.error("study %s failed: %s", sid, exc)
        except Exception as exc:
            event, reason = StudyEvent.FAILED, f"internal error ({type(exc).__name__}); see the node log"
            logger.exception("study %s failed with an unexpected error", sid)
        destinations = [(d.ae_title, d.host, d.port) for d in self.config.destinations]
        state = self.store.finish_run(
            claim,
            event,
            reason=reason,
            findings=findings,
            outputs=outputs,
            destinations=destinations,
            model=(model.model_id, model.model_version, model.provider),
        )
        logger.info(
            "study %s: %s (%d instances, %d findings, %d result files) in %.2f s -> %s",
            sid,
            event.value,
            len(claim.instances),
            len(findings),
            len(outputs),
            time.perf_counter() - t0,
            state.value,
        )
        if outputs and destinations:
            self.on_results()


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempts`` (1-based): base, 2*base, 4*base, ... capped at ``cap``."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


SendFn = Callable[[Sequence[Path], Destination, str], None]


def _send(paths: Sequence[Path], dest: Destination, calling_ae: str) -> None:
    send_files(paths, dest, calling_ae)


class Sender:
    """Drains the outbox: one association per destination per round, exponential backoff on failure.

    Delivery is at least once (a crash between the PACS's success and our "sent" commit sends again); result
    SOP Instance UIDs are derived from the source, so a second delivery stores the same object again.
    Entries are retried until they go through: a result must not vanish because the PACS was down a day.
    """

    def __init__(
        self,
        store: Store,
        calling_ae: str,
        *,
        base_seconds: float,
        max_seconds: float,
        send: SendFn = _send,
    ) -> None:
        self.store = store
        self.calling_ae = calling_ae
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self.send = send
        self.waker = Waker()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self.waker.wake()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edge-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.waker.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self.waker.stopping:
            try:
                timeout = self.step()
            except Exception:
                logger.exception("sender step failed")
                timeout = self.base_seconds
            if timeout is None or timeout > 0:
                self.waker.wait(timeout)

    def step(self) -> float | None:
        """Send what is due; return how long to sleep until the next retry (None: until woken)."""
        due = self.store.outbox.due()
        groups: dict[Destination, list[OutboxItem]] = {}
        for item in due:
            groups.setdefault(Destination(item.dest_ae, item.dest_host, item.dest_port), []).append(item)
        for dest, items in groups.items():
            if self.waker.stopping:
                break
            self._send_group(dest, items)
        nxt = self.store.outbox.next_try()
        if nxt is None:
            return None
        return max(0.0, nxt - time.time())

    def _send_group(self, dest: Destination, items: list[OutboxItem]) -> None:
        where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        try:
            self.send([i.path for i in items], dest, self.calling_ae)
        except SendError as exc:
            now = time.time()
            delays = [backoff_seconds(i.attempts + 1, self.base_seconds, self.max_seconds) for i in items]
            self.store.outbox.mark_retry([i.id for i in items], str(exc), [now + d for d in delays])
            logger.warning(
                "sending %d result file(s) to %s failed, retry in %.0f s: %s",
                len(items),
                where,
                min(delays),
                exc,
            )
            return
        self.store.outbox.mark_sent([i.id for i in items])
        logger.debug("outbox: %d entries for %s marked sent", len(items), where)
