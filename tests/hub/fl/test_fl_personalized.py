"""HSL, FedHelp, the similarity graph and pFedNet against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from fl_helpers import make_result

from edge_node.protocol.updates import UpdateKind
from hub.fl.errors import StrategyConfigError
from hub.fl.fedbn import is_norm_buffer
from hub.fl.fedhelp import FedHelp, roles_by_size
from hub.fl.graph import incidence_matrix, knn_edges, similarity_graph, sketch_distances
from hub.fl.hsl import HSL
from hub.fl.pfednet import (
    PFedNet,
    first_block_personal,
    group_soft_threshold,
    is_head_or_norm_tensor,
    is_head_tensor,
    last_block_personal,
    personal_part,
    proximal_personal_step,
)
from hub.fl.state import state_from_bytes, state_to_bytes
from hub.fl.strategy import ClientResult, Params

# -- HSL ----------------------------------------------------------------------------------------------------


def test_hsl_is_unweighted_over_all_tensors_including_bn(tiny_model: Params) -> None:
    s = HSL()
    s.initialize(tiny_model, ["a", "b"])
    ta, tb = s.configure_round(1, ["a", "b"])
    assert sorted(ta.params) == sorted(tiny_model)  # everything is shared, BN stats included
    assert ta.config == {"primary_weight": 0.5, "sat_weight": 0.5}
    full = {"conv.weight": [1.0, 1.0], "bn1.weight": [0.0], "bn1.running_mean": [2.0]}
    ra = make_result(ta, {**full, "bn1.num_batches_tracked": 10, "fc.bias": [1.0]}, 1000)
    full_b = {"conv.weight": [3.0, -1.0], "bn1.weight": [1.0], "bn1.running_mean": [4.0]}
    rb = make_result(tb, {**full_b, "bn1.num_batches_tracked": 20, "fc.bias": [0.0]}, 10)
    new = s.aggregate(1, [ra, rb], [])
    assert new is not None
    # unweighted despite 1000 vs 10 examples: conv = [1,2] + ([1,1]+[3,-1])/2 = [1,2] + [2,0] = [3,2]
    np.testing.assert_array_equal(new["conv.weight"], [3.0, 2.0])
    # running_mean = 0 + (2+4)/2 = 3 ; counter = (10+20)/2 = 15 ; fc = 0.5 + 0.5 = 1.0
    np.testing.assert_array_equal(new["bn1.running_mean"], [3.0])
    assert int(new["bn1.num_batches_tracked"]) == 15
    np.testing.assert_array_equal(new["fc.bias"], [1.0])


def test_hsl_hands_on_its_last_round_and_reads_a_state_that_tracked_a_best_one(tiny_model: Params) -> None:
    s = HSL()
    s.initialize(tiny_model, ["a"])
    zero = {n: np.zeros_like(a) for n, a in tiny_model.items()}
    for rnd, auc, step in [(1, 0.7, 1.0), (2, 0.9, 2.0), (3, 0.8, 4.0)]:
        (t,) = s.configure_round(rnd, ["a"])
        s.aggregate(rnd, [make_result(t, {**zero, "fc.bias": [step]}, 5, {"val_auc": auc})], [])
    # fc.bias: 0.5 -> 1.5 -> 3.5 -> 7.5; a reported validation AUC chooses nothing (round 2's 0.9 included)
    np.testing.assert_array_equal(s.global_params["fc.bias"], [7.5])
    # A state saved while HSL also kept the best reported round (auc_by_round, best_round, best/*) loads,
    # and the restored strategy goes on from the last round's model.
    state = s.state_dict()
    state.update({"auc_by_round": {"1": 0.7, "2": 0.9}, "best_round": 2, "best/fc.bias": np.array([3.5])})
    restored = HSL()
    restored.load_state_dict(state_from_bytes(state_to_bytes(state)))
    np.testing.assert_array_equal(restored.global_params["fc.bias"], [7.5])
    (t,) = restored.configure_round(4, ["a"])
    np.testing.assert_array_equal(t.params["fc.bias"], [7.5])


# -- FedHelp ------------------------------------------------------------------------------------------------


def _small_model() -> Params:
    return {
        "features.conv.weight": np.array([1.0, 1.0]),
        "head.weight": np.array([0.0]),
        "public_head.weight": np.array([5.0, 5.0, 5.0]),
    }


def test_fedhelp_excludes_private_heads_and_is_unweighted() -> None:
    s = FedHelp(large_clients=["big"])
    s.initialize(_small_model(), ["big", "s1", "s2"])
    tasks = {t.client_id: t for t in s.configure_round(1, ["big", "s1", "s2"])}
    # the private public-data head never travels
    assert sorted(tasks["s1"].params) == ["features.conv.weight", "head.weight"]
    assert not s.shares("public_head.weight") and s.shares("head.weight")
    assert tasks["big"].config["role"] == "large" and tasks["s1"].config["role"] == "small"
    deltas = {"big": [3.0, 0.0], "s1": [0.0, 3.0], "s2": [0.0, -6.0]}
    results = [
        make_result(tasks[c], {"features.conv.weight": d, "head.weight": [1.0 if c == "big" else 0.0]}, n)
        for (c, d), n in zip(deltas.items(), [6000, 20, 2], strict=True)
    ]
    new = s.aggregate(1, results, [])
    assert new is not None
    assert sorted(new) == ["features.conv.weight", "head.weight"]
    # unweighted (6000/20/2 examples ignored): conv = [1,1] + ([3,0]+[0,3]+[0,-6])/3 = [1,1] + [1,-1] = [2,0]
    np.testing.assert_array_equal(new["features.conv.weight"], [2.0, 0.0])
    # head = 0 + (1+0+0)/3
    np.testing.assert_allclose(new["head.weight"], [1.0 / 3.0], rtol=0, atol=1e-15)
    # a client that uploads its private head is rejected
    (t2,) = s.configure_round(2, ["s1"])
    leak = make_result(t2, {"features.conv.weight": [0.0, 0.0], "head.weight": [0.0]}, 1)
    leak.update["public_head.weight"] = np.zeros(3)
    assert s.aggregate(2, [leak], []) is None


def test_fedhelp_roles_by_size() -> None:
    sizes = {"a": 60, "b": 20, "c": 8, "d": 20}
    assert roles_by_size(sizes, 2) == {"a": "large", "b": "large", "d": "small", "c": "small"}
    with pytest.raises(StrategyConfigError, match="top_n"):
        roles_by_size(sizes, 5)
    with pytest.raises(StrategyConfigError, match="not among"):
        FedHelp(large_clients=["zz"]).initialize(_small_model(), ["a"])


# -- similarity graph ---------------------------------------------------------------------------------------

SKETCHES = [
    {"label_counts": np.array([90, 10]), "feature_mean": np.array([0.0, 0.0])},
    {"label_counts": np.array([80, 20]), "feature_mean": np.array([1.0, 0.0])},
    {"label_counts": np.array([10, 90]), "feature_mean": np.array([0.0, 3.0])},
    {"label_counts": np.array([20, 80]), "feature_mean": np.array([0.0, 0.0])},
]


def test_sketch_distances_are_l1_between_label_proportions() -> None:
    d = sketch_distances(SKETCHES)
    # proportions a=(.9,.1) b=(.8,.2) c=(.1,.9) d=(.2,.8): |a-b| = .1+.1 = .2 ; |a-c| = .8+.8 = 1.6
    # |a-d| = .7+.7 = 1.4 ; |b-c| = 1.4 ; |b-d| = 1.2 ; |c-d| = .2
    expected = np.array([[0, 0.2, 1.6, 1.4], [0.2, 0, 1.4, 1.2], [1.6, 1.4, 0, 0.2], [1.4, 1.2, 0.2, 0]])
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-12)
    # adding feature means with weight 0.5: + 0.5*|mean_a - mean_c|_1 = 0.5*3 -> a-c = 1.6 + 1.5 = 3.1
    d2 = sketch_distances(SKETCHES, ("label_counts", "feature_mean"), {"feature_mean": 0.5})
    assert d2[0, 2] == pytest.approx(3.1) and d2[0, 3] == pytest.approx(1.4)


def test_knn_graph_and_incidence_matrix() -> None:
    g1 = similarity_graph(SKETCHES, k=1)
    # each client's nearest: a->b, b->a, c->d, d->c
    assert g1.edges == ((0, 1), (2, 3))
    np.testing.assert_array_equal(g1.incidence, [[1, 0], [-1, 0], [0, 1], [0, -1]])
    # k=2: a:{b, d(1.4)} b:{a, d(1.2)} c:{d, b(1.4)} d:{c, b(1.2)}
    assert knn_edges(sketch_distances(SKETCHES), 2) == [(0, 1), (0, 3), (1, 2), (1, 3), (2, 3)]
    # z Q gives z_i - z_j per edge
    z = np.array([[1.0, 2.0, 4.0, 8.0]])  # (1, N)
    np.testing.assert_array_equal(z @ incidence_matrix([(0, 3), (2, 1)], 4), [[-7.0, 2.0]])
    with pytest.raises(StrategyConfigError, match="different nodes"):
        incidence_matrix([(1, 1)], 4)


# -- pFedNet proximal step ----------------------------------------------------------------------------------

Q2 = np.array([[1.0], [-1.0]])  # two clients, one edge


def test_prox_with_zero_lambda_is_the_plain_gradient_step() -> None:
    rng = np.random.default_rng(0)
    g, z_t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    q = incidence_matrix([(0, 1), (1, 2)], 3)
    z = proximal_personal_step(g, z_t, q, lam=0.0, eta=0.1)
    np.testing.assert_array_equal(z, z_t - 0.1 * g / 3)  # Z_t − ηG/N exactly
    z_sum = proximal_personal_step(g, z_t, q, lam=0.0, eta=0.1, mean_gradient=False)
    np.testing.assert_array_equal(z_sum, z_t - 0.1 * g)


def test_prox_with_huge_lambda_fuses_two_clients_at_their_mean_step() -> None:
    z_t = np.array([[1.0, 3.0]])  # (d2=1, N=2)
    g = np.array([[2.0, -6.0]])
    z = proximal_personal_step(g, z_t, Q2, lam=1e6, eta=0.5)
    # separate steps: 1 - 0.5*2/2 = 0.5 and 3 - 0.5*(-6)/2 = 4.5 ; fused at their mean 2.5
    assert abs(z[0, 0] - z[0, 1]) < 1e-6
    np.testing.assert_allclose(z, [[2.5, 2.5]], rtol=0, atol=1e-6)


def test_group_soft_threshold_by_hand() -> None:
    v = np.array([[3.0, 0.3, 0.0], [4.0, 0.4, 0.0]])  # columns with norms 5, 0.5, 0
    w = group_soft_threshold(v, 1.0)
    # (1 - 1/5)*[3,4] = [2.4, 3.2] ; norm 0.5 <= 1 -> 0 ; zero stays zero
    np.testing.assert_allclose(w, [[2.4, 0.0, 0.0], [3.2, 0.0, 0.0]], rtol=0, atol=1e-15)


def test_admm_iterations_by_hand() -> None:
    # min (1/2)(z1-0)^2 + (1/2)(z2-4)^2 + |z1 - z2| (η=1, λ=1, ρ=1, G=0)
    z_t, g = np.array([[0.0, 4.0]]), np.zeros((1, 2))
    # iteration 1: W = Z_t Q = -4, Ω = 0 ; (I+QQᵀ)^{-1} = (1/3)[[2,1],[1,2]]
    #   Z = ([0,4] + (-4)[1,-1]) inv = [-4,8]·(1/3)[[2,1],[1,2]] = [0,4]
    #   W-step: v = ZQ - Ω = -4 -> W = (1 - 1/4)(-4) = -3 ; Ω = 0 + (W - ZQ) = -3 + 4 = 1
    np.testing.assert_allclose(
        proximal_personal_step(g, z_t, Q2, lam=1, eta=1, iterations=1), [[0, 4]], atol=1e-15
    )
    # iteration 2: Z = ([0,4] + (W + Ω)[1,-1]) inv = [-2, 6]·(1/3)[[2,1],[1,2]] = [2/3, 10/3]
    z2 = proximal_personal_step(g, z_t, Q2, lam=1, eta=1, iterations=2)
    np.testing.assert_allclose(z2, [[2 / 3, 10 / 3]], rtol=0, atol=1e-14)
    # converged: each shrinks by ηλ = 1 toward the other: [1, 3]
    np.testing.assert_allclose(proximal_personal_step(g, z_t, Q2, lam=1, eta=1), [[1, 3]], atol=1e-9)


# -- pFedNet strategy ---------------------------------------------------------------------------------------


def _pmodel() -> Params:
    return {"conv.weight": np.array([1.0, 1.0], dtype=np.float32), "fc.weight": np.array([0.0, 0.0])}


def test_pfednet_round_shared_fedavg_and_personal_prox() -> None:
    assert is_head_tensor("fc.weight") and not is_head_tensor("features.fc1.weight")
    s = PFedNet(lam=0.0, eta=0.5, edges=[("a", "b")])
    s.initialize(_pmodel(), ["a", "b", "c"])
    ta, tb = s.configure_round(1, ["a", "b"])
    assert ta.kind is UpdateKind.WEIGHTS_DELTA and sorted(ta.params) == ["conv.weight", "fc.weight"]
    ra = make_result(ta, {"conv.weight": [1.0, 0.0], "fc.weight": [3.0, 0.0]}, 30)
    rb = make_result(tb, {"conv.weight": [-3.0, 4.0], "fc.weight": [0.0, -6.0]}, 10)
    new = s.aggregate(1, [ra, rb], [])
    assert new is not None and sorted(new) == ["conv.weight"]
    # shared, sample-weighted: (30*[1,0] + 10*[-3,4])/40 = [0, 1] -> [1, 2]
    np.testing.assert_array_equal(new["conv.weight"], np.array([1.0, 2.0], dtype=np.float32))
    # personal, λ = 0: z_n + delta_n/N with N = 3 clients (c did not answer: G_c = 0)
    np.testing.assert_allclose(s.params_for("a")["fc.weight"], [1.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(s.params_for("b")["fc.weight"], [0.0, -2.0], atol=1e-15)
    np.testing.assert_array_equal(s.params_for("c")["fc.weight"], [0.0, 0.0])
    np.testing.assert_array_equal(s.params_for("c")["conv.weight"], [1.0, 2.0])


def test_pfednet_huge_lambda_fuses_neighbours_only() -> None:
    s = PFedNet(lam=1e6, eta=0.5, edges=[("a", "b")])
    s.initialize(_pmodel(), ["a", "b", "c"])
    tasks = s.configure_round(1, ["a", "b", "c"])
    deltas = {"a": [3.0, 0.0], "b": [0.0, -6.0], "c": [9.0, 9.0]}
    results = [make_result(t, {"conv.weight": [0, 0], "fc.weight": deltas[t.client_id]}, 1) for t in tasks]
    s.aggregate(1, results, [])
    za, zb, zc = (s.params_for(c)["fc.weight"] for c in "abc")
    # a and b fuse at the mean of their separate steps ([1,0] and [0,-2]) = [0.5, -1]; c is alone: [3, 3]
    np.testing.assert_allclose(za, [0.5, -1.0], atol=1e-6)
    np.testing.assert_allclose(zb, za, atol=1e-6)
    np.testing.assert_allclose(zc, [3.0, 3.0], atol=1e-9)


def _fused_rounds(lam: float, rounds: int) -> tuple[PFedNet, dict[str, np.ndarray]]:
    """Clients a–b joined by an edge, c alone; each pulls its personal part halfway to its own optimum
    every round (delta = (target − z)/2), as a clinic whose personal optimum differs from its neighbour's."""
    targets = {"a": np.array([4.0, 0.0]), "b": np.array([0.0, 2.0]), "c": np.array([-3.0, -3.0])}
    s = PFedNet(lam=lam, eta=0.5, mean_gradient=False, edges=[("a", "b")])
    s.initialize(_pmodel(), ["a", "b", "c"])
    for rnd in range(1, rounds + 1):
        tasks = s.configure_round(rnd, ["a", "b", "c"])
        results = [
            make_result(
                t, {"conv.weight": [0, 0], "fc.weight": (targets[t.client_id] - t.params["fc.weight"]) / 2}, 1
            )
            for t in tasks
        ]
        s.aggregate(rnd, results, [])
    return s, {c: s.params_for(c)["fc.weight"] for c in "abc"}


