"""Errors of the installer (stdlib only: the kit's bootstrap imports this before anything is installed).

InstallerError
 ├── KitError          the kit is incomplete, altered, or signed by another key
 ├── MachineError      this machine cannot run a node (and the check says why)
 ├── StepError         an install step failed (user, config, enrollment, service)
 └── AnswersError      an answers file or flag is missing or wrong
"""

from __future__ import annotations

__all__ = ["AnswersError", "InstallerError", "KitError", "MachineError", "StepError"]


class InstallerError(Exception):
    """Base of every installer error; the message says what to do."""


class KitError(InstallerError):
    """The kit cannot be trusted or used: nothing has been installed from it."""


class MachineError(InstallerError):
    """The machine fails a check that the node needs."""


class StepError(InstallerError):
    """An install step failed; the message names the step and the fix."""


class AnswersError(InstallerError):
    """An answer (from the file, a flag or the prompt) is missing or invalid."""
