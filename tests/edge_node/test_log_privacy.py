"""The log's privacy guard: pydicom's value-quoting messages, warnings and exception texts never print."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset

from edge_node.errors import BadInstanceError
from edge_node.log_privacy import MAX_FRAMES, ElementValueGuard, install_log_privacy

SECRET = "MRN4711DOE"


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """The root logger writing to a string through a guarded handler (as the CLI sets it up)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    install_log_privacy()
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.captureWarnings(False)


def test_pydicom_messages_and_warnings_are_withheld(log_text: io.StringIO) -> None:
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
        ds.PatientBirthDate = SECRET  # pydicom logs and warns: "Invalid value for VR DA: 'MRN4711DOE'"
        warnings.warn(f"value {SECRET} looks odd", UserWarning, stacklevel=1)
    text = log_text.getvalue()
    assert "pydicom" in text and "withheld" in text
    assert SECRET not in text


def test_foreign_exception_texts_are_withheld_and_own_kept(log_text: io.StringIO) -> None:
    log = logging.getLogger("edge_node.test")
    try:
        raise ValueError(f"Unable to convert '{SECRET}' to 'DA'")
    except ValueError:
        log.exception("could not read an instance")
    try:
        raise BadInstanceError("the data set has no StudyInstanceUID")
    except BadInstanceError:
        log.exception("rejected")
    text = log_text.getvalue()
    assert SECRET not in text
    assert "builtins.ValueError (message withheld)" in text
    assert "the data set has no StudyInstanceUID" in text


def test_deep_recursion_prints_a_bounded_traceback(log_text: io.StringIO) -> None:
    def down(n: int) -> int:
        return down(n + 1) + 1

    limit = sys.getrecursionlimit()
    try:
        down(0)
    except RecursionError:
        logging.getLogger("edge_node.test").exception("failed")
    lines = log_text.getvalue().splitlines()
    assert len(lines) < 4 * MAX_FRAMES and limit > 4 * MAX_FRAMES


def test_guard_is_installed_once_per_handler(log_text: io.StringIO) -> None:
    install_log_privacy()
    for handler in logging.getLogger().handlers:
        assert sum(isinstance(f, ElementValueGuard) for f in handler.filters) <= 1
