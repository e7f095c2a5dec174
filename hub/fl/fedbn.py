"""FedBN (Li et al. 2021): FedAvg over everything except normalisation layers, which stay on each client."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from edge_node.protocol.updates import UpdateKind
from hub.fl.averaging import DeltaAveraging
from hub.fl.strategy import Config

__all__ = ["KEPT_AT_NODES", "FedBN", "is_norm_buffer", "is_norm_tensor", "kept_at_nodes"]

# A dotted name component that names a normalisation module or a BN buffer: "bn1", "bn", "norm",
# "layernorm", "norm2", "batchnorm", "downsample_bn"... plus the BN buffers themselves.
_NORM_COMPONENT = re.compile(r"(^|_)bn\d*$|norm\d*$", re.IGNORECASE)
_BN_BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def is_norm_buffer(name: str) -> bool:
    """A BatchNorm buffer (``running_mean``, ``running_var``, ``num_batches_tracked``): statistics of the
    images a model saw, not parameters any optimiser moves."""
    return name.rsplit(".", 1)[-1] in _BN_BUFFERS


def is_norm_tensor(name: str) -> bool:
    """Default FedBN predicate: a tensor of a normalisation module, by common torch naming conventions.

    True for ``layer1.0.bn1.weight``, ``features.norm5.bias``, ``encoder.layernorm.weight`` and any
    ``running_mean`` / ``running_var`` / ``num_batches_tracked``; False for ``conv1.weight``, ``fc.bias``.
    Modules named differently (e.g. torchvision's ``downsample.1``) need a custom predicate.
    """
    parts = name.split(".")
    if is_norm_buffer(name):
        return True
    return any(_NORM_COMPONENT.search(part) for part in parts[:-1])


class FedBN(DeltaAveraging):
    """Sample-weighted FedAvg of the tensors for which ``is_local`` is False.

    Normalisation tensors are never in a task, never expected in an update and never in the aggregate:
    each client keeps its own. ``global_params`` / ``params_for`` hold only the shared tensors; the runner
    completes a client's model with that client's own normalisation tensors (starting from the initial
    model's values).
    """

    name = "fedbn"
    update_kind = UpdateKind.WEIGHTS_DELTA

    def __init__(
        self,
        *,
        is_local: Callable[[str], bool] = is_norm_tensor,
        server_lr: float = 1.0,
        max_norm: float | None = None,
        min_results: int = 1,
        client_config: Config | None = None,
    ) -> None:
        super().__init__(
            weighted=True,
            server_lr=server_lr,
            max_norm=max_norm,
            min_results=min_results,
            local=is_local,
            client_config=client_config,
        )


#: The tensors a strategy may leave at each node, by name (a setting that travels in a round's config):
#: every normalisation tensor (FedBN's default), or BatchNorm's running statistics alone.
KEPT_AT_NODES: dict[str, Callable[[str], bool]] = {
    "norm_tensors": is_norm_tensor,
    "norm_buffers": is_norm_buffer,
}


def kept_at_nodes(strategy: str, config: Mapping[str, Any]) -> str | None:
    """Which tensors (a name of ``KEPT_AT_NODES``) rounds of ``strategy`` with these settings leave at the
    nodes, never in an aggregate; None for a strategy that keeps nothing there."""
    if strategy == FedBN.name:
        return "norm_tensors"
    local = config.get("local")
    return local if strategy == "pfednet" and isinstance(local, str) and local in KEPT_AT_NODES else None
