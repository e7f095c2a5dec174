"""The log's privacy guard: library messages and exception texts that may quote element values never print.

pydicom logs and warns with the offending value ("Invalid value for VR DA: '<value>'"), highdicom quotes
names it finds odd, and the text of an exception raised while parsing a data set can carry an element value
(``Unable to convert '<value>' to 'DA'``). None of that may reach a log line. The guard sits on the handlers
(so it sees every logger's records, not only one logger's own): a record from a library that handles
DICOM values keeps its level, logger and function but its message is withheld, and a traceback keeps its
frames (code, not data) while the message of any exception not raised by this package is withheld. Python
warnings are routed into logging first, so they pass the same guard.
"""

from __future__ import annotations

import logging
import traceback
from types import TracebackType

__all__ = [
    "MAX_FRAMES",
    "VALUE_QUOTING_LOGGERS",
    "ElementValueGuard",
    "install_log_privacy",
    "safe_traceback",
]

#: Loggers whose messages may quote DICOM element values ("py.warnings" carries the text of warnings).
VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom", "py.warnings")
#: Frames kept per exception: a RecursionError from deep nesting would otherwise print thousands of lines.
MAX_FRAMES = 12
_OWN_PACKAGE = "edge_node"
_WITHHELD = "%s message withheld (library text may quote element values)"


def _quotes_values(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in VALUE_QUOTING_LOGGERS)


def safe_traceback(
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None],
) -> str:
    """A traceback without the messages of foreign exceptions, at most MAX_FRAMES frames per exception."""
    exc = exc_info[1]
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 5 and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    lines = ["Traceback (most recent call last; foreign messages withheld):\n"]
    for item in reversed(chain):
        frames = traceback.format_tb(item.__traceback__)
        if len(frames) > MAX_FRAMES:
            lines.append(f"  ... {len(frames) - MAX_FRAMES} frames left out ...\n")
        lines.extend(frames[-MAX_FRAMES:])
        kind = type(item)
        name = f"{kind.__module__}.{kind.__qualname__}"
        if kind.__module__.startswith(_OWN_PACKAGE):
            lines.append(f"{name}: {item}\n")  # this package's messages are written without identifiers
        else:
            lines.append(f"{name} (message withheld)\n")
    return "".join(lines).rstrip("\n")


class ElementValueGuard(logging.Filter):
    """Handler filter: withholds value-quoting library messages and foreign exception texts."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _quotes_values(record.name):
            record.msg = _WITHHELD
            record.args = (f"{record.name}.{record.funcName}:",)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = safe_traceback(record.exc_info)
        return True


def install_log_privacy() -> None:
    """Put the guard on every handler of the root logger and route warnings through logging."""
    logging.captureWarnings(True)
    guard = ElementValueGuard()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ElementValueGuard) for f in handler.filters):
            handler.addFilter(guard)
