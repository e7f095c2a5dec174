"""The worker: claims ready studies, analyses them, and records each outcome with its outbox entries.

A thread that sleeps on a ``Waker`` until there is something to do: a study completes (the listener calls
``wake``), or a quiet deadline passes. Idle, it uses no CPU.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_node.analysis.analyzer import StudyOutcome, analyze_study
from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.destination import Destination
from edge_node.delivery.outbox import Outbox
from edge_node.errors import InferenceError, ModelError
from edge_node.inference.loaded_model import LoadedModel
from edge_node.state.lifecycle import StudyEvent
from edge_node.state.runs import Claim, FindingRow, InstanceRow, ModelInUse, ReportRef, Runs
from edge_node.waker import Waker

__all__ = ["MODEL_POLL_SECONDS", "Analyzer", "ModelSource", "Worker", "WorkerConfig"]

logger = logging.getLogger(__name__)

#: While studies wait for a model, look this often for a newly installed one (installed by another process).
MODEL_POLL_SECONDS = 5.0


class Analyzer(Protocol):
    def __call__(
        self,
        instances: Sequence[InstanceRow],
        model: LoadedModel,
        out_dir: Path,
        *,
        secondary_capture: bool,
        predecessor: ReportRef | None,
    ) -> StudyOutcome: ...


class ModelSource(Protocol):
    def current(self) -> LoadedModel | None: ...


@dataclass
class WorkerConfig:
    quiet_seconds: float
    results_dir: Path
    destinations: list[Destination]
    secondary_capture: bool
    #: Runs of one study that may end with the node dying before it is set aside as failed.
    max_attempts: int = 3
    #: A released study runs only after this long without a new instance, whatever the associations.
    study_quiet_seconds: float = 0.0

    @property
    def settle_seconds(self) -> float:
        # A study still receiving never waits longer for being released than for being unreleased.
        return min(self.study_quiet_seconds, self.quiet_seconds)


class Worker:
    """Takes ready studies one at a time and runs them through the analysis."""

    def __init__(
        self,
        runs: Runs,
        outbox: Outbox,
        models: ModelSource,
        config: WorkerConfig,
        *,
        analyzer: Analyzer = analyze_study,
        on_results: Callable[[], None] = lambda: None,
    ) -> None:
        self.runs = runs
        self.outbox = outbox
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
        for run_id in self.runs.recover(self.config.max_attempts):
            shutil.rmtree(self._run_dir(run_id), ignore_errors=True)
            logger.warning("run %d was interrupted by a stop; its study is queued again or set aside", run_id)

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
        quiet, settle = self.config.quiet_seconds, self.config.settle_seconds
        model = self._model()
        if model is None:
            ready = self.runs.has_ready(quiet, settle_seconds=settle)
            return MODEL_POLL_SECONDS if ready else self._until_quiet_deadline()
        claim = self.runs.claim_next(quiet, settle_seconds=settle)
        if claim is None:
            return self._until_quiet_deadline()
        self.process(claim, model)
        return 0.0

    def _until_quiet_deadline(self) -> float | None:
        deadline = self.runs.next_quiet_deadline(
            self.config.quiet_seconds, settle_seconds=self.config.settle_seconds
        )
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
        sid = self.runs.db.uid_hash(claim.study_uid)
        out_dir = self._run_dir(claim.run_id)
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True, mode=0o700)
        t0 = time.perf_counter()
        findings: list[FindingRow] = []
        outputs: list[ResultFile] = []
        report: ReportRef | None = None
        try:
            outcome = self.analyzer(
                claim.instances,
                model,
                out_dir,
                secondary_capture=self.config.secondary_capture,
                predecessor=self.runs.last_report(claim.study_id),
            )
            event = StudyEvent.DONE if outcome.status == "done" else StudyEvent.SKIPPED
            reason = outcome.reason
            findings = [FindingRow(f.sop_instance_uid, float(f.score), f.label) for f in outcome.findings]
            outputs = list(outcome.outputs)  # written durably: the outbox never points at a lost file
            report = outcome.report
        except InferenceError as exc:
            event, reason = StudyEvent.FAILED, str(exc)
            logger.error("study %s failed: %s", sid, exc)
        except Exception as exc:
            event, reason = StudyEvent.FAILED, f"internal error ({type(exc).__name__}); see the node log"
            logger.exception("study %s failed with an unexpected error", sid)
        destinations = self.config.destinations
        now = time.time()
        in_use = ModelInUse(model.model_id, model.model_version, model.provider)
        try:
            with self.runs.db.tx() as c:
                queued = self.outbox.enqueue(c, claim.run_id, claim.study_id, outputs, destinations, now)
                state = self.runs.finish(
                    c,
                    claim,
                    event,
                    reason=reason,
                    findings=findings,
                    model=in_use,
                    report=report,
                    results_pending=queued > 0,
                    now=now,
                )
        except Exception as exc:
            # The outcome could not be recorded (disk full, I/O error): record the failure instead, without
            # results, so the study does not stay PROCESSING until a restart. If even that fails, recovery
            # at the next start counts the run as interrupted (and sets the study aside after N of them).
            logger.error("study %s: its outcome cannot be recorded (%s)", sid, type(exc).__name__)
            shutil.rmtree(out_dir, ignore_errors=True)
            failure = f"the run's outcome could not be recorded ({type(exc).__name__}); check the disk"
            with self.runs.db.tx() as c:
                state = self.runs.finish(
                    c, claim, StudyEvent.FAILED, reason=failure, findings=[], model=in_use, now=now
                )
            event, queued, findings, outputs = StudyEvent.FAILED, 0, [], []
        if not outputs:
            # A skipped or failed run leaves no result directory behind (nor any partial file in it).
            shutil.rmtree(out_dir, ignore_errors=True)
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
        if queued:
            self.on_results()
