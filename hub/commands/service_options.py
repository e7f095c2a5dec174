"""The data directory option and the store it holds, shared by the hub service commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hub.commands.output import fail
from hub.service.errors import HubServiceError
from hub.service.settings import HubSettings, load_settings

if TYPE_CHECKING:
    from hub.store.database import Database

__all__ = ["DataDirOption", "ExcludeNodesOption", "database", "hub_database", "settings_for", "taking_part"]


DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="FEDCLINIC_HUB_DATA_DIR",
        help="The hub's state directory (keys, database, certificate). Default: ./hub-data.",
        show_default=False,
    ),
]

ExcludeNodesOption = Annotated[
    list[str] | None,
    typer.Option("--exclude-node", help="Node id left out (repeat): every other active node takes part."),
]


def settings_for(data_dir: Path | None, **overrides: Any) -> HubSettings:
    """The hub's settings for ``--data-dir``; a bad setting stops the command with its message."""
    try:
        settings = load_settings(data_dir, **overrides)
    except HubServiceError as exc:
        fail(str(exc))
    return settings


def database(settings: HubSettings) -> Database:
    """The migrated store of an initialised data directory."""
    from hub.store.database import open_database

    if not settings.data_dir.is_dir() or not (settings.keys_dir / "hub.key").exists():
        fail(
            f"{settings.data_dir} is not a hub data directory; "
            f"run `fedclinic-hub init --data-dir {settings.data_dir}`"
        )
    return open_database(settings.db_url)


@contextmanager
def hub_database(settings: HubSettings) -> Iterator[Database]:
    """The hub's store for one command: closed on the way out; a refused action stops with its message."""
    db = database(settings)
    try:
        yield db
    except HubServiceError as exc:
        fail(str(exc))
    finally:
        db.close()


def taking_part(db: Database, nodes: list[str] | None, exclude: list[str] | None) -> list[str] | None:
    """The nodes a round asks: those named (``--node``), or every active node but those left out
    (``--exclude-node``, each of which must be an active node); None for every active node."""
    if not exclude:
        return nodes
    if nodes:
        fail("name the nodes that take part (--node) or those left out (--exclude-node), not both")
    from sqlalchemy import select

    from edge_node.protocol.wire import NodeState
    from hub.store.schema import Node

    with db.session() as session:
        active = set(session.scalars(select(Node.id).where(Node.state == NodeState.ACTIVE.value)))
    unknown = sorted(set(exclude) - active)
    if unknown:
        fail(f"not an active node: {', '.join(unknown)}; see `fedclinic-hub nodes list`")
    left = sorted(active - set(exclude))
    if not left:
        fail("no active node is left to take part")
    return left
