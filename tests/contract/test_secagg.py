"""Secure aggregation end to end: nodes' clients against the hub's server, with dropouts and attacks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy import stats

from edge_node.protection import ProtectionPipeline
from edge_node.protection.masking import SecAggClient
from edge_node.protocol import shamir
from edge_node.protocol.compression import layout_of
from edge_node.protocol.errors import SecAggError
from edge_node.protocol.protection import ProtectionSpec
from edge_node.protocol.secagg import MASKED_TENSOR, AdvertiseKeys, MaskedInput, encode_fixed, flatten
from edge_node.protocol.tensors import Tensors, decode_tensors
from hub.fl.secagg import SecAggServer

TASK = "task-7"
LAYOUT = layout_of({"w": np.zeros((40, 25), dtype=np.float32), "b": np.zeros(10, dtype=np.float32)})
SPEC = ProtectionSpec(cohort_size=10, clip_norm=1.0, epsilon=8.0, secure_aggregation=True)


@dataclass
class Federation:
    keys: dict[str, Ed25519PrivateKey]
    server: SecAggServer
    clients: dict[str, SecAggClient]


def _federation(
    n: int = 10, threshold: int = 6, round: int = 1, keys: dict[str, Ed25519PrivateKey] | None = None
) -> Federation:
    keys = keys or {f"node-{i:02d}": Ed25519PrivateKey.generate() for i in range(n)}
    pubs = {k: v.public_key() for k, v in keys.items()}
    server = SecAggServer(task_id=TASK, round=round, node_keys=pubs, threshold=threshold, layout=LAYOUT)
    clients = {
        k: SecAggClient(k, keys[k], pubs, task_id=TASK, round=round, threshold=threshold, layout=LAYOUT)
        for k in keys
    }
    return Federation(keys, server, clients)


def _exchange_keys(fed: Federation) -> None:
    for c in fed.clients.values():
        fed.server.receive_advertise(c.advertise())
    key_list = fed.server.key_list()
    for c in fed.clients.values():
        fed.server.receive_shares(c.share_keys(key_list))
    share_list = fed.server.share_list()
    for c in fed.clients.values():
        c.receive_shares(share_list)


def _masked_updates(fed: Federation) -> dict[str, tuple[Tensors, bytes, MaskedInput]]:
    """Every node runs its pipeline (clip → noise → mask): what it masked, the payload, the message."""
    out = {}
    rng = np.random.default_rng(11)
    for node, c in fed.clients.items():
        update = {name: rng.normal(0, 0.05, spec.shape).astype(np.float32) for name, spec in LAYOUT.items()}
        seen: list[Tensors] = []

        def masker(t: object, c: SecAggClient = c, seen: list[Tensors] = seen) -> Tensors:
            seen.append(dict(t))  # type: ignore[call-overload]
            return c.mask(t)  # type: ignore[arg-type]

        protected = ProtectionPipeline(rng=rng).protect(update, SPEC, masker=masker)
        out[node] = (seen[0], protected.payload, c.masked_input(protected.payload))
    return out


def _plain_ring_sum(inputs: list[Tensors]) -> np.ndarray:
    total = np.zeros(sum(int(np.prod(s.shape)) for s in LAYOUT.values()), dtype=np.uint32)
    for t in inputs:
        total += encode_fixed(flatten(t, LAYOUT), 16)
    return total


def test_three_nodes_drop_after_masking_and_the_sum_is_exact_in_the_ring() -> None:
    fed = _federation()
    _exchange_keys(fed)
    masked = _masked_updates(fed)
    dropped = ["node-02", "node-05", "node-09"]  # masked, but their inputs never reach the hub
    for node, (_, payload, msg) in masked.items():
        if node not in dropped:
            fed.server.receive_masked(msg, payload)
    request = fed.server.unmask_request()
    assert request.dropped == dropped and len(request.survivors) == 7
    for node in request.survivors:
        fed.server.receive_unmask(fed.clients[node].unmask(request))
    got = fed.server.ring_sum()
    survivors = [masked[n][0] for n in request.survivors]
    # exactly the plain sum of the survivors in Z_2^32: every dropped node's pairwise masks were removed
    np.testing.assert_array_equal(got, _plain_ring_sum(survivors))
    # and as floats, the plain sum to within the fixed-point step 2^-16 per node
    floats = fed.server.sum()
    for name in LAYOUT:
        plain = np.sum([s[name].astype(np.float64) for s in survivors], axis=0)
        np.testing.assert_allclose(floats[name], plain, atol=7 * 2**-16)
    # without the dropped nodes' reconstructed keys the masks would not cancel
    raw = np.zeros_like(got)
    for n in request.survivors:
        raw += decode_tensors(masked[n][1])[MASKED_TENSOR]
    assert not np.array_equal(raw, got)


def test_nodes_that_drop_after_sending_still_count_and_their_self_masks_come_off() -> None:
    fed = _federation()
    _exchange_keys(fed)
    masked = _masked_updates(fed)
    for _, payload, msg in masked.values():
        fed.server.receive_masked(msg, payload)
    request = fed.server.unmask_request()
    gone = {"node-00", "node-04", "node-07"}  # sent their input, then went offline before unmasking
    for node in request.survivors:
        if node not in gone:
            fed.server.receive_unmask(fed.clients[node].unmask(request))
    np.testing.assert_array_equal(fed.server.ring_sum(), _plain_ring_sum([m[0] for m in masked.values()]))


def test_a_masked_update_looks_uniform_and_the_plain_one_does_not() -> None:
    # Kolmogorov–Smirnov test of the 1010 ring elements (scaled to [0, 1)) against the uniform distribution
    # at significance 1e-4: a masked vector passes, the plain fixed-point vector (values near 0 and 2^32,
    # i.e. small positive and negative numbers) fails by a wide margin.
    fed = _federation()
    _exchange_keys(fed)
    plain, payload, _ = _masked_updates(fed)["node-03"]
    masked = decode_tensors(payload)[MASKED_TENSOR].astype(np.float64) / 2**32
    unmasked = encode_fixed(flatten(plain, LAYOUT), 16).astype(np.float64) / 2**32
    assert stats.kstest(masked, "uniform").pvalue > 1e-4
    assert stats.kstest(unmasked, "uniform").pvalue < 1e-10


def test_replayed_forged_and_wrong_round_messages_are_refused() -> None:
    fed = _federation()
    client = fed.clients["node-01"]
    msg = client.advertise()
    fed.server.receive_advertise(msg)
    with pytest.raises(SecAggError, match="replay"):
        fed.server.receive_advertise(msg)
    # forged: node-02's keys signed by node-03's key, and a signed message altered afterwards
    forged = AdvertiseKeys(
        task_id=TASK, round=1, node_id="node-02", cipher_public="00" * 32, mask_public="11" * 32
    ).signed(fed.keys["node-03"])
    with pytest.raises(SecAggError, match="not signed"):
        fed.server.receive_advertise(forged)  # type: ignore[arg-type]
    honest = fed.clients["node-04"].advertise()
    tampered = honest.model_copy(update={"mask_public": "22" * 32})
    with pytest.raises(SecAggError, match="not signed"):
        fed.server.receive_advertise(tampered)
    # wrong round: the same nodes' round-1 message replayed into round 2, and relabelled as round 2
    round2 = _federation(round=2, keys=fed.keys)
    with pytest.raises(SecAggError, match="round 1, this is task 'task-7' round 2"):
        round2.server.receive_advertise(msg)
    with pytest.raises(SecAggError, match="not signed"):
        round2.server.receive_advertise(msg.model_copy(update={"round": 2}))
    round2.server.receive_advertise(round2.clients["node-01"].advertise())  # its own round's is fine
    # a node refuses a key list the hub doctored
    for c in list(fed.clients.values())[2:]:
        fed.server.receive_advertise(c.advertise())
    key_list = fed.server.key_list()
    with pytest.raises(SecAggError, match="no valid signature"):
        client.share_keys([*key_list[:-1], tampered])
    # too late: the key list went out, so a new advertisement cannot join this round
    with pytest.raises(SecAggError, match=r"too late|replay"):
        fed.server.receive_advertise(fed.clients["node-06"].advertise())


def test_a_masked_payload_must_be_the_one_signed_and_unmasking_needs_the_threshold() -> None:
    fed = _federation(threshold=8)
    _exchange_keys(fed)
    masked = _masked_updates(fed)
    msg = masked["node-00"][2]
    with pytest.raises(SecAggError, match="not the one it signed"):
        fed.server.receive_masked(msg, masked["node-01"][1])
    for node in ["node-00", "node-01", "node-02"]:
        fed.server.receive_masked(masked[node][2], masked[node][1])
    with pytest.raises(SecAggError, match="at least 8"):
        fed.server.unmask_request()
    # a node answers one unmask request per round only, so the hub cannot ask for both kinds of share
    for node in [f"node-{i:02d}" for i in range(3, 9)]:
        fed.server.receive_masked(masked[node][2], masked[node][1])
    request = fed.server.unmask_request()
    fed.clients["node-00"].unmask(request)
    with pytest.raises(SecAggError, match="already answered"):
        fed.clients["node-00"].unmask(request)


def test_shamir_threshold_by_hand() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, 5)
    assert shamir.combine([shares[4], shares[0], shares[2]], 3) == secret
    with pytest.raises(SecAggError, match="need 3"):
        shamir.combine(shares[:2], 3)
    # two shares of a 3-of-5 sharing interpolate to a line whose value at 0 is a random field element,
    # almost surely not a 32-byte number (probability 2^-265 that it is)
    with pytest.raises(SecAggError, match="do not belong"):
        shamir.combine(shares[:2], 2)
    assert shamir.Share.from_bytes(shares[1].to_bytes()) == shares[1]


def test_distributed_noise_the_unmasked_sum_carries_at_least_the_stated_variance() -> None:
    """Each of 10 nodes adds σ²C²/t (t = 6, the threshold); 3 drop after masking, so the sum the hub
    unmasks holds 7 shares: its noise variance is 7/6·σ²C² ≥ σ²C² (chi-square interval, level 1e-6)."""
    spec = SPEC.model_copy(update={"secagg_threshold": 6})
    fed = _federation(threshold=6)
    _exchange_keys(fed)
    rng = np.random.default_rng(21)
    pipeline = ProtectionPipeline(rng=rng)
    zero = {name: np.zeros(s.shape, dtype=np.float32) for name, s in LAYOUT.items()}
    dropped = {"node-01", "node-04", "node-08"}
    for node, client in fed.clients.items():
        protected = pipeline.protect(zero, spec, masker=client.mask)
        if node not in dropped:
            fed.server.receive_masked(client.masked_input(protected.payload), protected.payload)
    request = fed.server.unmask_request()
    assert len(request.survivors) == 7
    for node in request.survivors:
        fed.server.receive_unmask(fed.clients[node].unmask(request))
    noise = flatten(fed.server.sum(), LAYOUT)  # (1010,): the updates were zero, the sum is pure noise
    sigma = pipeline.noise_multiplier(spec)
    assert sigma is not None
    full = (sigma * 1.0) ** 2
    ss = float(noise @ noise)
    lo, hi = ss / stats.chi2.ppf(1 - 5e-7, noise.size), ss / stats.chi2.ppf(5e-7, noise.size)
    assert lo <= 7 / 6 * full <= hi
    assert lo > full / 6  # far more than one node's share: the shares added up
