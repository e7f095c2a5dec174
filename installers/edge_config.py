"""The node's edge.toml, written from the answers and readable only by the service user."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from installers.answers import Answers, PacsAnswer
from installers.service_user import ServiceUser

__all__ = ["render_config", "write_config"]


def _toml_string(value: str) -> str:
    # JSON string escaping is valid TOML basic-string escaping for the characters that can appear here.
    return json.dumps(value)


def _destination(pacs: PacsAnswer) -> str:
    return (
        f"[[destinations]]\nae_title = {_toml_string(pacs.ae_title)}\n"
        f"host = {_toml_string(pacs.host)}\nport = {pacs.port}\n"
    )


def render_config(answers: Answers, trusted_keys: Path) -> str:
    """edge.toml text: only keys the edge settings know (they refuse unknown ones)."""
    calling = ", ".join(_toml_string(a) for a in answers.allowed_calling_aes)
    lines = [
        "# fedclinic edge node settings, written by fedclinic-install; FEDCLINIC_EDGE_* variables win.",
        f"ae_title = {_toml_string(answers.ae_title)}",
        f"host = {_toml_string(answers.listen_host)}",
        f"port = {answers.port}",
        f"allowed_calling_aes = [{calling}]",
        f"data_dir = {_toml_string(str(answers.data_dir))}",
        f"trusted_keys = {_toml_string(str(trusted_keys))}",
        "",
    ]
    text = "\n".join(lines)
    if answers.pacs is not None:
        text += "\n" + _destination(answers.pacs)
    return text


def write_config(path: Path, text: str, user: ServiceUser) -> None:
    """Atomically replace ``path``: owner the service user, mode 0600 from creation (never briefly open)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".edge.", suffix=".toml")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chown(tmp, user.uid, user.gid)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