def test_pfednet_fusion_over_rounds_joins_neighbours_only_when_lambda_is_large() -> None:
    # λ = 0: every client reaches its own optimum; the neighbours stay ‖t_a − t_b‖ = √20 apart
    s0, z0 = _fused_rounds(0.0, 40)
    np.testing.assert_allclose(z0["a"], [4.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(z0["b"], [0.0, 2.0], atol=1e-6)
    assert s0.last_fusion is not None and max(s0.last_fusion.shift.values()) == 0.0
    # λ large: a and b converge to one personal part, the minimiser of their summed objectives (the
    # midpoint of the targets); c, without an edge, still reaches its own optimum
    s1, z1 = _fused_rounds(1e4, 40)
    np.testing.assert_allclose(z1["a"], z1["b"], atol=1e-6)
    np.testing.assert_allclose(z1["a"], [2.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(z1["c"], [-3.0, -3.0], atol=1e-6)
    assert s1.last_fusion is not None
    assert s1.last_fusion.shift["a"] > 1.0 and s1.last_fusion.shift["c"] < 1e-9
    assert s1.last_fusion.fused_spread["a"] < s1.last_fusion.unfused_spread["a"]
    # a moderate λ (ηλ = 0.5 below half the gap) pulls them part of the way: strictly between the two
    _, zm = _fused_rounds(1.0, 40)
    gap = float(np.linalg.norm(zm["a"] - zm["b"]))
    assert 1e-3 < gap < np.sqrt(20.0) - 1e-3


def test_pfednet_builds_its_graph_from_a_stats_round() -> None:
    s = PFedNet(lam=0.0, graph_k=1)
    ids = ["a", "b", "c", "d"]
    s.initialize(_pmodel(), ids)
    tasks = s.configure_round(1, ids)
    assert all(t.kind is UpdateKind.STATS and t.params == {} for t in tasks)
    assert tasks[0].config == {"stats_keys": "label_counts", "stats_of": "training_set"}
    results = [
        ClientResult(c, 1, 100, {"label_counts": sk["label_counts"]})
        for c, sk in zip(ids, SKETCHES, strict=True)
    ]
    results.append(ClientResult("zz", 1, 1, {"label_counts": np.array([1, 1])}))
    assert s.aggregate(1, results, []) is None
    assert s.graph is not None and s.graph.edges == ((0, 1), (2, 3))
    assert s.history[-1].failures[0].reason == "unknown client"
    assert s.configure_round(2, ids)[0].kind is UpdateKind.WEIGHTS_DELTA


def test_pfednet_local_tensors_stay_at_the_client_and_are_never_fused() -> None:
    bn: Params = {
        "conv.weight": np.array([1.0, 1.0], dtype=np.float32),
        "fc.norm.weight": np.array([1.0], dtype=np.float32),
        "fc.norm.running_mean": np.array([0.0], dtype=np.float32),
        "fc.norm.num_batches_tracked": np.array(0, dtype=np.int64),
    }
    s = PFedNet(lam=1e6, eta=0.5, edges=[("a", "b")], local=is_norm_buffer)
    s.initialize(bn, ["a", "b"])  # the int64 counter is local, so it is no personal tensor to refuse
    ta, tb = s.configure_round(1, ["a", "b"])
    assert sorted(ta.params) == ["conv.weight", "fc.norm.weight"]
    results = [
        make_result(ta, {"conv.weight": [0, 0], "fc.norm.weight": [2.0]}, 1),
        make_result(tb, {"conv.weight": [0, 0], "fc.norm.weight": [-2.0]}, 1),
    ]
    s.aggregate(1, results, [])
    # the affine weight is personal and fused (a huge λ joins the neighbours); no statistic is held
    assert sorted(s.params_for("a")) == ["conv.weight", "fc.norm.weight"]
    np.testing.assert_allclose(s.params_for("a")["fc.norm.weight"], s.params_for("b")["fc.norm.weight"])
    # an update that carries a local tensor was not asked for it: the round rejects the result
    tasks = s.configure_round(2, ["a", "b"])
    stray = ClientResult(
        "a",
        2,
        1,
        {
            **make_result(tasks[0], {"conv.weight": [0, 0], "fc.norm.weight": [0.0]}, 1).update,
            "fc.norm.running_mean": np.ones(1, dtype=np.float32),
        },
    )
    s.aggregate(2, [stray, make_result(tasks[1], {"conv.weight": [0, 0], "fc.norm.weight": [0.0]}, 1)], [])
    assert [f.client_id for f in s.history[-1].failures] == ["a"]


def test_pfednet_needs_float_personal_tensors() -> None:
    with pytest.raises(StrategyConfigError, match="floating"):
        PFedNet().initialize({"conv.weight": np.zeros(1), "fc.steps": np.zeros(1, dtype=np.int64)}, ["a"])
    with pytest.raises(StrategyConfigError, match="no tensor is personal"):
        PFedNet().initialize({"conv.weight": np.zeros(1)}, ["a"])


def test_personal_parts_by_name() -> None:
    """head: the classifier; head_norm: and the normalisation affines; first_block / last_block: and the first
    / last conv block."""
    names = [
        "features.0.conv.weight", "features.0.norm.weight", "features.0.norm.bias",
        "features.2.conv.weight", "features.2.norm.weight", "head.weight", "head.bias",
    ]  # fmt: skip
    assert [n for n in names if personal_part("head", names)(n)] == ["head.weight", "head.bias"]
    norms = ["features.0.norm.weight", "features.0.norm.bias", "features.2.norm.weight"]
    assert [n for n in names if is_head_or_norm_tensor(n)] == [*norms, "head.weight", "head.bias"]
    last = {n for n in names if personal_part("last_block", names)(n)}
    assert last - {n for n in names if is_head_or_norm_tensor(n)} == {"features.2.conv.weight"}
    deeper = [*names, "features.5.conv.weight"]  # the highest-numbered block is the last
    assert {n for n in deeper if last_block_personal(deeper)(n) and ".conv." in n} == {
        "features.5.conv.weight"
    }
    with pytest.raises(StrategyConfigError, match="fl_cnn"):
        last_block_personal(["fc.weight"])
    first = {n for n in deeper if personal_part("first_block", deeper)(n)}
    assert first - {n for n in names if is_head_or_norm_tensor(n)} == {"features.0.conv.weight"}
    with pytest.raises(StrategyConfigError, match="fl_cnn"):
        first_block_personal(["fc.weight"])
    with pytest.raises(StrategyConfigError, match="choose one of"):
        personal_part("everything", names)
    with pytest.raises(StrategyConfigError, match="choose one of"):
        PFedNet(personal="everything")


def test_pfednet_settings_arrive_as_round_scalars() -> None:
    """Over the wire every setting is a scalar: the part by name (told to each clinic), the keys as text."""
    names = {
        "features.0.conv.weight": np.ones(4, np.float32),
        "features.0.norm.weight": np.ones(2, np.float32),
    }
    model = {**names, "head.weight": np.zeros(2, np.float32)}
    s = PFedNet(personal="head_norm", graph_keys="label_counts, feature_mean", num_classes=3)
    s.initialize(model, ["a", "b"])
    assert s.graph_keys == ("label_counts", "feature_mean")
    (stats, _) = s.configure_round(1, ["a", "b"])
    assert stats.kind is UpdateKind.STATS and stats.config["stats_of"] == "training_set"
    specs = s.stats_specs()
    assert specs["label_counts"].shape == (3,) and specs["label_counts"].dtype == np.int64
    assert specs["feature_mean"].shape == (16,) and specs["feature_mean"].dtype == np.float32
    s.set_graph([("a", "b")])
    (task, _) = s.configure_round(2, ["a", "b"])
    assert task.config["personal"] == "head_norm"
    assert sorted(s.global_params) == ["features.0.conv.weight"]  # the norm affines are personal
    with pytest.raises(StrategyConfigError, match="feature_cov"):
        PFedNet(graph_keys="feature_cov").stats_specs()
    with pytest.raises(StrategyConfigError, match="by name"):
        PFedNet(personal=is_head_tensor, differential_gamma=1.0)
    with pytest.raises(StrategyConfigError, match="no sketch"):
        PFedNet(graph_keys=" , ")


def test_pfednet_publishes_the_shared_part_with_the_mean_personal_part() -> None:
    s = PFedNet(lam=0.0, eta=1.0, mean_gradient=False, edges=[("a", "b")])
    s.initialize(_pmodel(), ["a", "b"])
    ta, tb = s.configure_round(1, ["a", "b"])
    ra = make_result(ta, {"conv.weight": [0.0, 0.0], "fc.weight": [2.0, 0.0]}, 1)
    rb = make_result(tb, {"conv.weight": [0.0, 0.0], "fc.weight": [0.0, 4.0]}, 3)
    s.aggregate(1, [ra, rb], [])
    published = s.published_params()
    np.testing.assert_allclose(published["fc.weight"], [1.0, 2.0])  # unweighted: every clinic counts once
    np.testing.assert_allclose(published["conv.weight"], [1.0, 1.0])


def test_pfednet_restores_from_its_saved_state_with_a_named_part() -> None:
    """The hub carries a round's state to the next as tensors; a named part resolves against them too."""
    from hub.fl.registry import make_strategy
    from hub.fl.state import state_from_arrays
    from hub.rounds.strategy_state import restore_strategy, save_strategy

    model = {
        "features.0.conv.weight": np.ones(4, np.float32),
        "features.0.norm.weight": np.ones(2, np.float32),
        "head.weight": np.zeros(2, np.float32),
    }
    s = PFedNet(personal="head_norm", edges=[("a", "b")])
    s.initialize(model, ["a", "b"])
    again = PFedNet(personal="head_norm")
    restore_strategy(again, save_strategy(s), ["a", "b"])
    assert again.graph is not None and again.graph.edges == ((0, 1),)
    assert sorted(again.params_for("a")) == sorted(model)
    assert sorted(again.global_params) == ["features.0.conv.weight"]
    np.testing.assert_array_equal(again.published_params()["features.0.norm.weight"], [1.0, 1.0])
    with pytest.raises(StrategyConfigError, match=r"nodes \['c'\] were not among"):
        restore_strategy(PFedNet(personal="head_norm"), save_strategy(s), ["a", "c"])
    with pytest.raises(StrategyConfigError, match="not the 'head' part"):
        restore_strategy(PFedNet(personal="head"), save_strategy(s), ["a", "b"])
    # Inside robust aggregation the state is nested; it carries over all the same.
    wrapped = make_strategy("pfednet", personal="head_norm", edges=[("a", "b")], robust="median")
    wrapped.initialize(model, ["a", "b"])
    saved = save_strategy(wrapped)
    again_wrapped = make_strategy("pfednet", personal="head_norm", robust="median")
    restore_strategy(again_wrapped, saved, ["a", "b"])
    assert sorted(again_wrapped.global_params) == ["features.0.conv.weight"]
    with pytest.raises(StrategyConfigError, match=r"nodes \['c'\] were not among"):
        restore_strategy(make_strategy("pfednet", personal="head_norm", robust="median"), saved, ["c"])
    part = PFedNet.personal_in_state(state_from_arrays(saved), "b")
    assert sorted(part) == ["features.0.norm.weight", "head.weight"]
    with pytest.raises(StrategyConfigError, match="not among"):
        PFedNet.personal_in_state(state_from_arrays(saved), "z")
