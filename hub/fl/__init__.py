"""Federated strategies as pure objects (numpy only): configure a round, aggregate results and failures.

Usage by a runner (simulation or round controller); every update is ``local_after - params_sent``::

    from hub.fl import ClientFailure, ClientResult, UpdateKind, make_strategy

    strategy = make_strategy("fedavg")         # "fedprox" (mu=0.01), "fedbn", "hsl", "fedhelp", "pfednet";
                                               # robust="median" or dp_clip_norm=1.0, dp_noise_multiplier=1.0
    strategy.initialize(initial_state, clients=["c0", "c1", "c2"])  # initial_state: dict[str, np.ndarray]
    for rnd in range(1, rounds + 1):
        results, failures = [], []
        for task in strategy.configure_round(rnd, ["c0", "c1", "c2"]):
            # task.params: tensors to load into the client's model (only those strategy.shares(name), plus
            # pFedNet's personal part of this client); every other tensor keeps the client's own value
            # (FedBN's BN tensors, FedHelp's public head). task.config: e.g. {"mu": 0.01}, {"role": "large"}.
            try:
                if task.kind is UpdateKind.STATS:  # pFedNet's first round when no graph was given
                    update, n = client_stats(task.client_id, task.config["stats_keys"]), n_examples
                    metrics = {}
                else:
                    after, n, metrics = train_locally(task.client_id, task.params, task.config)
                    update = {name: after[name] - task.params[name] for name in task.params}  # same dtype
            except Exception as exc:
                failures.append(ClientFailure(task.client_id, rnd, f"error: {exc}"))
                continue
            results.append(ClientResult(task.client_id, rnd, n, update, metrics))
        new_global = strategy.aggregate(rnd, results, failures)  # None: kept the previous model
        record = strategy.history[-1]   # accepted ids, failures with reasons, mean client metrics
        model_c0 = {**local_state["c0"], **strategy.params_for("c0")}  # what client c0 evaluates

Bad updates (NaN/Inf, wrong names, shape or dtype, norm above ``max_norm``) are not exceptions: they end
up in ``record.failures`` with a reason. FedHelp: ``make_strategy("fedhelp",
large_clients=[...])`` (see ``roles_by_size``). pFedNet: ``edges=[("c0", "c1"), ...]`` or a stats round.

A round controller persists a strategy between rounds with ``state_to_bytes(strategy.state_dict())`` and
resumes it with ``strategy.load_state_dict(state_from_bytes(raw))`` on a strategy built with the same
settings. Wrappers (``Robust``, ``DifferentialPrivacy``) wrap any strategy whose ``capabilities`` include
``Capability.REPLACEABLE_MEAN``; ``DifferentialPrivacy`` refuses one with ``Capability.PERSONAL_STATE``.

Real nodes take the same path through ``hub.fl.codec``: ``encode_result(result)`` gives an
``UpdateEnvelope`` plus npz bytes (``upload_bytes(envelope)`` is what the upload cost; ``UploadLedger``
sums it per client and round); ``decode_or_failure(envelope, payload)`` checks size and sha256 at the hub
and gives back the ``ClientResult`` or a ``ClientFailure``. Optional uplink compression: wrap the client's
update with ``ErrorFeedback(TopKCompressor(0.01))`` before encoding, and ``decompress_result(result,
compressor, spec_of(task.params))`` at the hub before ``aggregate``.
"""

from edge_node.protocol.updates import UpdateKind
from hub.fl.averaging import DeltaAveraging
from hub.fl.codec import UploadLedger, decode_or_failure, decode_result, encode_result, upload_bytes
from hub.fl.compress import (
    Compressor,
    ErrorFeedback,
    Fp16Compressor,
    Int8Compressor,
    TopKCompressor,
    decompress_result,
    wire_bytes,
)
from hub.fl.errors import AggregationError, FlError, PayloadError, StrategyConfigError
from hub.fl.fedavg import FedAvg
from hub.fl.fedbn import FedBN, is_norm_tensor
from hub.fl.fedhelp import FedHelp, roles_by_size
from hub.fl.fedprox import FedProx
from hub.fl.graph import SimilarityGraph, similarity_graph
from hub.fl.hsl import HSL
from hub.fl.pfednet import PFedNet, is_head_tensor
from hub.fl.privacy import DifferentialPrivacy
from hub.fl.registry import available_strategies, make_strategy
from hub.fl.robust import Robust
from hub.fl.state import state_from_bytes, state_to_bytes
from hub.fl.strategy import (
    Capability,
    ClientFailure,
    ClientResult,
    ClientTask,
    Config,
    Params,
    RoundRecord,
    StateDict,
    Strategy,
)
from hub.fl.validation import TensorSpec, spec_of

__all__ = [
    "HSL",
    "AggregationError",
    "Capability",
    "ClientFailure",
    "ClientResult",
    "ClientTask",
    "Compressor",
    "Config",
    "DeltaAveraging",
    "DifferentialPrivacy",
    "ErrorFeedback",
    "FedAvg",
    "FedBN",
    "FedHelp",
    "FedProx",
    "FlError",
    "Fp16Compressor",
    "Int8Compressor",
    "PFedNet",
    "Params",
    "PayloadError",
    "Robust",
    "RoundRecord",
    "SimilarityGraph",
    "StateDict",
    "Strategy",
    "StrategyConfigError",
    "TensorSpec",
    "TopKCompressor",
    "UpdateKind",
    "UploadLedger",
    "available_strategies",
    "decode_or_failure",
    "decode_result",
    "decompress_result",
    "encode_result",
    "is_head_tensor",
    "is_norm_tensor",
    "make_strategy",
    "roles_by_size",
    "similarity_graph",
    "spec_of",
    "state_from_bytes",
    "state_to_bytes",
    "upload_bytes",
    "wire_bytes",
]
