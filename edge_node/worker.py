"""The worker: claims ready studies, analyses them, and records each outcome with its outbox entries.

The studies ready together go through the stages together: read and preprocess each, one model run over
all their images (a backlog is inferred in batches), write each study's results, then one transaction for
all their outcomes (one commit, not one per study). A batch is bounded (``batch_max``), so the first
results of a backlog are not held back.

A thread that sleeps on a ``Waker`` until there is something to do: a study completes (the listener calls
``wake``), or a quiet deadline passes. Idle, it uses no CPU.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edge_node.analysis.analyzer import (
    PreparedStudy,
    StudyOutcome,
    finish_study,
    prepare_study,
    score_studies,
)
from edge_node.analysis.findings import Finding
from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.destination import Destination
from edge_node.delivery.outbox import Outbox
from edge_node.errors import InferenceError, ModelError
from edge_node.inference.loaded_model import LoadedModel
from edge_node.state.envelope_monitor import EnvelopeResult
from edge_node.state.lifecycle import StudyEvent, StudyState
from edge_node.state.runs import Claim, FindingRow, ModelInUse, ReportRef, Runs
from edge_node.waker import Waker

__all__ = ["MODEL_POLL_SECONDS", "ModelSource", "Worker", "WorkerConfig"]

logger = logging.getLogger(__name__)

#: While studies wait for a model, look this often for a newly installed one (installed by another process).
MODEL_POLL_SECONDS = 5.0


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
    #: Studies taken together when several are ready: one model run for all their images, one transaction
    #: for all their outcomes. Bounded so that a backlog's first results are not held back long.
    batch_max: int = 8

    @property
    def settle_seconds(self) -> float:
        # A study still receiving never waits longer for being released than for being unreleased.
        return min(self.study_quiet_seconds, self.quiet_seconds)


class Worker:
    """Takes the ready studies (up to ``batch_max`` at a time) and runs them through the analysis stages."""

    def __init__(
        self,
        runs: Runs,
        outbox: Outbox,
        models: ModelSource,
        config: WorkerConfig,
        *,
        on_results: Callable[[], None] = lambda: None,
    ) -> None:
        self.runs = runs
        self.outbox = outbox
        self.models = models
        self.config = config
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
        """Process the ready studies, at most ``batch_max``; return how long to sleep (0: go again at once,
        None: until woken)."""
        quiet, settle = self.config.quiet_seconds, self.config.settle_seconds
        model = self._model()
        if model is None:
            ready = self.runs.has_ready(quiet, settle_seconds=settle)
            return MODEL_POLL_SECONDS if ready else self._until_quiet_deadline()
        claims: list[Claim] = []
        while len(claims) < max(1, self.config.batch_max):
            claim = self.runs.claim_next(quiet, settle_seconds=settle)
            if claim is None:
                break
            claims.append(claim)
        if not claims:
            return self._until_quiet_deadline()
        self.process_batch(claims, model)
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
        self.process_batch([claim], model)

    def process_batch(self, claims: Sequence[Claim], model: LoadedModel) -> None:
        """Run claimed studies through the stages and record their outcomes; never raises for a bad study.

        Read and preprocess each study, run the model once over all their images, write each study's
        results, then record every outcome (with its outbox entries) in one transaction.
        """
        t0 = time.perf_counter()
        runs = [_Run(claim, self._run_dir(claim.run_id)) for claim in claims]
        waiting: list[tuple[_Run, PreparedStudy]] = []
        for run in runs:
            shutil.rmtree(run.out_dir, ignore_errors=True)
            run.out_dir.mkdir(parents=True, mode=0o700)
            try:
                prepared = prepare_study(
                    run.claim.instances, model, secondary_capture=self.config.secondary_capture
                )
            except Exception as exc:
                run.fail(exc, self.runs.db.uid_hash(run.claim.study_uid))
                continue
            if isinstance(prepared, StudyOutcome):
                run.take(prepared)
            else:
                waiting.append((run, prepared))
        try:
            scores = score_studies([p for _, p in waiting], model)
        except InferenceError as exc:  # a single study: its own failure
            scores = [exc]
        for (run, prepared), scored in zip(waiting, scores, strict=True):
            sid = self.runs.db.uid_hash(run.claim.study_uid)
            if isinstance(scored, InferenceError):
                run.fail(scored, sid)
                continue
            try:
                outcome = finish_study(
                    prepared,
                    scored,
                    model,
                    run.out_dir,
                    secondary_capture=self.config.secondary_capture,
                    predecessor=self.runs.last_report(run.claim.study_id),
                )
            except Exception as exc:
                run.fail(exc, sid)
                continue
            run.take(outcome)
        self._record(runs, model)
        seconds = time.perf_counter() - t0
        for run in runs:
            logger.info(
                "study %s: %s (%d instances, %d findings, %d result files) in %.2f s (batch of %d) -> %s",
                self.runs.db.uid_hash(run.claim.study_uid),
                run.event.value,
                len(run.claim.instances),
                len(run.findings),
                len(run.outputs),
                seconds,
                len(runs),
                run.state.value if run.state is not None else "?",
            )
        if any(run.queued for run in runs):
            self.on_results()

    def _record(self, runs: Sequence[_Run], model: LoadedModel) -> None:
        """Every outcome in one transaction; when that fails, each alone (a failure is recorded as such)."""
        destinations = self.config.destinations
        now = time.time()
        envelope = model.manifest.envelope
        in_use = ModelInUse(
            model.model_id,
            model.model_version,
            model.provider,
            envelope_quantile=envelope.quantile if envelope is not None else None,
        )
        try:
            with self.runs.db.tx() as c:
                for run in runs:
                    run.queued = self.outbox.enqueue(
                        c, run.claim.run_id, run.claim.study_id, run.outputs, destinations, now
                    )
                    run.state = self.runs.finish(
                        c,
                        run.claim,
                        run.event,
                        reason=run.reason,
                        findings=run.findings,
                        model=in_use,
                        report=run.report,
                        results_pending=run.queued > 0,
                        now=now,
                    )
        except Exception:
            if len(runs) > 1:
                for run in runs:
                    run.queued, run.state = 0, None
                    self._record([run], model)
                return
            (run,) = runs
            sid = self.runs.db.uid_hash(run.claim.study_uid)
            self._record_failure(run, in_use, now, sid)
        for run in runs:
            if not run.outputs:
                # A skipped or failed run leaves no result directory behind (nor any partial file in it).
                shutil.rmtree(run.out_dir, ignore_errors=True)

    def _record_failure(self, run: _Run, in_use: ModelInUse, now: float, sid: str) -> None:
        # The outcome could not be recorded (disk full, I/O error): record the failure instead, without
        # results, so the study does not stay PROCESSING until a restart. If even that fails, recovery
        # at the next start counts the run as interrupted (and sets the study aside after N of them).
        exc_name = type(sys.exc_info()[1]).__name__
        logger.error("study %s: its outcome cannot be recorded (%s)", sid, exc_name)
        shutil.rmtree(run.out_dir, ignore_errors=True)
        failure = f"the run's outcome could not be recorded ({exc_name}); check the disk"
        with self.runs.db.tx() as c:
            run.state = self.runs.finish(
                c, run.claim, StudyEvent.FAILED, reason=failure, findings=[], model=in_use, now=now
            )
        run.event, run.queued, run.findings, run.outputs = StudyEvent.FAILED, 0, [], []


def _envelope_result(f: Finding) -> EnvelopeResult | None:
    """A finding's input envelope result as a run records it; None when the model has no envelope."""
    if f.outside_envelope is None or f.envelope_ratio is None:
        return None
    return EnvelopeResult(
        f.sop_instance_uid,
        f.outside_envelope,
        f.envelope_ratio,
        f.intensity_outside,
        f.negative,
        embedding=f.embedding,
        intensity_features=f.intensity_features,
    )


