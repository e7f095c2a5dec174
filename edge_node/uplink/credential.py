"""The node's credential: which hub, its pinned certificate, node id and secret, kept 0600 in the data dir.

The secret is generated on the node (``new_secret``) and sent to the hub once; the hub keeps only a hash. The
file is written to a temporary name with mode 0600 from the start, fsync'd and renamed, so no other user can
read it at any moment and a crash never leaves half a credential.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Generator
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_node.protocol.wire import node_authorization
from edge_node.uplink.errors import UplinkError

__all__ = ["BearerAuth", "CredentialFileAuth", "NodeCredential", "new_secret", "uplink_dir", "write_private"]


def uplink_dir(data_dir: Path) -> Path:
    """Where the node keeps its credential, the hub's key, the outbox and the uplink state."""
    return data_dir / "uplink"


def new_secret() -> str:
    """32 random bytes as base64url without padding (43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by this user only (0600) from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


class NodeCredential(BaseModel):
    """Everything the node needs to reach and prove itself to its hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hub_url: str
    tls_sha256: str
    cert_pem: str
    node_id: str
    node_name: str
    cohort: str
    secret: str
    hub_public_key_pem: str
    heartbeat_interval_s: float

    @staticmethod
    def path_in(uplink_dir: Path) -> Path:
        return uplink_dir / "credential.json"

    def save(self, uplink_dir: Path) -> None:
        write_private(self.path_in(uplink_dir), self.model_dump_json(indent=2).encode())
        # The hub's bundle key, as a trusted-keys file the model slot can read.
        (uplink_dir / "hub.pub").write_text(self.hub_public_key_pem)

    @classmethod
    def load(cls, uplink_dir: Path) -> NodeCredential | None:
        """The saved credential, None when the node was never enrolled; UplinkError when it is damaged."""
        path = cls.path_in(uplink_dir)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UplinkError(f"cannot read the node credential {path}: {exc.strerror}") from exc
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise UplinkError(
                f"the node credential {path} is damaged; enroll again with a new join code "
                f"(fedclinic-edge enroll CODE): {exc.error_count()} errors"
            ) from exc

    def auth(self) -> BearerAuth:
        return BearerAuth(node_authorization(self.node_id, self.secret))


class BearerAuth(httpx.Auth):
    """Adds the node's ``Authorization`` header to each request."""

    def __init__(self, header: str) -> None:
        self._header = header

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


class CredentialFileAuth(httpx.Auth):
    """The node's ``Authorization`` header, re-read when the credential file is replaced.

    A rotation by ``fedclinic-edge credential rotate`` replaces the file while the node runs; the hub refuses
    the old secret from then on, so the running node picks up the new one on its next request instead of
    being locked out until a restart. Checking costs one ``stat`` per request.
    """

    def __init__(self, uplink_dir: Path, credential: NodeCredential) -> None:
        self._dir = uplink_dir
        self._node_id = credential.node_id
        self._header = node_authorization(credential.node_id, credential.secret)
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(NodeCredential.path_in(self._dir))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns  # the file is replaced by rename: a new inode each time

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        stamp = self._file_stamp()
        if stamp is not None and stamp != self._stamp:
            try:
                fresh = NodeCredential.load(self._dir)
            except UplinkError:
                fresh = None  # a damaged file: keep the secret this process has
            if fresh is not None and fresh.node_id == self._node_id:
                self._header = node_authorization(fresh.node_id, fresh.secret)
            self._stamp = stamp
        request.headers["Authorization"] = self._header
        yield request
