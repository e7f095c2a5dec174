"""The poll pacer: an association's two pynetdicom loops run fast while PDUs flow and cost nothing when idle.

pynetdicom 3.0 runs two polling loops per association. The DUL reactor sleeps ``_run_loop_delay`` between
polls of its socket; the association loop (``Association._run_reactor``) sleeps a fixed 1 ms per turn and
then waits on ``_reactor_checkpoint``, the event pynetdicom itself clears to pause that loop (its ``send_*``
methods) and sets again in ``abort()`` and ``kill()``. Measured with ``bench/idle_associations.py``, 50 open
associations that say nothing held three quarters of a core, almost all of it the association loops waking
1,000 times a second each.

The pacer gives every association the short DUL delay and an open checkpoint when it opens and on every PDU
it receives (``EVT_DATA_RECV``, fired by the DUL thread before the PDU reaches DIMSE, so the association
loop is usually running by the time a message is complete). A sweep every ``sweep_s`` finds the
associations that received nothing since the previous sweep and have nothing on its way to their loop
(``_in_flight``): their DUL gets the long delay and their association loop is parked on the checkpoint,
where it costs no CPU. While parked, the sweep does that loop's checks for it: when the network timeout has
expired, the DUL thread has ended, an abort or a release request is pending (``loop_has_work``) or a late
message has reached DIMSE, it opens the checkpoint again, and pynetdicom's own loop aborts, releases or ends
the association as it would have. The ACSE timeout is the DUL's ARTIM timer, which the DUL loop checks on
every poll, parked or not.

Cost of a parked association: ``1 / idle_s`` DUL polls a second; the first PDU after a pause waits at most
``idle_s`` (the DUL's sleep), then the association runs at full pace again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from pynetdicom.association import Association
from pynetdicom.events import Event

from edge_node.delivery.association_loop import loop_has_work, set_dul_delay

__all__ = ["PollPacer"]

logger = logging.getLogger(__name__)


def _in_flight(assoc: Association) -> bool:
    """True while a PDU the association received is still on its way to the association loop.

    ``EVT_DATA_RECV`` fires before the DUL decodes the PDU; the DUL's state machine then hands a P-DATA to
    DIMSE, which queues the message once it is whole, and an A-RELEASE to the ACSE queue. On a loaded machine
    the DUL thread can wait longer than a sweep between those steps, and a sweep that parked the loop
    meanwhile would leave the message to the network timeout's wake-up, which aborts. (Found while reading
    the code for the release bug in ``loop_has_work``, not seen in a run; the listener test builds it.)
    Unprocessed DUL events, a queued primitive or a whole DIMSE message keep the loop running.
    """
    dul = assoc.dul
    return (
        not (dul.event_queue.empty() and dul.to_user_queue.empty()) or assoc.dimse.peek_msg()[1] is not None
    )


class PollPacer:
    """Sets each open association's pace: ``active_s`` DUL polls while it receives, parked when not."""

    def __init__(
        self,
        associations: Callable[[], Iterable[Association]],
        *,
        active_s: float,
        idle_s: float,
        sweep_s: float = 0.25,
    ) -> None:
        self._associations = associations
        self.active_s = active_s
        self.idle_s = idle_s
        self.sweep_s = sweep_s
        self._busy: set[int] = set()
        # One lock for "received something" and "park": a PDU that arrives while a sweep decides cannot be
        # followed by the sweep parking its association.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_activity(self, event: Event) -> None:
        """``EVT_CONN_OPEN`` and ``EVT_DATA_RECV`` handler: this association runs at full pace again."""
        assoc = event.assoc
        with self._lock:
            self._busy.add(id(assoc))
            set_dul_delay(assoc, self.active_s)
            assoc._reactor_checkpoint.set()

    def on_closed(self, event: Event) -> None:
        """``EVT_CONN_CLOSE`` handler: a parked loop must run to notice that its connection is gone."""
        event.assoc._reactor_checkpoint.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-dicom-poll-pacer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        # Whatever is still open runs its own loop again (the listener aborts it next).
        for assoc in list(self._associations()):
            assoc._reactor_checkpoint.set()

    def sweep(self) -> None:
        """Park every association that received nothing since the last sweep; wake those with work."""
        with self._lock:
            busy, self._busy = self._busy, set()
            for assoc in list(self._associations()):
                if loop_has_work(assoc) or _in_flight(assoc):
                    assoc._reactor_checkpoint.set()
                elif id(assoc) not in busy and assoc.is_established:
                    set_dul_delay(assoc, self.idle_s)
                    assoc._reactor_checkpoint.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.sweep_s):
            try:
                self.sweep()
            except Exception:  # only a pace: a failed sweep must not end the pacer
                logger.exception("poll pacer sweep failed")
                for assoc in list(self._associations()):  # never leave a loop parked after a failure
                    assoc._reactor_checkpoint.set()
