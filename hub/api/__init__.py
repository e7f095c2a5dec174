"""The hub's HTTPS API (FastAPI, ``/v1``): node routes, admin routes, the dashboard."""

from hub.api.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
