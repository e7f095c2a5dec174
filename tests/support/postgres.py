"""A throwaway PostgreSQL cluster for tests: Debian's binaries, run as an unprivileged user, random port.

Tests run as root here and PostgreSQL refuses to run as root, so initdb and the server run as ``nobody``
(via ``runuser``) in a temporary directory that user owns. The server listens on 127.0.0.1 and a socket in
that directory; ``url`` is a SQLAlchemy URL for a fresh database.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PostgresCluster", "find_pg_bin", "postgres_cluster"]

_USER = "nobody"


def find_pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresCluster:
    bin_dir: Path
    root: Path
    port: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", _USER, "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run(
            self.bin_dir / "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        self._run(
            self.bin_dir / "pg_ctl",
            "-D",
            str(self.data_dir),
            "-o",
            opts,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(self.bin_dir / "pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")

    def create_database(self, name: str) -> str:
        """Create a database and return its SQLAlchemy URL (psycopg 3 driver)."""
        self._run(self.bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise RuntimeError(
            "PostgreSQL is not installed: apt-get install postgresql (the Makefile's system target)"
        )
    root = Path(tempfile.mkdtemp(prefix="fedclinic-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, user=_USER, group="nogroup")
    os.chmod(root, 0o700)
    cluster = PostgresCluster(bin_dir=bin_dir, root=root, port=_free_port())
    cluster.start()
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
