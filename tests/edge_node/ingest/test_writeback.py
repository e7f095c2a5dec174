"""The write-back head start: found on Linux, harmless on any descriptor, and what it starts is data the
flush then finds already on its way (the instance is the same either way: ``test_spool``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from edge_node.ingest import writeback


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_call_is_found_on_linux() -> None:
    assert writeback._SYNC_FILE_RANGE is not None


def test_it_never_raises(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"x" * 300_000)
        writeback.start_writeback(fd, 0, 300_000)
        writeback.start_writeback(fd, 10**9, 10)  # past the end: nothing to write
    finally:
        os.close(fd)
    writeback.start_writeback(fd, 0, 10)  # a closed descriptor: EBADF, ignored
    assert (tmp_path / "f").stat().st_size == 300_000
