"""The clinic installer: an offline, signed kit and the wizard that turns a clinic PC into an edge node."""

__all__: list[str] = []
