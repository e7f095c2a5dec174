"""Strategy state as data: pack tensors under key prefixes, read JSON fields typed, store it all in one npz.

``Strategy.state_dict()`` is a flat mapping: numpy arrays under keys such as ``global/conv.weight`` and JSON
values under plain keys (``clients``, ``history``). A wrapper nests its inner strategy's state under
``inner/``. ``state_to_bytes`` writes the arrays and, as one UTF-8 JSON document, the rest into a single
npz; ``state_from_bytes`` reads it back with ``allow_pickle=False``, so a stored state is safe to load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from pydantic import TypeAdapter, ValidationError

from edge_node.protocol.errors import EncodingError
from edge_node.protocol.tensors import decode_tensors, encode_tensors
from hub.fl.errors import StrategyConfigError
from hub.fl.strategy import ClientFailure, JsonValue, Params, RoundRecord, StateDict
from hub.fl.validation import TensorSpec

__all__ = [
    "INNER",
    "innermost",
    "is_saved_state",
    "nest",
    "pack_params",
    "read_json",
    "records_from_json",
    "records_to_json",
    "specs_from_json",
    "specs_to_json",
    "state_from_arrays",
    "state_from_bytes",
    "state_to_arrays",
    "state_to_bytes",
    "unnest",
    "unpack_params",
]

T = TypeVar("T")

#: The npz entry that holds the JSON part of a state (array keys always carry a ``/``-separated prefix).
_JSON_KEY = "__json__"


def pack_params(prefix: str, params: Mapping[str, np.ndarray]) -> StateDict:
    """Copies of ``params`` under ``prefix + name``."""
    return {prefix + name: np.array(arr, copy=True) for name, arr in params.items()}


def unpack_params(state: Mapping[str, object], prefix: str) -> Params:
    """Copies of the arrays stored under ``prefix``, keyed by the rest of their key."""
    return {
        key[len(prefix) :]: np.array(value, copy=True)
        for key, value in state.items()
        if key.startswith(prefix) and isinstance(value, np.ndarray)
    }


def nest(prefix: str, state: StateDict) -> StateDict:
    """``state`` with every key under ``prefix`` (a wrapper's view of its inner strategy's state)."""
    return {prefix + key: value for key, value in state.items()}


def unnest(prefix: str, state: Mapping[str, np.ndarray | JsonValue]) -> StateDict:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


#: The prefix under which a wrapper (robust aggregation) nests the state of the strategy it wraps.
INNER = "inner/"


def innermost(state: Mapping[str, np.ndarray | JsonValue]) -> StateDict:
    """The state of the strategy inside every wrapper around it (``state`` itself when none)."""
    inner = dict(state)
    while any(key.startswith(INNER) for key in inner):
        inner = unnest(INNER, inner)
    return inner


def read_json(state: Mapping[str, np.ndarray | JsonValue], key: str, kind: Any) -> Any:
    """The JSON value under ``key`` validated as ``kind`` (a type such as ``list[str]``).

    A missing key, an array where JSON was expected, or a value of the wrong shape raises
    ``StrategyConfigError`` naming the key.
    """
    if key not in state:
        raise StrategyConfigError(f"strategy state lacks {key!r}; was it saved by this strategy?")
    value = state[key]
    if isinstance(value, np.ndarray):
        raise StrategyConfigError(f"strategy state entry {key!r} is an array, expected a JSON value")
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as exc:
        raise StrategyConfigError(f"strategy state entry {key!r} is malformed: {exc}") from exc


def records_to_json(history: list[RoundRecord]) -> JsonValue:
    """Round records as JSON lists."""
    return [
        {
            "rnd": r.rnd,
            "accepted": list(r.accepted),
            "failures": [[f.client_id, f.round, f.reason] for f in r.failures],
            "metrics": dict(r.metrics),
            "applied": r.applied,
        }
        for r in history
    ]


def records_from_json(state: Mapping[str, np.ndarray | JsonValue], key: str) -> list[RoundRecord]:
    """The round records stored by ``records_to_json`` under ``key``."""
    rows: list[dict[str, Any]] = read_json(state, key, list[dict[str, Any]])
    try:
        return [
            RoundRecord(
                int(row["rnd"]),
                tuple(str(c) for c in row["accepted"]),
                tuple(ClientFailure(str(c), int(n), str(why)) for c, n, why in row["failures"]),
                {str(k): float(v) for k, v in row["metrics"].items()},
                applied=bool(row["applied"]),
            )
            for row in rows
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise StrategyConfigError(
            f"strategy state entry {key!r} holds a malformed round record: {exc}"
        ) from exc


def specs_to_json(specs: Mapping[int, Mapping[str, Mapping[str, TensorSpec]]]) -> JsonValue:
    """The expected update specs of open rounds: round -> client -> tensor -> [shape, dtype]."""
    return {
        str(rnd): {
            cid: {name: [list(spec.shape), spec.dtype.str] for name, spec in tensors.items()}
            for cid, tensors in clients.items()
        }
        for rnd, clients in specs.items()
    }


def specs_from_json(
    state: Mapping[str, np.ndarray | JsonValue], key: str
) -> dict[int, dict[str, dict[str, TensorSpec]]]:
    """The specs stored by ``specs_to_json`` under ``key``."""
    raw = read_json(state, key, dict[int, dict[str, dict[str, tuple[list[int], str]]]])
    try:
        return {
            rnd: {
                cid: {name: TensorSpec(tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in t.items()}
                for cid, t in clients.items()
            }
            for rnd, clients in raw.items()
        }
    except TypeError as exc:
        raise StrategyConfigError(f"strategy state entry {key!r} names an unknown dtype: {exc}") from exc


def state_to_arrays(state: StateDict) -> Params:
    """The state as arrays only: every array under its key, the JSON values together in one uint8 entry
    (so that it travels and is stored like a model's tensors)."""
    if _JSON_KEY in state:
        raise StrategyConfigError(f"strategy state must not use the reserved key {_JSON_KEY!r}")
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    try:
        text = json.dumps(rest, allow_nan=True, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise StrategyConfigError(f"strategy state holds a value JSON cannot store: {exc}") from exc
    arrays[_JSON_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return arrays


def is_saved_state(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether ``arrays`` are a state written by ``state_to_arrays`` (not a model's tensors)."""
    return _JSON_KEY in arrays


def state_from_arrays(arrays: Mapping[str, np.ndarray]) -> StateDict:
    """The state written by ``state_to_arrays``."""
    rest_arrays = dict(arrays)
    blob = rest_arrays.pop(_JSON_KEY, None)
    if blob is None or blob.dtype != np.uint8:
        raise StrategyConfigError(
            "stored strategy state lacks its JSON part; it was not written by fedclinic"
        )
    try:
        rest = json.loads(blob.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StrategyConfigError(f"stored strategy state has a malformed JSON part: {exc}") from exc
    if not isinstance(rest, dict):
        raise StrategyConfigError("stored strategy state's JSON part is not an object")
    state: StateDict = dict(rest_arrays)
    state.update(rest)
    return state


def state_to_bytes(state: StateDict) -> bytes:
    """One npz of ``state_to_arrays``."""
    return encode_tensors(state_to_arrays(state))


def state_from_bytes(raw: bytes) -> StateDict:
    """The state written by ``state_to_bytes`` (no pickle involved)."""
    try:
        arrays = decode_tensors(raw)
    except EncodingError as exc:
        raise StrategyConfigError(f"stored strategy state is unreadable: {exc}") from exc
    return state_from_arrays(arrays)
