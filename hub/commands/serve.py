"""`fedclinic-hub serve`: the HTTPS API (uvicorn), optionally with several workers over PostgreSQL."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from hub.commands.output import fail
from hub.commands.service_options import DataDirOption, database, settings_for
from hub.service.tls import CERT_FILE, KEY_FILE

log = logging.getLogger(__name__)


def serve(
    data_dir: DataDirOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8443,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="API worker processes (use PostgreSQL).")
    ] = 1,
    cert: Annotated[Path | None, typer.Option("--cert", help="Operator's TLS certificate (PEM).")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Its private key (PEM).")] = None,
    public_url: Annotated[
        str | None, typer.Option("--public-url", help="Address put into join codes.")
    ] = None,
) -> None:
    """Serve the hub API over HTTPS with the data directory's certificate (or --cert/--key)."""
    import uvicorn

    settings = settings_for(data_dir, public_url=public_url)
    db = database(settings)  # migrates once here, before any worker starts
    is_sqlite = db.is_sqlite
    db.close()
    if (cert is None) != (key is None):
        fail("pass both --cert and --key, or neither (the generated certificate is used)")
    certfile = cert or settings.tls_dir / CERT_FILE
    keyfile = key or settings.tls_dir / KEY_FILE
    if workers > 1 and is_sqlite:
        log.warning("%d workers over SQLite serialise on its write lock; use PostgreSQL for several", workers)
    # The workers rebuild their settings from the environment: hand over exactly what this command resolved.
    os.environ["FEDCLINIC_HUB_DATA_DIR"] = str(settings.data_dir.resolve())
    os.environ["FEDCLINIC_HUB_TLS_CERT"] = str(Path(certfile).resolve())  # its sha256 goes into join codes
    os.environ["FEDCLINIC_HUB_PUBLIC_URL"] = settings.public_url or f"https://{host}:{port}"
    if settings.database_url:
        os.environ["FEDCLINIC_HUB_DATABASE_URL"] = settings.database_url
    uvicorn.run(
        "hub.api.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        log_level="info",
        timeout_graceful_shutdown=5,
        # A worker busy aggregating (or starting on a loaded host) must not be taken for dead and killed
        # mid-request; uvicorn's default of 5 s does that on a small machine.
        timeout_worker_healthcheck=60,
        # Nodes keep one connection and reuse it between calls; uvicorn's 5 s idle close races with that
        # reuse (the client sends as the server hangs up), so idle connections live longer than a long-poll.
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    # `python -m hub.commands.serve` starts without loading the whole CLI (and torch with it).
    typer.run(serve)
