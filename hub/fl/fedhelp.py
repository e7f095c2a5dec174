"""FedHelp (docs/algorithms.md §2): the server averages every uploaded small model (surrogates, proxies).

Large clients (the top-n by data volume) train a private large model plus a small *proxy* with asymmetric
dual distillation; small clients train the small *surrogate* with one-time foundation-model soft labels on
public data. Only the small model travels. The server's update is the unweighted mean of the uploaded
small-model deltas over every tensor except the clients' private heads (§2.5), which never leave a client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edge_node.protocol.updates import UpdateKind
from hub.fl.averaging import DeltaAveraging
from hub.fl.errors import StrategyConfigError
from hub.fl.strategy import Config, Params

__all__ = ["FedHelp", "roles_by_size"]

LARGE = "large"
SMALL = "small"


def roles_by_size(sizes: Mapping[str, int], top_n: int) -> dict[str, str]:
    """The ``top_n`` clients with the most examples are "large", the rest "small" (ties: by client id)."""
    if not 0 <= top_n <= len(sizes):
        raise StrategyConfigError(f"top_n must be between 0 and {len(sizes)}, got {top_n}")
    ordered = sorted(sizes, key=lambda cid: (-sizes[cid], cid))
    return {cid: LARGE if i < top_n else SMALL for i, cid in enumerate(ordered)}


class FedHelp(DeltaAveraging):
    """Unweighted mean of small-model deltas, private heads excluded; tasks tell each client its role.

    ``private_heads``: module-name prefixes of heads that stay on each client and are never sent or
    averaged; default the small client's auxiliary public-data head (``public_head``, §2.3). Add the class
    head's prefix to keep it personal too. ``large_clients``: ids of the large clients (see
    ``roles_by_size``). Task config: ``role`` ("large"/"small"), ``kd_temperature`` (T, §2.4),
    ``rank_weight`` (0.2), ``rank_k`` (top-k of the proxy's ranking), ``rank_margin`` (m of the hinge).
    """

    name = "fedhelp"
    update_kind = UpdateKind.WEIGHTS_DELTA

    def __init__(
        self,
        *,
        large_clients: Sequence[str] = (),
        private_heads: Sequence[str] = ("public_head",),
        kd_temperature: float = 1.0,
        rank_weight: float = 0.2,
        rank_k: int = 1,
        rank_margin: float = 0.0,
        server_lr: float = 1.0,
        max_norm: float | None = None,
        min_results: int = 1,
        client_config: Config | None = None,
    ) -> None:
        if kd_temperature <= 0 or rank_weight < 0 or rank_k < 1:
            raise StrategyConfigError(
                "fedhelp: need kd_temperature > 0, rank_weight >= 0 and rank_k >= 1, got "
                f"{kd_temperature}, {rank_weight}, {rank_k}"
            )
        prefixes = tuple(p.rstrip(".") for p in private_heads)
        super().__init__(
            weighted=False,
            server_lr=server_lr,
            max_norm=max_norm,
            min_results=min_results,
            local=lambda name: any(name == p or name.startswith(p + ".") for p in prefixes),
            client_config=client_config,
        )
        self.private_heads = prefixes
        self.large_clients = frozenset(large_clients)
        self.kd_temperature = float(kd_temperature)
        self.rank_weight = float(rank_weight)
        self.rank_k = int(rank_k)
        self.rank_margin = float(rank_margin)

    def initialize(self, params: Params, clients: Sequence[str]) -> None:
        unknown = sorted(self.large_clients - set(clients))
        if unknown:
            raise StrategyConfigError(f"fedhelp: large clients {unknown} are not among the clients")
        super().initialize(params, clients)

    def role(self, client_id: str) -> str:
        """ "large" (trains a private large model + the proxy) or "small" (trains the surrogate)."""
        return LARGE if client_id in self.large_clients else SMALL

    def task_config(self, client_id: str) -> Config:
        return {
            **self.client_config,
            "role": self.role(client_id),
            "kd_temperature": self.kd_temperature,
            "rank_weight": self.rank_weight,
            "rank_k": self.rank_k,
            "rank_margin": self.rank_margin,
        }
