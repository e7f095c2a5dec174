"""pynetdicom's association loop, held still while we send requests on an association we opened.

pynetdicom 3.0 runs an association loop (``Association._run_reactor``) beside the DUL thread. Each turn it
sets ``_is_paused``, waits on ``_reactor_checkpoint``, clears ``_is_paused`` and takes any complete DIMSE
message off the queue to serve it as a request. Its ``send_*`` methods pause that loop so that it does not
take their response: they clear the checkpoint and spin until ``_is_paused`` is true. That flag is also true
for the moment between the loop's ``wait()`` returning and its next line, so under CPU contention a sender
can go ahead while the loop is about to run one more turn; if the peer answers within that turn (a refusal
comes back in a few milliseconds), the loop takes the response, and the sender waits out its DIMSE timeout
and gets no status. The fuzz test's sender met it once: two of its 2,000 C-STOREs unanswered on a loaded
machine, while the node's log shows the first answered in time.

``ParkedLoop`` pauses the loop once and checks that it is really blocked: the loop's thread is among the
checkpoint's waiters, which the flag alone cannot show. Then the association's ``_reactor_checkpoint`` is
replaced by a fresh event for ``send_*`` to clear and set, and the loop stays where it is for as long as the
association is held: it never competes for a response and costs no CPU. While it is parked, nobody does its
checks (abort, release request, ended DUL, network timeout), so ``needs_loop()`` does them; ``wake()`` gives
the loop back, and ``end()`` does so before it releases or aborts the association.

``loop_has_work`` and ``set_dul_delay`` serve the receiving side too (``edge_node.ingest.poll_pacer``, which
parks idle acceptor loops).

Private pynetdicom attributes, hence the pin (pynetdicom<3.1); ``threading.Event``'s condition and its
waiters are CPython's own (unchanged since 3.2). Where either is missing the loop is left as pynetdicom runs
it, which only reopens the race.
"""

from __future__ import annotations

import threading
import time

from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_RELEASE

__all__ = ["ParkedLoop", "loop_has_work", "set_dul_delay"]


def set_dul_delay(assoc: Association, seconds: float) -> None:
    """How long the association's DUL loop sleeps between socket polls.

    ``_run_loop_delay`` is the knob pynetdicom 3.0 documents in DULServiceProvider.__init__ ("Controls the
    minimum delay between loops"); private, hence pinned. Without it only the speed changes, never
    correctness.
    """
    if hasattr(assoc.dul, "_run_loop_delay"):
        assoc.dul._run_loop_delay = seconds


def loop_has_work(assoc: Association) -> bool:
    """True when the association loop has work that came without our asking: the peer aborted or asked to
    release, the DUL ended, or the network timeout expired. A parked loop must then run again.

    Only looks: pynetdicom's ``acse.is_release_requested()`` takes the A-RELEASE request off the queue when
    it finds one, and called from here (the pacer's thread) it left the woken loop nothing to answer: the
    peer waited for its release response until the network timeout aborted the association (measured: the
    pynetdicom flood test on a loaded machine, 2 runs in 10, the DUL in Sta8 throughout).
    """
    return bool(
        assoc.is_aborted
        or assoc.is_released
        or not assoc.dul.is_alive()
        or assoc.dul.idle_timer_expired()
        or assoc.acse.is_aborted()
        or _release_requested(assoc)
    )


def _release_requested(assoc: Association) -> bool:
    """``acse.is_release_requested()`` without its side effect: the request stays for the loop to take."""
    primitive = assoc.dul.peek_next_pdu()
    return isinstance(primitive, A_RELEASE) and primitive.result is None


def _waited_on(event: threading.Event) -> bool:
    """True when a thread is blocked in ``event.wait()`` (the event being clear)."""
    cond = getattr(event, "_cond", None)
    return bool(getattr(cond, "_waiters", None))


class ParkedLoop:
    """Park ``assoc``'s association loop for as long as the caller holds the association."""

    def __init__(self, assoc: Association, *, wait_s: float = 1.0) -> None:
        self.assoc = assoc
        self._parked: threading.Event | None = None
        checkpoint = assoc._reactor_checkpoint
        checkpoint.clear()
        deadline = time.monotonic() + wait_s
        while not _waited_on(checkpoint):
            if time.monotonic() >= deadline:
                checkpoint.set()  # the loop did not block (it may be ending): leave it as pynetdicom runs it
                return
            time.sleep(0.0001)
        self._parked = checkpoint
        assoc._reactor_checkpoint = threading.Event()

    @property
    def parked(self) -> bool:
        return self._parked is not None

    def needs_loop(self) -> bool:
        """``loop_has_work`` for the held association."""
        return loop_has_work(self.assoc)

    def end(self) -> None:
        """Wake the loop and end the association: released, or aborted when the peer is gone or silent."""
        gone = self.needs_loop()
        self.wake()
        if gone:
            self.assoc.abort()  # gone or going: an A-RELEASE would only wait for an answer that never comes
            return
        if self.assoc.is_established:
            self.assoc.release()
        if self.assoc.is_established:
            self.assoc.abort()

    def wake(self) -> None:
        """Give the loop back to pynetdicom (before a release or an abort, or when ``needs_loop()``): the loop
        is blocked on the parked event, which becomes its checkpoint again and is set."""
        parked, self._parked = self._parked, None
        if parked is None:
            return
        self.assoc._reactor_checkpoint = parked
        parked.set()
