"""Who is calling: a node (``Bearer <node_id>.<secret>``) or the operator (``Bearer <admin token>``)."""

from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from hub.service.enrollment import authenticate_node, parse_bearer
from hub.service.errors import AuthError, ForbiddenError
from hub.store.schema import Node

__all__ = ["AdminToken", "NodeToken", "admin_token", "node_in", "node_token", "require_admin"]

_AUTH_HELP = "Bearer <node_id>.<secret> (node) or Bearer <token> (admin)"


def _bearer(authorization: str | None) -> str:
    token = parse_bearer(authorization)
    if token is None:
        raise AuthError("this route needs a credential: send Authorization: Bearer ...")
    return token


# ``async``: parsing a header needs no thread, and FastAPI runs a plain ``def`` dependency in its thread
# pool, a hop per request.
async def node_token(authorization: Annotated[str | None, Header(description=_AUTH_HELP)] = None) -> str:
    return _bearer(authorization)


async def admin_token(authorization: Annotated[str | None, Header(description=_AUTH_HELP)] = None) -> str:
    return _bearer(authorization)


NodeToken = Annotated[str, Depends(node_token)]
AdminToken = Annotated[str, Depends(admin_token)]


def node_in(session: Session, token: str) -> Node:
    """The calling node, inside the route's session (so revocation applies to this very request)."""
    return authenticate_node(session, token)


def require_admin(session: Session, token: str, is_admin_token: bool) -> None:
    """Pass for the admin token; 403 for a valid node credential, 401 for anything else."""
    if is_admin_token:
        return
    if "." in token:
        try:
            authenticate_node(session, token)
        except AuthError:
            pass
        else:
            raise ForbiddenError("admin routes refuse node credentials")
    raise AuthError("unknown admin token; use the one in the hub's data directory (admin.token)")