@dataclass
class _Run:
    """One claimed study on its way through a batch: its outcome so far, then what was recorded."""

    claim: Claim
    out_dir: Path
    event: StudyEvent = StudyEvent.FAILED
    reason: str | None = "not analysed"
    findings: list[FindingRow] = field(default_factory=list)
    outputs: list[ResultFile] = field(default_factory=list)
    report: ReportRef | None = None
    queued: int = 0
    state: StudyState | None = None

    def take(self, outcome: StudyOutcome) -> None:
        self.event = StudyEvent.DONE if outcome.status == "done" else StudyEvent.SKIPPED
        self.reason = outcome.reason
        self.findings = [
            FindingRow(f.sop_instance_uid, float(f.score), f.label, _envelope_result(f))
            for f in outcome.findings
        ]
        self.outputs = list(outcome.outputs)  # written durably: the outbox never points at a lost file
        self.report = outcome.report

    def fail(self, exc: Exception, sid: str) -> None:
        self.event = StudyEvent.FAILED
        if isinstance(exc, InferenceError):
            self.reason = str(exc)
            logger.error("study %s failed: %s", sid, exc)
        else:
            self.reason = f"internal error ({type(exc).__name__}); see the node log"
            logger.error("study %s failed with an unexpected error", sid, exc_info=exc)
