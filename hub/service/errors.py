"""Errors of the hub service; the API maps each to an HTTP status and an ``ErrorCode``.

HubServiceError
 ├── SetupError              the data directory, a key or a setting is missing or wrong
 ├── AuthError               no, unknown or revoked credential (401)
 │    ├── RevokedError        the node was revoked
 │    └── JoinCodeRefused     unknown, used or expired join code
 ├── ForbiddenError          authenticated but not allowed (403)
 ├── NotFoundError           no such node, round, task or publication (404)
 ├── ConflictError           the request contradicts the current state (409)
 │    ├── TaskClosedError     the task's round no longer collects (late update)
 │    └── DuplicateUpdateError a different update was already accepted for the task
 ├── UpdateRejected          the update fails validation, with the reason (422)
 └── RoundConfigError        a round cannot start with these settings (422)
"""

from __future__ import annotations


class HubServiceError(Exception):
    """Base of the hub service's errors; the message says what to do."""


class SetupError(HubServiceError):
    """The data directory, a key file or a setting is missing or wrong."""


class AuthError(HubServiceError):
    """The request carries no credential, or one the hub does not know."""


class RevokedError(AuthError):
    """The node's credential was revoked by the operator."""


class JoinCodeRefused(AuthError):
    """The join code is unknown, already used or expired."""


class ForbiddenError(HubServiceError):
    """The caller is authenticated but may not do this."""


class NotFoundError(HubServiceError):
    """The node, round, task or publication does not exist."""


class ConflictError(HubServiceError):
    """The request contradicts the current state."""


class TaskClosedError(ConflictError):
    """The task's round is not collecting any more: the update is late."""


class DuplicateUpdateError(ConflictError):
    """Another update was already accepted for this task."""


class UpdateRejected(HubServiceError):
    """The update fails validation; the message is the reason."""


class RoundConfigError(HubServiceError):
    """A round cannot start with these settings (unknown strategy, bad config, no nodes, k > n)."""
