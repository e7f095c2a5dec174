"""The update codec: exact round trip, refusal of tampered payloads and of pickled (object) tensors."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest

from edge_node.protocol.updates import UpdateKind
from hub.fl.codec import UploadLedger, decode_or_failure, decode_result, encode_result, upload_bytes
from hub.fl.errors import PayloadError
from hub.fl.strategy import ClientFailure, ClientResult


def _result() -> ClientResult:
    update = {
        "conv.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
        "fc.bias": np.array([-0.0, np.pi], dtype=np.float64),
    }
    return ClientResult("clinic-3", 4, 120, update, {"val_auc": 0.75, "loss": 0.5})


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_is_exact(compress: bool) -> None:
    res = _result()
    env, payload = encode_result(res, UpdateKind.WEIGHTS_DELTA, compress=compress)
    assert env.payload_bytes == len(payload) == upload_bytes(env)
    assert env.payload_sha256 == hashlib.sha256(payload).hexdigest()
    back = decode_result(env, payload)
    assert (back.client_id, back.round, back.num_examples) == ("clinic-3", 4, 120)
    assert dict(back.metrics) == {"val_auc": 0.75, "loss": 0.5}
    assert sorted(back.update) == sorted(res.update)
    for name, arr in res.update.items():
        assert back.update[name].dtype == arr.dtype and back.update[name].shape == arr.shape
        assert back.update[name].tobytes() == arr.tobytes()  # bit-exact, sign of -0.0 included


def test_tampered_payload_is_refused() -> None:
    env, payload = encode_result(_result(), compress=False)
    tampered = bytearray(payload)
    tampered[len(tampered) // 2] ^= 0x01
    with pytest.raises(PayloadError, match="sha256"):
        decode_result(env, bytes(tampered))
    with pytest.raises(PayloadError, match="envelope says"):
        decode_result(env, payload + b"\0")
    with pytest.raises(PayloadError, match="limit"):
        decode_result(env, payload, max_bytes=len(payload) - 1)
    with pytest.raises(PayloadError, match="unpack"):
        decode_result(env, payload, max_unpacked_bytes=10)
    failure = decode_or_failure(env, bytes(tampered))
    assert isinstance(failure, ClientFailure)
    assert failure.client_id == "clinic-3" and "sha256" in failure.reason


def test_object_dtype_tensor_is_refused_both_ways() -> None:
    bad = ClientResult("c", 1, 1, {"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(PayloadError, match="object"):
        encode_result(bad)
    # a hostile node crafts an npz holding a pickled object array, with a matching envelope
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}], dtype=object))  # pickles: exactly what the hub must refuse
    env, _ = encode_result(ClientResult("c", 1, 1, {"x": np.zeros(1)}))
    payload = buf.getvalue()
    env = env.model_copy(
        update={"payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    )
    with pytest.raises(PayloadError, match="pickle"):
        decode_result(env, payload)


def test_upload_ledger_counts_bytes_per_client_and_round() -> None:
    ledger = UploadLedger()
    a1, _ = encode_result(ClientResult("a", 1, 1, {"x": np.zeros(100)}), compress=False)
    b1, _ = encode_result(ClientResult("b", 1, 1, {"x": np.zeros(10)}), compress=False)
    a2, _ = encode_result(ClientResult("a", 2, 1, {"x": np.zeros(100)}), compress=False)
    for env in (a1, b1, a2):
        ledger.record(env)
    assert ledger.total("a") == 2 * a1.payload_bytes
    assert ledger.total() == 2 * a1.payload_bytes + b1.payload_bytes
    assert ledger.per_client_round()[("b", 1)] == b1.payload_bytes
    assert ledger.mean_per_client_round() == (2 * a1.payload_bytes + b1.payload_bytes) / 3
    # an uncompressed npz carries the raw float64 bytes plus a small header
    assert a1.payload_bytes > 800
