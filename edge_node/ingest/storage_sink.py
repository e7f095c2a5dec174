"""What a received instance becomes: a DICOM status for the sender, and the studies its association touched.

Every receive transport ends a C-STORE here, wherever it runs (the node's process, or a receiver process,
``edge_node.ingest.receiver_process``): ``stored`` (a whole stream) and ``store`` (the native transport's
instance, written as it arrived) run the transport's way of making the instance durable and turn the outcome
into a status with a short comment for the sender, and a log line without identifiers; no exception leaves
them. The native transport calls ``settle`` after its response, which records the instance and places it.
The sink also remembers which studies each open association touched, so that when the association ends:

* released: its studies are complete and queued for the worker at once;
* aborted, or the connection dropped without a release: the sender may retry, so its studies are not
  complete; they become ready after ``quiet_seconds`` without a new instance (the worker's timer).

``on_studies`` is called when the worker should look again (without polling): a study's first instance in
an association (the worker learns its quiet deadline), a release that queued studies, an association that
ended with studies waiting for quiet time. It must be cheap and must not raise.

Statuses (PS3.4 B.2.3, PS3.7 C):

=========  =====================================================================================
0x0000     success: on disk (fsync) and recorded
0xA700     refused, out of resources: instance larger than max_instance_bytes, disk (nearly) full
0xA701     refused, out of resources: the spool cannot be written (I/O error, data_dir unwritable)
0xA900     error, data set does not match SOP class: SOP Class/Instance UID differ from the request
0xC000     error, cannot understand: the data set cannot be parsed, or a mandatory UID (study, series,
           instance) is missing or invalid
0x0110     processing failure: anything unexpected (a bug), logged with a traceback
=========  =====================================================================================
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from edge_node.errors import BadInstanceError, InstanceMismatchError, SpoolError, SpoolFullError
from edge_node.ingest.command_set import Command
from edge_node.ingest.spool import IncomingInstance, Spool, SpoolReceipt

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "STATUS_SPOOL_FAILURE",
    "STATUS_SUCCESS",
    "StorageSink",
]

logger = logging.getLogger(__name__)

_R = TypeVar("_R")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SPOOL_FAILURE = 0xA701
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110


class StorageSink:
    """Statuses for C-STOREs and the studies of each open association (``AssociationSink`` for natives)."""

    def __init__(self, spool: Spool, on_studies: Callable[[], None]) -> None:
        self.spool = spool
        self._on_studies = on_studies
        # Studies touched by each open association, keyed by the transport's association key.
        self._touched: dict[int, set[int]] = {}
        # Acknowledged instances whose ``settle`` failed (with their association's key), oldest first.
        self._unsettled: list[tuple[int, IncomingInstance]] = []
        self._lock = threading.Lock()
        self._retry_lock = threading.Lock()

    def stored(self, key: int, calling: str, spool_it: Callable[[], SpoolReceipt]) -> tuple[int, str]:
        """Run ``spool_it`` (a whole-stream ``Spool.put``): (status, error comment) for the sender."""
        status, receipt = self._status(calling, spool_it)
        if receipt is not None:
            self._touch(key, receipt)
        return status

    # -- the native transport's sink (``edge_node.ingest.native_transport.AssociationSink``) ---------------

    def store(
        self, key: int, calling_ae: str, incoming: IncomingInstance, command: Command
    ) -> tuple[int, str]:
        """Flush ``incoming`` (``IncomingInstance.commit``): the status for its sender. ``settle`` follows.

        Refused (0xA701) while an instance this process acknowledged could not be recorded: so a broken
        database costs the sender one acknowledged instance (durable, recorded later or at the next start)
        and then failure statuses, as before the row moved after the response.
        """

        def make_durable() -> None:
            try:
                self._settle_earlier()
            except BaseException:
                incoming.discard()
                raise
            incoming.commit(
                calling_ae=calling_ae,
                expected_sop_class=command.affected_sop_class,
                expected_sop_instance=command.affected_sop_instance,
            )

        status, _ = self._status(calling_ae, make_durable)
        return status

    def settle(self, key: int, incoming: IncomingInstance) -> None:
        """After the response: record and place what ``store`` flushed; its study joins the association's.

        When that fails, the instance waits here and ``store`` tries again before its next success."""
        try:
            receipt = incoming.settle()
        except SpoolError as exc:
            logger.error("%s; it is tried again before the next instance is acknowledged", exc)
            with self._lock:
                self._unsettled.append((key, incoming))
            return
        if receipt is not None:
            self._touch(key, receipt)

    def _settle_earlier(self) -> None:
        """Settle the instances whose ``settle`` failed; raise SpoolError while one still fails."""
        if not self._unsettled:  # the common case, without a lock: only settle and this change the list
            return
        with self._retry_lock:
            with self._lock:
                waiting, self._unsettled = self._unsettled, []
            for i, (key, incoming) in enumerate(waiting):
                try:
                    receipt = incoming.settle()
                except SpoolError as exc:
                    with self._lock:
                        self._unsettled[:0] = waiting[i:]  # still oldest first
                    raise SpoolError(
                        f"refused while {len(waiting) - i} earlier instance(s) wait: {exc}"
                    ) from exc
                if receipt is not None:
                    logger.info("an acknowledged instance that had waited was recorded and placed")
                    self._touch(key, receipt)

    def _status(self, calling: str, make_durable: Callable[[], _R]) -> tuple[tuple[int, str], _R | None]:
        """Run ``make_durable``: (status, error comment) for the sender, and its result (None on error)."""
        t0 = time.perf_counter()
        try:
            made = make_durable()
        except SpoolFullError as exc:
            logger.warning("refused an instance from %s: %s", calling, exc)
            return (STATUS_OUT_OF_RESOURCES, "refused: out of resources"), None
        except SpoolError as exc:
            logger.error("could not spool an instance from %s: %s", calling, exc)
            return (STATUS_SPOOL_FAILURE, "refused: cannot store the instance now"), None
        except InstanceMismatchError as exc:
            logger.warning("rejected an instance from %s: %s", calling, exc)
            return (STATUS_MISMATCH, "data set does not match the request"), None
        except BadInstanceError as exc:
            logger.warning("rejected an instance from %s: %s", calling, exc)
            return (STATUS_CANNOT_UNDERSTAND, str(exc)), None
        except Exception:
            logger.exception("unexpected error while storing an instance from %s", calling)
            return (STATUS_PROCESSING_FAILURE, "internal error; see the edge node log"), None
        logger.debug("spooled an instance from %s in %.1f ms", calling, (time.perf_counter() - t0) * 1000)
        return (STATUS_SUCCESS, ""), made

    def _touch(self, key: int, receipt: SpoolReceipt) -> None:
        with self._lock:
            studies = self._touched.setdefault(key, set())
            new_study = receipt.study_id not in studies
            studies.add(receipt.study_id)
        if new_study:
            self._wake()

    def released(self, key: int) -> None:
        """The sender released the association: its studies are complete."""
        # One still waiting was logged when it first failed; the studies go on, it joins them once recorded.
        with contextlib.suppress(SpoolError):
            self._settle_earlier()
        studies = self._take(key)
        try:
            if studies:
                self.spool.settled()  # every instance cut to its length before the worker reads it
                queued = self.spool.records.mark_complete(sorted(studies))
                logger.info("association released: %d studies complete, %d queued", len(studies), queued)
                self._wake()
        except Exception:
            # The studies stay RECEIVED and become ready after quiet_seconds; nothing is lost.
            logger.exception("could not queue the studies of a released association")

    def aborted(self, key: int) -> None:
        """An aborted association may be retried by the sender: its studies wait for quiet time."""
        studies = self._take(key)
        if studies:
            logger.info("association aborted: %d studies wait for quiet time", len(studies))
            self._wake()

    def closed(self, key: int) -> None:
        """The connection ended (after released/aborted, or without either: the peer vanished)."""
        studies = self._take(key)
        if studies:
            logger.info("association ended without release: %d studies wait for quiet time", len(studies))
            self._wake()

    def _take(self, key: int) -> set[int]:
        with self._lock:
            return self._touched.pop(key, set())

    def _wake(self) -> None:
        try:
            self._on_studies()
        except Exception:  # the worker also wakes at its quiet deadlines: a lost wake-up delays, no more
            logger.exception("could not wake the worker")
