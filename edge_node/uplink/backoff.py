"""Retry delays: exponential backoff with full jitter, so that nodes that lost the hub together do not return
together (a hub restart would otherwise meet every clinic at the same second)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """``delay(n)`` after n consecutive failures: uniform in [cap/2, cap], cap = min(max, base·2^(n-1))."""

    base_seconds: float = 1.0
    max_seconds: float = 300.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.base_seconds <= 0 or self.max_seconds < self.base_seconds:
            raise ValueError("backoff needs 0 < base_seconds <= max_seconds")

    def cap(self, failures: int) -> float:
        """The largest delay after ``failures`` consecutive failures."""
        if failures <= 0:
            return 0.0
        # 2**60 already exceeds any sane max; bounding the exponent keeps the float finite.
        return min(self.max_seconds, self.base_seconds * 2.0 ** min(failures - 1, 60))

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next try; half the cap is kept so a retry never comes instantly."""
        cap = self.cap(failures)
        return cap / 2 + self.rng.uniform(0.0, cap / 2)
