"""pFedNet's differentially sparse upload: the right groups are zeroed, both sides agree, bytes go down."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.protocol.tensors import encode_tensors
from hub.fl.differential_sparsity import DifferentialAssembler, DifferentialSparsifier, group_shrink
from hub.fl.errors import PayloadError


def test_group_shrink_zeroes_rows_below_their_fair_share_and_shrinks_the_rest() -> None:
    delta = np.zeros((4, 3), dtype=np.float32)
    delta[0] = [3.0, 4.0, 0.0]  # norm 5
    delta[1] = [0.0, 0.0, 0.5]  # norm 0.5
    delta[3] = [0.3, 0.0, 0.4]  # norm 0.5
    total = np.sqrt(25 + 0.25 + 0.25)
    tau = 1.0 * total * np.sqrt(3 / 12)  # ≈ 2.52
    out, zeroed, groups = group_shrink(delta, 1.0)
    assert (zeroed, groups) == (3, 4)  # rows 1, 2 (already zero) and 3
    np.testing.assert_allclose(out[1:], 0.0)
    np.testing.assert_allclose(out[0], delta[0] * (1 - tau / 5), rtol=1e-6)
    # γ = 0 keeps everything exactly; a 1-D tensor is a single group.
    np.testing.assert_array_equal(group_shrink(delta, 0.0)[0], delta)
    bias, z, g = group_shrink(np.array([0.1, -0.2], dtype=np.float32), 1.0)
    assert (z, g) == (1, 1) and not bias.any()  # its own norm is exactly its fair share: dropped
    with pytest.raises(ValueError, match="gamma"):
        group_shrink(delta, -1.0)


def _track(gamma: float) -> tuple[float, int]:
    """Six rounds of updates through both sides; (final error of what the hub holds, groups zeroed)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(32, 16)).astype(np.float32)
    client, hub = DifferentialSparsifier(gamma=gamma), DifferentialAssembler()
    zeroed = 0
    for t in range(6):
        # Consecutive updates share most of their structure; a few rows change a lot each round.
        update = base.copy()
        update[t * 4 : t * 4 + 4] += 3.0
        update += 0.01 * rng.normal(size=update.shape).astype(np.float32)
        change = client.encode({"w": update, "steps": np.array(3)})
        got = hub.decode("C", change)
        np.testing.assert_allclose(got["w"], client.reference["w"], atol=1e-6)  # both sides agree
        assert int(got["steps"]) == 3
        if t > 0 and gamma > 0:
            # The rows that changed a lot are sent; the ones that did not are dropped.
            assert np.abs(change["w"][t * 4 : t * 4 + 4]).min(axis=1).max() > 0
            assert client.last.groups_zeroed >= 20
        zeroed += client.last.groups_zeroed
    return float(np.linalg.norm(got["w"] - update) / np.linalg.norm(update)), zeroed


def test_client_and_hub_agree_and_gamma_trades_accuracy_for_sparsity() -> None:
    exact, sparse0 = _track(0.0)
    mild, sparse1 = _track(0.3)
    strong, sparse2 = _track(0.8)
    assert exact < 1e-6 and sparse0 == 0  # γ = 0: the whole change goes, the hub holds the true update
    assert 0 < mild < strong < 0.7  # the group lasso's shrinkage grows with γ ...
    assert 0 < sparse1 <= sparse2  # ... and so does what is left out


def test_sparse_changes_cost_fewer_upload_bytes_than_the_dense_update() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(64, 288)).astype(np.float32)
    client = DifferentialSparsifier(gamma=1.0)
    client.encode({"conv": base})
    update = base.copy()
    update[:6] += rng.normal(size=(6, 288)).astype(np.float32)
    change = client.encode({"conv": update})
    dense, sparse = len(encode_tensors({"conv": update})), len(encode_tensors(change))
    assert client.last.groups_zeroed == 58 and client.last.groups == 64
    assert sparse < 0.2 * dense, (sparse, dense)


def test_hub_refuses_a_change_of_another_shape() -> None:
    hub = DifferentialAssembler()
    hub.decode("C", {"w": np.zeros((2, 2), dtype=np.float32)})
    with pytest.raises(PayloadError, match="changed shape"):
        hub.decode("C", {"w": np.zeros((3, 2), dtype=np.float32)})
