"""Errors of the hub-edge contract.

ProtocolError
 ├── BundleError            a bundle cannot be trusted or loaded
 │    ├── SignatureError     missing, malformed or wrong signature / unknown key
 │    ├── IntegrityError     a file's sha256 differs from the manifest, or a file is missing
 │    └── SchemaError        manifest unreadable or of an unsupported schema version
 ├── EncodingError          a tensor payload cannot be decoded safely
 ├── PrivacyError           an accounting setting is out of range (σ, δ, sampling rate, target ε)
 ├── SecAggError            a secure-aggregation message is refused or the sum cannot be unmasked
 └── PublicationError       a publication record is forged, expired, replayed or an unsigned downgrade
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every contract error; the message says what to do."""


class BundleError(ProtocolError):
    """A model bundle cannot be trusted or loaded."""


class SignatureError(BundleError):
    """The bundle's signature is missing, malformed, or made by a key this node does not trust."""


class IntegrityError(BundleError):
    """A file of the bundle is missing or its sha256 differs from the manifest."""


class SchemaError(BundleError):
    """The manifest cannot be parsed or has a schema version this edge does not support."""


class EncodingError(ProtocolError):
    """A tensor payload is malformed or would need pickle to decode."""


class PrivacyError(ProtocolError):
    """A privacy-accounting setting cannot work (noise multiplier, δ, sampling rate or ε out of range)."""


class SecAggError(ProtocolError):
    """A secure-aggregation message is refused (forged, replayed, wrong round) or the sum cannot unmask."""


class PublicationError(ProtocolError):
    """A publication is unsigned, expired, replayed or an unsigned downgrade: keep the current model."""
