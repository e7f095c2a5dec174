"""TaskSignal: wakes long-polling nodes when rounds or secure-aggregation steps change, not polling."""

from __future__ import annotations

import asyncio

__all__ = ["TaskSignal"]


class TaskSignal:
    """A generation counter with an asyncio event; ``notify`` may be called from any thread.

    Waiters read ``generation`` before they look for tasks and then wait for it to move, so a change
    between the look and the wait is never missed.
    """

    def __init__(self) -> None:
        self.generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def _fire(self) -> None:
        self.generation += 1
        if self._event is not None:
            self._event.set()
            self._event = asyncio.Event()

    def notify(self) -> None:
        if self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._fire()
        else:
            self._loop.call_soon_threadsafe(self._fire)

    async def wait_past(self, generation: int, timeout: float) -> None:
        """Return once the generation moved past ``generation``, or after ``timeout`` seconds."""
        if self.generation != generation or self._event is None or timeout <= 0:
            return
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            return
