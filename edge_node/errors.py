"""Errors raised by the edge node; each message says what to do next.

EdgeError
 ├── ConfigError        a setting is missing or wrong (names the key and the fix)
 ├── SpoolError         an instance cannot be made durable (unwritable data dir, I/O error)
 │    └── SpoolFullError  too little free space, or the instance is larger than max_instance_bytes
 ├── BadInstanceError   a received instance is malformed (cannot be parsed, mandatory UIDs missing)
 │    └── InstanceMismatchError  the data set disagrees with its C-STORE request (SOP class / instance UID)
 ├── ModelError         no usable model: none installed, bundle refused, or it cannot be loaded
 ├── InferenceError     preprocessing or the model failed on a study
 ├── LabelError         a label is refused (unknown class, unknown study) or a labeled archive is bad
 └── SendError          a result could not be delivered to a PACS destination

Bundle trust problems are ``edge_node.protocol.errors.BundleError`` (the contract's own tree);
``ModelError`` wraps them when the node refuses to install a bundle.
"""

from __future__ import annotations

__all__ = [
    "BadInstanceError",
    "ConfigError",
    "EdgeError",
    "InferenceError",
    "InstanceMismatchError",
    "LabelError",
    "ModelError",
    "SendError",
    "SpoolError",
    "SpoolFullError",
]


class EdgeError(Exception):
    """Base of every edge-node error."""


class ConfigError(EdgeError):
    """A setting is missing or has a wrong value; the message names the key and how to fix it."""


class SpoolError(EdgeError):
    """A received instance could not be written durably to the spool."""


class SpoolFullError(SpoolError):
    """The spool refuses an instance for lack of room (free space or the per-instance size limit)."""


class BadInstanceError(EdgeError):
    """A received instance is malformed: it cannot be parsed or lacks a mandatory UID."""


class InstanceMismatchError(BadInstanceError):
    """The data set's SOP Class or SOP Instance UID differs from the one in its C-STORE request."""


class ModelError(EdgeError):
    """No usable model: none installed, the bundle was refused, or the runtime cannot load it."""


class InferenceError(EdgeError):
    """Preprocessing or model execution failed for a study."""


class LabelError(EdgeError):
    """A label or a labeled archive is refused; the message says which and why (never an element value)."""


class SendError(EdgeError):
    """A result could not be sent to a DICOM destination (association refused, store failed, network)."""
