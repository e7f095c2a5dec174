"""A wake-up flag with a timed wait, on which the worker and the sender sleep while there is nothing to do."""

from __future__ import annotations

import threading

__all__ = ["Waker"]


class Waker:
    """``wake`` from any thread, ``wait`` in the loop (no lost wake-ups); ``stop`` ends the loop."""

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

    def wait(self, timeout: float | None) -> bool:
        """Sleep until woken, stopped or ``timeout`` passes; True when ``wake`` was called."""
        with self._cond:
            if not self._flag and not self.stopping:
                self._cond.wait(timeout)
            woken, self._flag = self._flag, False
            return woken
