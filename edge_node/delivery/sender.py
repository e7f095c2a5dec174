"""The sending loop: drains the outbox in batches over associations kept open, backing off on failure.

A thread that sleeps on a ``Waker`` until the worker has results or a retry falls due; idle, it uses no CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.destination import Destination
from edge_node.delivery.outbox import Outbox, OutboxItem
from edge_node.delivery.store_scu import StoreLink
from edge_node.errors import SendError
from edge_node.waker import Waker

__all__ = [
    "BATCH_MAX",
    "BATCH_WAIT_SECONDS",
    "LINGER_SECONDS",
    "Connect",
    "Link",
    "Sender",
    "backoff_seconds",
]

logger = logging.getLogger(__name__)


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempts`` (1-based): base, 2*base, 4*base, ... capped at ``cap``."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


class Link(Protocol):
    """An open association to one destination (``StoreLink``): store files one by one, close when idle."""

    @property
    def alive(self) -> bool: ...

    def store(self, f: ResultFile) -> None: ...

    def pace(self, busy: bool) -> None: ...

    def close(self) -> None: ...


#: Opens a link to a destination as a calling AE title; raises SendError when it cannot.
Connect = Callable[[Destination, str], Link]


def _connect(dest: Destination, calling_ae: str) -> Link:
    return StoreLink(dest, calling_ae)


#: Results sent per destination before the outbox is read again (one transaction marks them sent).
BATCH_MAX = 64
#: After a wake-up, wait this long for more results before sending: a burst goes out in batches.
BATCH_WAIT_SECONDS = 0.02
#: An association with nothing to send is kept this long for the next results, then released.
LINGER_SECONDS = 2.0


class Sender:
    """Drains the outbox over one association per destination, kept open while results keep coming.

    Each round takes at most ``batch_max`` due entries (after a wait of at most ``batch_wait`` for more to
    arrive), sends them over the destination's open association (opened when there is none), and records
    each object's outcome: the stored ones sent in one transaction, a refused one retried with backoff, and
    when the association itself fails, the rest retried too. An association idle for ``linger`` seconds
    is released.

    Delivery is at least once (a crash between the PACS's success and our "sent" commit sends again); a
    re-send of the same run is the same SOP instances, so a second delivery stores the same objects again.
    Entries are retried until they go through: a result must not vanish because the PACS was down a day.
    A failure is logged when it first happens or its reason changes, not on every retry.
    """

    def __init__(
        self,
        outbox: Outbox,
        calling_ae: str,
        *,
        base_seconds: float,
        max_seconds: float,
        connect: Connect = _connect,
        batch_max: int = BATCH_MAX,
        batch_wait: float = BATCH_WAIT_SECONDS,
        linger: float = LINGER_SECONDS,
    ) -> None:
        self.outbox = outbox
        self.calling_ae = calling_ae
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self.connect = connect
        self.batch_max = batch_max
        self.batch_wait = batch_wait
        self.linger = linger
        self.waker = Waker()
        self._thread: threading.Thread | None = None
        self._last_error: dict[Destination, str] = {}
        self._links: dict[Destination, Link] = {}
        self._last_used: dict[Destination, float] = {}

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
        try:
            while not self.waker.stopping:
                try:
                    timeout = self.step()
                except Exception:
                    logger.exception("sender step failed")
                    timeout = self.base_seconds
                if timeout is None or timeout > 0:
                    self._pace(busy=False)  # nothing to send right now: open associations idle cheaply
                woken = (timeout is None or timeout > 0) and self.waker.wait(timeout)
                if woken and not self.waker.stopping:
                    # Results are coming: associations poll fast again while the batch gathers.
                    self._pace(busy=True)
                    if self.batch_wait > 0:
                        # Woken by new results: let the ones right behind them join this round.
                        time.sleep(self.batch_wait)
        finally:
            self.close_links()

    def _pace(self, *, busy: bool) -> None:
        for dest, link in list(self._links.items()):
            try:
                link.pace(busy)
            except Exception as exc:  # only a pace: the next store finds out whether the link still works
                logger.debug("pacing the association with %s: %s", dest.address, type(exc).__name__)

    def close_links(self) -> None:
        """Release every open association (at stop, or when they have been idle too long)."""
        for dest in list(self._links):
            self._drop(dest)

    def _drop(self, dest: Destination) -> None:
        link = self._links.pop(dest, None)
        self._last_used.pop(dest, None)
        if link is not None:
            try:
                link.close()
            except Exception as exc:  # the peer may be gone already; nothing is lost by not releasing
                logger.debug("closing the association with %s: %s", dest.address, type(exc).__name__)

    def step(self) -> float | None:
        """Send one round of what is due; return how long to sleep (0: go on at once, None: until woken)."""
        groups: dict[Destination, list[OutboxItem]] = {}
        for item in self.outbox.due(limit=self.batch_max * max(1, len(self._links))):
            items = groups.setdefault(item.destination, [])
            if len(items) < self.batch_max:
                items.append(item)
        full = any(len(items) >= self.batch_max for items in groups.values())
        for dest, items in groups.items():
            if self.waker.stopping:
                break
            self._send_group(dest, items)
        now = time.time()
        for dest, used in list(self._last_used.items()):
            if dest not in groups and now - used >= self.linger:
                self._drop(dest)
        if full:
            return 0.0
        waits = [used + self.linger - now for used in self._last_used.values()]
        nxt = self.outbox.next_try()
        if nxt is not None:
            waits.append(nxt - now)
        return max(0.0, min(waits)) if waits else None

    def _link(self, dest: Destination) -> Link:
        link = self._links.get(dest)
        if link is None or not link.alive:
            if link is not None:
                self._drop(dest)
            link = self._links[dest] = self.connect(dest, self.calling_ae)
        return link

    def _send_group(self, dest: Destination, items: list[OutboxItem]) -> None:
        sent: list[int] = []
        failed: list[OutboxItem] = []
        message = ""
        for n, item in enumerate(items):
            try:
                link = self._link(dest)
                link.store(item.file)
            except SendError as exc:
                message = str(exc)
                failed.append(item)
                if dest not in self._links or not self._links[dest].alive:
                    # The association is gone (or never came up): the rest wait for the next attempt.
                    self._drop(dest)
                    failed.extend(items[n + 1 :])
                    break
                continue
            sent.append(item.id)
        if dest in self._links:
            self._last_used[dest] = time.time()
        if sent:
            self.outbox.mark_sent(sent)
            logger.debug("outbox: %d entries for %s marked sent", len(sent), dest.address)
            if not failed and self._last_error.pop(dest, None) is not None:
                logger.info("%s takes results again", dest.address)
        if failed:
            now = time.time()
            delays = [backoff_seconds(i.attempts + 1, self.base_seconds, self.max_seconds) for i in failed]
            self.outbox.mark_retry([i.id for i in failed], message, [now + d for d in delays])
            log = logger.warning if self._last_error.get(dest) != message else logger.debug
            self._last_error[dest] = message
            log(
                "sending %d result file(s) to %s failed, retry in %.0f s: %s",
                len(failed),
                dest.address,
                min(delays),
                message,
            )
