"""Client similarity graph for pFedNet (docs/algorithms.md §3.3): kNN over client sketches, incidence matrix.

A sketch is a client's ``stats`` update: named arrays such as ``label_counts`` (C,), ``feature_mean`` (D,)
or a mean image, ``feature_cov`` (D, D). The distance between two clients is the sum over the chosen keys
of the L1 distance between their arrays (label counts are first turned into proportions), optionally
weighted per key. Note that the sketches leave the clients: count them in the privacy analysis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_node.protocol.sketch import FEATURE_MEAN, LABEL_COUNTS
from hub.fl.errors import AggregationError, StrategyConfigError

__all__ = [
    "FEATURE_COV",
    "FEATURE_MEAN",
    "LABEL_COUNTS",
    "SimilarityGraph",
    "incidence_matrix",
    "knn_edges",
    "label_proportions",
    "similarity_graph",
    "sketch_distances",
]

#: Tensor names of a ``stats`` update (the first two are a node's sketch, ``edge_node.protocol.sketch``).
FEATURE_COV = "feature_cov"


def label_proportions(counts: np.ndarray) -> np.ndarray:
    """Counts -> proportions summing to 1 (a client with no labels gets all zeros)."""
    c = np.asarray(counts, dtype=np.float64).ravel()
    total = float(c.sum())
    return c / total if total > 0 else np.zeros_like(c)


def _component(sketch: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in sketch:
        raise AggregationError(f"sketch lacks {key!r}; it has {sorted(sketch)}")
    if key == LABEL_COUNTS:
        return label_proportions(sketch[key])
    return np.asarray(sketch[key], dtype=np.float64).ravel()


def sketch_distances(
    sketches: Sequence[Mapping[str, np.ndarray]],
    keys: Sequence[str] = (LABEL_COUNTS,),
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """(N, N) matrix of Σ_key weight_key · ‖a_key − b_key‖₁ between the sketches."""
    n = len(sketches)
    dist = np.zeros((n, n))
    for key in keys:
        parts = [_component(s, key) for s in sketches]
        if len({p.shape for p in parts}) > 1:
            raise AggregationError(f"sketch component {key!r} has different sizes across clients")
        stacked = np.stack(parts) if parts else np.zeros((0, 0))  # (N, D)
        l1 = np.abs(stacked[:, None, :] - stacked[None, :, :]).sum(axis=-1)  # (N, N)
        dist += (1.0 if weights is None else float(weights.get(key, 1.0))) * l1
    return dist


def knn_edges(distances: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Undirected edges (i < j) joining each node to its k nearest others (ties broken by index)."""
    n = distances.shape[0]
    if distances.shape != (n, n):
        raise AggregationError(f"distance matrix must be square, got {distances.shape}")
    if k < 1:
        raise StrategyConfigError(f"k must be >= 1, got {k}")
    edges: set[tuple[int, int]] = set()
    for i in range(n):
        others = sorted((float(distances[i, j]), j) for j in range(n) if j != i)
        for _, j in others[:k]:
            edges.add((min(i, j), max(i, j)))
    return sorted(edges)


def incidence_matrix(edges: Sequence[tuple[int, int]], n: int) -> np.ndarray:
    """Q (n, |E|): the column of edge (i, j) is +1 at row i and −1 at row j, so (ZQ)_e = z_i − z_j."""
    q = np.zeros((n, len(edges)))
    for e, (i, j) in enumerate(edges):
        if i == j or not (0 <= i < n and 0 <= j < n):
            raise StrategyConfigError(f"edge {(i, j)} is not between two different nodes of 0..{n - 1}")
        q[i, e] = 1.0
        q[j, e] = -1.0
    return q


@dataclass(frozen=True)
class SimilarityGraph:
    """Edges between client indices, the incidence matrix, and the distances they came from (if known)."""

    edges: tuple[tuple[int, int], ...]
    incidence: np.ndarray  # (N, |E|)
    distances: np.ndarray | None = None  # (N, N); NaN for a client without a sketch


def similarity_graph(
    sketches: Sequence[Mapping[str, np.ndarray]],
    k: int = 3,
    keys: Sequence[str] = (LABEL_COUNTS,),
    weights: Mapping[str, float] | None = None,
) -> SimilarityGraph:
    """The kNN similarity graph over these sketches (k is capped at N − 1)."""
    dist = sketch_distances(sketches, keys, weights)
    n = len(sketches)
    edges = knn_edges(dist, min(k, n - 1)) if n > 1 else []
    return SimilarityGraph(tuple(edges), incidence_matrix(edges, n), dist)
