"""The sync loop inside ``fedclinic-edge serve``: heartbeat, bundle, tasks, outbox; a hub outage stops none
of the node's inference.

Each pass: a heartbeat when one is due (it also says whether a new publication or tasks wait); the current
publication when it changed (verify the signed record → download → sha256 → ``ModelSlot.install``, which
verifies the bundle itself and keeps the previous model for rollback); open tasks answered into the durable
outbox; the outbox flushed. Then the loop long-polls the hub for tasks until the next heartbeat, so an idle
node costs the hub one open request, and a round's tasks reach it at once. Any failure to reach the hub
backs off exponentially with jitter and is recorded for ``status``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from edge_node import __version__
from edge_node.errors import ConfigError, EdgeError, ModelError
from edge_node.inference.model_slot import ModelSlot
from edge_node.inference.personal_head import PersonalHeadStore
from edge_node.learning.dispatch import Learners, LearningRefused
from edge_node.learning.dispatch import answer as answer_with_learners
from edge_node.learning.external import ExternalLearner, learner_dir
from edge_node.protection.errors import TaskRefused
from edge_node.protection.gate import PrivacyGate
from edge_node.protection.pipeline import ProtectionPipeline
from edge_node.protocol.errors import EncodingError, ProtocolError, PublicationError, SecAggError
from edge_node.protocol.protection import CompressionKind, ProtectionSpec
from edge_node.protocol.publication import SignedPublication, check_publication
from edge_node.protocol.signing import load_public_keys
from edge_node.protocol.tensors import decode_tensors, encode_tensors
from edge_node.protocol.updates import UpdateEnvelope
from edge_node.protocol.wire import (
    Heartbeat,
    HeartbeatReply,
    Task,
    TaskList,
    TaskRefusal,
    TaskState,
    UpdateSubmission,
)
from edge_node.state.envelope_features import envelope_features, kept_images
from edge_node.state.labels import LabelStore
from edge_node.state.node_state import NodeState
from edge_node.uplink.backoff import Backoff
from edge_node.uplink.credential import CredentialFileAuth, NodeCredential, uplink_dir
from edge_node.uplink.envelope_answer import ENVELOPE_KINDS, EnvelopeRefused, answer_envelope
from edge_node.uplink.errors import HubRefusedError, PinningError, UplinkError
from edge_node.uplink.outbox import UpdateOutbox
from edge_node.uplink.secure_aggregation import SecureAggregationRound
from edge_node.uplink.state import StateFile
from edge_node.uplink.tasks import LocalStats, TaskError
from edge_node.uplink.transport import HubTransport

if TYPE_CHECKING:
    from edge_node.settings import EdgeSettings

__all__ = ["SyncLoop", "heartbeat_counts", "local_stats", "sync_loop_for", "uplink_dir"]

logger = logging.getLogger(__name__)

#: Longest single long-poll for tasks; shorter than any proxy's idle timeout we have met.
MAX_POLL_SECONDS = 25.0
#: Longest wait between tries while the hub is unreachable: a node is back within a minute of the hub, and a
#: thousand waiting nodes still cost the hub under 20 requests a second (jitter spreads them).
MAX_BACKOFF_SECONDS = 60.0
#: Statuses after which an update is never retried: the hub has judged it (rejected, late, not ours).
FINAL_REFUSALS = frozenset({400, 403, 404, 409, 413, 422})


class SyncLoop:
    """One node's conversation with its hub, in a background thread (``start``/``stop``) or step by step."""

    def __init__(
        self,
        directory: Path,
        credential: NodeCredential,
        slot: ModelSlot,
        store: NodeState,
        *,
        edge_version: str,
        extra_trusted_keys: Path | None = None,
        backoff: Backoff | None = None,
        poll_seconds: float = MAX_POLL_SECONDS,
        gate: PrivacyGate | None = None,
        learners: Learners | None = None,
    ) -> None:
        self.directory = directory
        self.credential = credential
        self.slot = slot
        self.store = store
        self.edge_version = edge_version
        self.extra_trusted_keys = extra_trusted_keys
        self.backoff = backoff or Backoff(base_seconds=1.0, max_seconds=MAX_BACKOFF_SECONDS)
        self.poll_seconds = poll_seconds
        self.gate = gate
        #: The node's learners (None: it answers only the kinds that need no training).
        self.learners = learners
        self.outbox = UpdateOutbox(directory / "outbox.sqlite3")
        self.state = StateFile(directory / "state.json")
        # The secret is re-read when a rotation replaces the credential file while the node runs.
        self.transport = HubTransport(
            credential.hub_url, credential.cert_pem, auth=CredentialFileAuth(directory, credential)
        )
        self.heartbeat_interval = max(1.0, credential.heartbeat_interval_s)
        self._next_heartbeat = 0.0
        self._failures = 0
        self._skipped: dict[str, str] = {}  # task_id -> why this node cannot answer it
        #: Tasks this process took through secure aggregation (answered or failed: never run twice).
        self._answered_masked: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="uplink-sync", daemon=True)
        self._thread.start()
        logger.info("uplink: node %s syncing with %s", self.credential.node_id, self.credential.hub_url)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.transport.close()  # ends a long-poll in flight
        if self._thread is not None:
            self._thread.join(timeout)
        self.outbox.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.step()
            except (UplinkError, ProtocolError) as exc:
                wait = self._failed(exc)
            except Exception as exc:  # the loop must outlive any surprise; inference goes on regardless
                logger.exception("uplink: unexpected error")
                wait = self._failed(exc)
            if wait > 0:
                self._stop.wait(wait)

    def _failed(self, exc: Exception) -> float:
        if self._stop.is_set():
            return 0.0
        self._failures += 1
        reason = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, HubRefusedError) and exc.code == "revoked":
            reason = f"this node was revoked at the hub ({exc.reason}); enroll again to rejoin"
        self.state.failed(reason)
        delay = self.backoff.delay(self._failures)
        level = logging.ERROR if isinstance(exc, PinningError) else logging.WARNING
        logger.log(level, "uplink: %s; next try in %.0f s", reason, delay)
        return delay

    # -- one pass --------------------------------------------------------------------------------------------

    def step(self, *, poll: bool = True) -> float:
        """One pass; returns how long to wait before the next (0 when the long-poll itself waited)."""
        now = time.monotonic()
        if now >= self._next_heartbeat:
            reply = self.heartbeat()
            self._next_heartbeat = now + reply.heartbeat_interval_s
            self.heartbeat_interval = reply.heartbeat_interval_s
            if reply.publication_id is not None and reply.publication_id != self.state.state.publication_id:
                self.sync_bundle()
        self.flush_outbox()
        remaining = max(0.0, self._next_heartbeat - time.monotonic())
        wait = min(remaining, self.poll_seconds) if poll else 0.0
        fresh = self.pull_tasks(wait_seconds=wait)
        self._failures = 0
        self.state.reached()
        if fresh:
            self.flush_outbox()
            return 0.0
        # Nothing new came back: the long-poll has waited already, unless the hub answered at once with tasks
        # this node cannot answer (then sleep, do not spin).
        return 0.0 if poll and not self._open_skipped else min(remaining, self._until_outbox_due())

    def _until_outbox_due(self) -> float:
        due = self.outbox.next_try()
        return self.heartbeat_interval if due is None else max(0.0, due - time.time())

    # -- heartbeat -------------------------------------------------------------------------------------------

    def heartbeat(self) -> HeartbeatReply:
        active = self.store.models.active()
        counts = heartbeat_counts(self.store, self.outbox.counts())
        beat = Heartbeat(
            edge_version=self.edge_version,
            model_id=active.model_id if active else None,
            model_version=active.version if active else None,
            publication_id=self.state.state.publication_id,
            health="ok" if active is not None else "no_model",
            counts=counts,
        )
        response = self.transport.request("POST", "/v1/node/heartbeat", json=beat.model_dump(mode="json"))
        return HeartbeatReply.model_validate_json(response.content)

    # -- bundles ---------------------------------------------------------------------------------------------

    def _trusted_keys(self) -> list[Ed25519PublicKey]:
        keys = list(load_public_keys(self.directory / "hub.pub"))
        if self.extra_trusted_keys is not None:
            keys += load_public_keys(self.extra_trusted_keys)
        return keys

    def sync_bundle(self) -> str | None:
        """Fetch the node's current publication and install it; returns the publication id now served.

        A refused publication (bad signature, replay, unsigned downgrade, wrong hash, bundle that does not
        verify or load) is recorded with its reason and the node keeps its model.
        """
        headers = {"If-None-Match": self.state.state.etag} if self.state.state.etag else None
        response = self.transport.request("GET", "/v1/node/bundle", headers=headers, ok=(200, 304, 404))
        if response.status_code in (304, 404):
            return self.state.state.publication_id
        etag = response.headers.get("ETag")
        try:
            signed = SignedPublication.model_validate_json(response.content)
        except ValidationError as exc:
            raise UplinkError(f"the hub's publication does not match the contract: {exc}") from exc
        pid = signed.record.publication_id
        if pid == self.state.state.publication_id:
            return pid
        if pid in self.state.state.refused:
            return self.state.state.publication_id
        try:
            self._install(signed)
        except (PublicationError, ModelError, ConfigError) as exc:
            self.state.refused(pid, str(exc), etag)
            logger.error("uplink: publication %s refused (%s); the current model keeps serving", pid, exc)
            return self.state.state.publication_id
        self.state.accepted(pid, signed.record.seq, etag)
        return pid

    def _install(self, signed: SignedPublication) -> None:
        active = self.store.models.active()
        same_model = active is not None and active.model_id == signed.record.model_id
        record = check_publication(
            signed,
            self._trusted_keys(),
            node_id=self.credential.node_id,
            cohort=self.credential.cohort,
            last_seq=self.state.state.last_seq,
            current_version=active.version if (active is not None and same_model) else None,
        )
        archive = self.transport.request("GET", f"/v1/bundles/{record.publication_id}/archive").content
        digest = hashlib.sha256(archive).hexdigest()
        if digest != record.bundle_sha256 or len(archive) != record.bundle_bytes:
            raise PublicationError(
                f"the bundle of publication {record.publication_id} has sha256 {digest[:16]}… and "
                f"{len(archive)} bytes, not what the signed record says ({record.bundle_sha256[:16]}…)"
            )
        incoming = self.directory / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=incoming) as tmp:
            path = Path(tmp) / f"{record.publication_id}.zip"
            path.write_bytes(archive)
            installed = self.slot.install(path)
        logger.info(
            "uplink: publication %s installed: %s %s%s",
            record.publication_id,
            installed.model_id,
            installed.version,
            " (rollback)" if record.rollback else "",
        )

    # -- tasks -----------------------------------------------------------------------------------------------

    @property
    def _open_skipped(self) -> bool:
        return bool(self._skipped)

    @property
    def skipped(self) -> dict[str, str]:
        """Open tasks this node did not answer, by task id, with the reason (refused or not computable)."""
        return dict(self._skipped)

    def pull_tasks(self, wait_seconds: float = 0.0) -> int:
        """Answer the node's open tasks into the outbox; returns how many new answers were queued."""
        params = {"wait": f"{wait_seconds:.1f}"} if wait_seconds > 0 else None
        response = self.transport.request("GET", "/v1/node/tasks", params=params)
        tasks = TaskList.model_validate_json(response.content).tasks
        open_ids = {t.task_id for t in tasks if t.state is TaskState.OPEN}
        self._skipped = {k: v for k, v in self._skipped.items() if k in open_ids}
        fresh = 0
        for task in tasks:
            if task.state is not TaskState.OPEN or task.task_id in self._skipped:
                continue
            if self.outbox.has(task.task_id) or task.task_id in self._answered_masked:
                continue
            if task.deadline <= datetime.now(timezone.utc):
                continue
            reason = self.gate.refusal(self._spec(task)) if self.gate is not None else None
            if reason is not None:
                self._refuse(task, reason)
                continue
            try:
                self._answer(task)
            except TaskRefused as exc:  # the budget ran out between the check and the release
                self._refuse(task, str(exc))
                continue
            except (LearningRefused, EnvelopeRefused) as exc:  # too few labels or images, ...: say why
                self._refuse(task, str(exc))
                continue
            except TaskError as exc:
                self._skipped[task.task_id] = str(exc)
                logger.warning("uplink: task %s (%s) not answered: %s", task.task_id, task.kind.value, exc)
                continue
            fresh += 1
        return fresh

    @staticmethod
    def _spec(task: Task) -> ProtectionSpec:
        """The round's stated protection; a task without one is a plain round of unknown size (one node)."""
        if task.protection is not None:
            return task.protection
        return ProtectionSpec(kind=task.kind, cohort_size=1)

    def _refuse(self, task: Task, reason: str) -> None:
        """Tell the hub this clinic's floor refuses the task (nothing was computed); never retried."""
        self._skipped[task.task_id] = reason
        logger.warning("uplink: task %s (round %d) refused: %s", task.task_id, task.round, reason)
        try:
            self.transport.request(
                "POST",
                f"/v1/tasks/{task.task_id}/refusal",
                json=TaskRefusal(reason=reason).model_dump(mode="json"),
            )
        except HubRefusedError as exc:
            if exc.status not in FINAL_REFUSALS:
                raise
            logger.info("uplink: the hub did not take the refusal of task %s: %s", task.task_id, exc.reason)

    def _answer(self, task: Task) -> None:
        params = {}
        if task.params_bytes > 0:
            raw = self.transport.request("GET", f"/v1/tasks/{task.task_id}/params").content
            if hashlib.sha256(raw).hexdigest() != task.params_sha256:
                raise TaskError("the task's params do not match their announced sha256")
            try:
                params = decode_tensors(raw)
            except EncodingError as exc:
                raise TaskError(str(exc)) from exc
        try:
            model = self.slot.current()
        except (ModelError, ConfigError):
            model = None
        if task.kind in ENVELOPE_KINDS:
            answer = answer_envelope(task, params, model, partial(envelope_features, self.store.db))
        else:
            answer = answer_with_learners(task, params, model, local_stats(self.store), self.learners)
        spec = self._spec(task)
        if spec.secure_aggregation:
            self._answer_masked(task, answer.tensors, spec)
            return
        payload = encode_tensors(answer.tensors)
        # A compressed round's cap applies to the compressed payload, known only after the release.
        if spec.compression is CompressionKind.NONE and len(payload) > task.max_update_bytes:
            raise TaskError(
                f"the answer is {len(payload)} bytes, over the task's cap {task.max_update_bytes}"
            )
        if self.gate is not None:
            # Protected and charged to the ledger before it enters the outbox: nothing leaves unrecorded.
            payload = self.gate.release(task.task_id, task.round, answer.tensors, spec).payload
            if len(payload) > task.max_update_bytes:  # charged but not sent: the ledger overstates
                raise TaskError(
                    f"the protected answer is {len(payload)} bytes, over the task's cap "
                    f"{task.max_update_bytes}"
                )
        envelope = UpdateEnvelope(
            node_id=self.credential.node_id,
            round=task.round,
            kind=task.kind,
            num_examples=answer.num_examples,
            metrics=answer.metrics,
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            payload_bytes=len(payload),
        )
        self.outbox.put(task.task_id, envelope.model_dump_json(), payload)
        self.state.answered()
        logger.info("uplink: task %s (%s, round %d) answered", task.task_id, task.kind.value, task.round)

    def _answer_masked(self, task: Task, update: Mapping[str, np.ndarray], spec: ProtectionSpec) -> None:
        """Take part in the round's secure aggregation; the masked input goes to the hub, not the outbox.

        The protocol's steps wait for the other nodes, so this blocks the loop for up to a few of the hub's
        step times. A masked input is never re-sent (its masks belong to this one run of the protocol): a
        failure leaves the task unanswered, with the reason.
        """
        protocol = SecureAggregationRound.for_task(self.transport, self.credential.node_id, task)
        gate = self.gate
        try:
            protocol.advertise()
            protocol.share()
            if gate is not None:
                # Protected (clip, noise, mask) and charged to the ledger before anything leaves.
                protected = gate.release(task.task_id, task.round, update, spec, masker=protocol.client.mask)
            else:
                protected = protocol.protect(update, spec, ProtectionPipeline())
            protocol.send_masked(protected)
            protocol.unmask()
        except (SecAggError, HubRefusedError) as exc:
            raise TaskError(f"secure aggregation of round {task.round} did not complete: {exc}") from exc
        finally:
            self._answered_masked.add(task.task_id)
        self.state.answered()
        logger.info(
            "uplink: task %s (round %d) answered under secure aggregation: %d bytes sent",
            task.task_id,
            task.round,
            protocol.bytes_sent,
        )

    # -- outbox ----------------------------------------------------------------------------------------------

    def flush_outbox(self) -> int:
        """Send every due update; returns how many the hub took. A failure is rescheduled, then raised."""
        sent = 0
        for entry in self.outbox.due():
            submission = UpdateSubmission(
                task_id=entry.task_id,
                envelope=UpdateEnvelope.model_validate_json(entry.envelope),
                payload_b64=base64.b64encode(entry.payload).decode("ascii"),
            )
            try:
                self.transport.request(
                    "POST", f"/v1/tasks/{entry.task_id}/update", json=submission.model_dump(mode="json")
                )
            except HubRefusedError as exc:
                if exc.status in FINAL_REFUSALS:
                    self.outbox.mark_refused(entry.id, f"{exc.code}: {exc.reason}")
                    logger.warning("uplink: update for task %s refused: %s", entry.task_id, exc.reason)
                    continue
                self._retry_later(entry.id, entry.attempts, str(exc))
                raise
            except UplinkError as exc:
                self._retry_later(entry.id, entry.attempts, str(exc))
                raise
            self.outbox.mark_sent(entry.id)
            sent += 1
        return sent

    def _retry_later(self, entry_id: int, attempts: int, error: str) -> None:
        self.outbox.mark_retry(entry_id, error, time.time() + self.backoff.delay(attempts + 1))


