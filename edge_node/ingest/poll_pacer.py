"""The poll pacer: an association's DUL reactor polls fast while PDUs flow and slowly once it has gone idle.

pynetdicom's DUL reactor sleeps ``_run_loop_delay`` between polls of its socket whenever it finds nothing
to do. A short sleep keeps each C-STORE round trip short (see ``DUL_LOOP_DELAY_S`` in the listener); the
same short sleep on an association that only stays open costs CPU for nothing: measured with
``bench/idle_associations.py``, 50 idle associations held most of a core. The pacer gives every
association the short delay when it opens and on every PDU it receives (``EVT_DATA_RECV``), and a sweep
every ``sweep_s`` gives the long one to those that received nothing since the previous sweep. The first PDU
after a pause then waits at most one long delay; PDUs after it are served at the fast pace.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from pynetdicom.association import Association
from pynetdicom.events import Event

__all__ = ["PollPacer"]

logger = logging.getLogger(__name__)


def _set_delay(assoc: Association, seconds: float) -> None:
    # ``_run_loop_delay`` is the knob pynetdicom 3.0 documents in DULServiceProvider.__init__ ("Controls the
    # minimum delay between loops"); private, hence pinned (pynetdicom<3.1). A release without it only
    # changes speed, never correctness.
    dul = assoc.dul
    if hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = seconds


class PollPacer:
    """Sets each open association's DUL poll delay: ``active_s`` while it receives, ``idle_s`` when not."""

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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_activity(self, event: Event) -> None:
        """``EVT_CONN_OPEN`` and ``EVT_DATA_RECV`` handler: this association polls fast again."""
        _set_delay(event.assoc, self.active_s)
        with self._lock:
            self._busy.add(id(event.assoc))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-dicom-poll-pacer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def sweep(self) -> None:
        """Slow down every association that received nothing since the last sweep."""
        with self._lock:
            busy, self._busy = self._busy, set()
        for assoc in list(self._associations()):
            if id(assoc) not in busy:
                _set_delay(assoc, self.idle_s)

    def _run(self) -> None:
        while not self._stop.wait(self.sweep_s):
            try:
                self.sweep()
            except Exception:  # only a speed knob: a failed sweep must not end the pacer
                logger.exception("poll pacer sweep failed")
