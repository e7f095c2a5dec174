"""Errors of the export pipeline.

ExportError
 ├── ParityError        ONNX Runtime and torch disagree beyond the bound on real images
 ├── QuantizationError  the int8 variant cannot be built or calibrated
 └── KeyFileError       a signing key file is missing, malformed or too readable
"""

from __future__ import annotations


class ExportError(Exception):
    """Base of every export error; the message says what to do."""


class ParityError(ExportError):
    """The exported ONNX model does not reproduce the torch model's outputs within the bound."""


class QuantizationError(ExportError):
    """The int8 variant could not be produced."""


class KeyFileError(ExportError):
    """A key file cannot be used: missing, not an Ed25519 PEM key, or a private key readable by others."""
