"""Errors raised by the federated strategies; each message says what to do next.

FlError
 ├── StrategyConfigError   a strategy was built or called with settings that cannot work
 ├── AggregationError      tensors handed to an aggregation function do not agree (names, shapes, dtypes)
 └── PayloadError          an uploaded update's payload does not match its envelope (size, sha256, encoding)

A single client's bad update is not an exception: ``hub.fl.validation`` turns it into a ``ClientFailure``
with the reason, and the round goes on with the others.
"""

from __future__ import annotations

__all__ = ["AggregationError", "FlError", "PayloadError", "StrategyConfigError"]


class FlError(Exception):
    """Base of every hub.fl error."""


class StrategyConfigError(FlError):
    """A strategy setting is missing, out of range, or inconsistent with the model."""


class AggregationError(FlError):
    """The tensors to aggregate disagree in names, shapes or dtypes, or there is nothing to aggregate."""


class PayloadError(FlError):
    """An update payload is the wrong size, fails its sha256, or cannot be decoded without pickle."""
