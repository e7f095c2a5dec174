"""The sending loop: drains the outbox, one association per destination per round, backing off on failure.

A thread that sleeps on a ``Waker`` until the worker has results or a retry falls due; idle, it uses no CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.destination import Destination
from edge_node.delivery.outbox import Outbox, OutboxItem
from edge_node.delivery.store_scu import send_files
from edge_node.errors import SendError
from edge_node.waker import Waker

__all__ = ["SendFn", "Sender", "backoff_seconds"]

logger = logging.getLogger(__name__)


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempts`` (1-based): base, 2*base, 4*base, ... capped at ``cap``."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


SendFn = Callable[[Sequence[ResultFile], Destination, str], None]


def _send(files: Sequence[ResultFile], dest: Destination, calling_ae: str) -> None:
    send_files(files, dest, calling_ae)


class Sender:
    """Drains the outbox: one association per destination per round, exponential backoff on failure.

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
        send: SendFn = _send,
    ) -> None:
        self.outbox = outbox
        self.calling_ae = calling_ae
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self.send = send
        self.waker = Waker()
        self._thread: threading.Thread | None = None
        self._last_error: dict[Destination, str] = {}

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
        groups: dict[Destination, list[OutboxItem]] = {}
        for item in self.outbox.due():
            groups.setdefault(item.destination, []).append(item)
        for dest, items in groups.items():
            if self.waker.stopping:
                break
            self._send_group(dest, items)
        nxt = self.outbox.next_try()
        if nxt is None:
            return None
        return max(0.0, nxt - time.time())

    def _send_group(self, dest: Destination, items: list[OutboxItem]) -> None:
        try:
            self.send([i.file for i in items], dest, self.calling_ae)
        except SendError as exc:
            now = time.time()
            delays = [backoff_seconds(i.attempts + 1, self.base_seconds, self.max_seconds) for i in items]
            self.outbox.mark_retry([i.id for i in items], str(exc), [now + d for d in delays])
            message = str(exc)
            log = logger.warning if self._last_error.get(dest) != message else logger.debug
            self._last_error[dest] = message
            log(
                "sending %d result file(s) to %s failed, retry in %.0f s: %s",
                len(items),
                dest.address,
                min(delays),
                message,
            )
            return
        self.outbox.mark_sent([i.id for i in items])
        if self._last_error.pop(dest, None) is not None:
            logger.info("%s takes results again", dest.address)
        logger.debug("outbox: %d entries for %s marked sent", len(items), dest.address)