def heartbeat_counts(store: NodeState, updates: Mapping[str, int]) -> dict[str, int]:
    """The heartbeat's counters: studies by state, instances, results, updates by state and, when the active
    model has an input envelope, its latest analysed images, how many lay outside it, whether that raises
    the drift alarm, how many images the node keeps features of for the envelope's refit
    (``envelope_kept``: ``kept_images``), and with an intensity part whether they look like negatives
    (counts only)."""
    counts = {k: v for k, v in store.status.counts().items() if v >= 0}
    counts.update({f"updates_{k}": v for k, v in updates.items()})
    active = store.models.active()
    window = store.envelope.window_of(active.model_id, active.version) if active is not None else None
    if window is not None:
        counts.update(
            {
                "envelope_images": window.images,
                "envelope_outside": window.outside,
                "envelope_drifting": int(window.drifting),
                "envelope_kept": kept_images(store.db, window.model_id, window.model_version),
            }
        )
        if window.intensity_outside is not None:
            counts["envelope_negative"] = int(window.looks_negative)
    return dict(list(counts.items())[:32])


def local_stats(store: NodeState) -> LocalStats:
    """Studies per predicted class (top-scored finding of each study's latest run): counts, never cases."""
    rows = store.db.query(
        """
        SELECT (SELECT label FROM findings f WHERE f.run_id = r.id ORDER BY score DESC LIMIT 1) AS label
        FROM runs r WHERE r.id IN (SELECT MAX(id) FROM runs GROUP BY study_id)
        """
    )
    counts: dict[str, int] = {}
    for r in rows:
        if r["label"] is not None:
            counts[str(r["label"])] = counts.get(str(r["label"]), 0) + 1
    return LocalStats(label_counts=counts, num_examples=sum(counts.values()))


