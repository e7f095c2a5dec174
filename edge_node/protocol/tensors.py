"""Named-tensor payloads on the wire: npz, never pickle."""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Mapping

import numpy as np

from edge_node.protocol.errors import EncodingError

#: A model state or update: tensor name -> array.
Tensors = dict[str, np.ndarray]

# numpy parses each npy header with ast.literal_eval, and CPython 3.11's AST construction keeps its recursion
# depth in interpreter-wide state: two threads decoding at once can fail with "SystemError: AST constructor
# recursion depth mismatch" (CPython gh-106905). Decoding is serialised; it holds the GIL nearly throughout.
_DECODE_LOCK = threading.Lock()


def encode_tensors(tensors: Mapping[str, np.ndarray], *, compress: bool = True) -> bytes:
    """Serialise named arrays to npz bytes. Object arrays are refused: they would need pickle."""
    for name, arr in tensors.items():
        if not isinstance(arr, np.ndarray):
            raise EncodingError(f"tensor {name!r} is {type(arr).__name__}, expected a numpy array")
        if arr.dtype == object:
            raise EncodingError(f"tensor {name!r} has dtype object, which cannot cross the wire")
    buf = io.BytesIO()
    if compress:
        np.savez_compressed(buf, **tensors)  # type: ignore[arg-type]
    else:
        np.savez(buf, **tensors)  # type: ignore[arg-type]
    return buf.getvalue()


def decode_tensors(raw: bytes) -> Tensors:
    """Load npz bytes with allow_pickle=False; malformed payloads raise EncodingError."""
    try:
        with _DECODE_LOCK, np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise EncodingError(f"tensor payload is not a valid npz without pickle: {exc}") from exc


def payload_nbytes(tensors: Mapping[str, np.ndarray]) -> int:
    """Raw size of the tensors in bytes (what an uncompressed upload would cost)."""
    return int(sum(arr.nbytes for arr in tensors.values()))