def sync_loop_for(settings: EdgeSettings, slot: ModelSlot, store: NodeState) -> SyncLoop | None:
    """The sync loop of an enrolled node (None when it never enrolled: it then runs on its own).

    A node without ``trusted_keys`` of its own trusts the hub key it received at enrollment for bundles too.
    """
    directory = uplink_dir(settings.data_dir)
    credential = NodeCredential.load(directory)
    if credential is None:
        logger.info("uplink: not enrolled with a hub (fedclinic-edge enroll CODE); running stand-alone")
        return None
    if slot.trusted_keys is None:
        slot.trusted_keys = directory / "hub.pub"
    learning = settings.learning
    external = None
    if learning.torch_command is not None:
        torch_learner = ExternalLearner(
            learning.torch_command, learner_dir(settings.data_dir), timeout_s=learning.torch_timeout_s
        )
        external = torch_learner.answer
    learners = Learners(
        labeled=LabelStore(store.db).labeled_instances,
        personal_heads=slot.personal_heads or PersonalHeadStore.in_data_dir(settings.data_dir),
        external=external,
        prepared_set=learning.training_set_file,
    )
    return SyncLoop(
        directory,
        credential,
        slot,
        store,
        edge_version=__version__,
        extra_trusted_keys=settings.trusted_keys,
        gate=PrivacyGate.in_data_dir(settings.privacy, settings.data_dir),
        learners=learners,
    )
