"""The simulation runner: in-process clinics driven through the same Strategy and update codec as real nodes.

Per round: ``strategy.configure_round`` → each clinic's learner fits its task → the result is encoded
exactly as a node uploads it (``hub.fl.codec.encode_result``: envelope + npz bytes, counted per clinic) →
decoded and checked at the "hub" (``decode_or_failure``) → ``strategy.aggregate(results, failures)``.
A learner that raises becomes a ``ClientFailure`` with the reason and the round goes on with the others.

With a ``compressor``, training-round updates take the node's compression path too: each clinic wraps its
update in its own ``ErrorFeedback(compressor)`` before encoding (so the bytes counted are the compressed
ones) and the hub decompresses it (``decompress_result``) before ``aggregate``. Stats rounds are sent as
they are and their bytes are reported apart.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_node.protocol.compression import SEP, layout_of
from edge_node.protocol.updates import UpdateKind
from hub.fl.codec import UploadLedger, decode_or_failure, encode_result
from hub.fl.compress import Compressor, ErrorFeedback, decompress_result
from hub.fl.errors import PayloadError
from hub.fl.state import state_from_bytes, state_to_bytes
from hub.fl.strategy import ClientFailure, ClientResult, ClientTask, Params, StateDict, Strategy

log = logging.getLogger(__name__)


class ClientLearner(Protocol):
    """A simulated clinic: answers a task, and can save/restore its private state for resuming."""

    client_id: str

    def fit(self, task: ClientTask) -> ClientResult: ...

    def state(self) -> Params: ...

    def restore(self, state: Mapping[str, np.ndarray]) -> None: ...


@dataclass
class RoundLog:
    """What one simulated round cost and who failed."""

    rnd: int
    bytes_up: dict[str, int]
    failures: list[str]
    seconds: float
    applied: bool
    #: What the round asked for ("stats" rounds carry sketches, not model updates).
    kind: str = UpdateKind.WEIGHTS_DELTA.value


#: Called with a round's number, its kind and the answers the strategy is about to aggregate.
OnResults = Callable[[int, str, Sequence[ClientResult]], None]


@dataclass
class FederationRun:
    """The outcome of a simulated federation (round logs; the learners hold the trained models)."""

    rounds: list[RoundLog] = field(default_factory=list)

    def bytes_per_client_round(self) -> dict[str, float]:
        """Mean uploaded bytes per clinic per training round (rounds in which the clinic uploaded)."""
        return self._mean_bytes(lambda kind: kind != UpdateKind.STATS.value)

    def stats_bytes_per_client_round(self) -> dict[str, float]:
        """The same for statistics rounds alone (pFedNet's sketch round), reported apart."""
        return self._mean_bytes(lambda kind: kind == UpdateKind.STATS.value)

    def _mean_bytes(self, counted: Callable[[str], bool]) -> dict[str, float]:
        per: dict[str, list[int]] = {}
        for r in self.rounds:
            if counted(r.kind):
                for cid, b in r.bytes_up.items():
                    per.setdefault(cid, []).append(b)
        return {cid: float(np.mean(v)) for cid, v in per.items()}

    def to_json(self) -> list[dict[str, object]]:
        return [r.__dict__ for r in self.rounds]


class RoundCheckpoint:
    """Per-round checkpoint of a simulated federation: strategy state, every learner's state, the run log.

    Three files beside ``path``: the learners' tensors (``path``, npz), the strategy's ``state_dict``
    (``*.strategy.npz``, see ``hub.fl.state``) and the round log (``*.json``), each written to a temporary
    file and renamed; the JSON goes last, so ``load`` sees a complete checkpoint or none (None).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def _strategy_path(self) -> Path:
        return self.path.with_suffix(".strategy.npz")

    @property
    def _meta_path(self) -> Path:
        return self.path.with_suffix(".json")

    def save(
        self, rnd: int, strategy: Strategy, learners: Mapping[str, ClientLearner], run: FederationRun
    ) -> None:
        arrays: dict[str, np.ndarray] = {}
        for cid, learner in learners.items():
            arrays.update({f"client/{cid}/{k}": v for k, v in learner.state().items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(self.path)
        strategy_tmp = self._strategy_path.with_suffix(".tmp")
        strategy_tmp.write_bytes(state_to_bytes(strategy.state_dict()))
        strategy_tmp.replace(self._strategy_path)
        meta_tmp = self._meta_path.with_suffix(".tmp")
        meta_tmp.write_text(json.dumps({"round": rnd, "rounds": run.to_json()}))
        meta_tmp.replace(self._meta_path)

    def load(self) -> tuple[int, StateDict, dict[str, Params], FederationRun] | None:
        if not (self.path.is_file() and self._strategy_path.is_file() and self._meta_path.is_file()):
            return None
        info = json.loads(self._meta_path.read_text())
        clients: dict[str, Params] = {}
        with np.load(self.path, allow_pickle=False) as npz:
            for key in npz.files:
                _, cid, name = key.split("/", 2)
                clients.setdefault(cid, {})[name] = npz[key]
        strategy_state = state_from_bytes(self._strategy_path.read_bytes())
        run = FederationRun([RoundLog(**r) for r in info["rounds"]])
        return int(info["round"]), strategy_state, clients, run

    def clear(self) -> None:
        for path in (self.path, self._strategy_path, self._meta_path):
            path.unlink(missing_ok=True)


def run_federation(
    strategy: Strategy,
    learners: Mapping[str, ClientLearner],
    rounds: int,
    *,
    checkpoint: RoundCheckpoint | None = None,
    on_round: Callable[[int], None] | None = None,
    compressor: Compressor | None = None,
    on_results: OnResults | None = None,
) -> FederationRun:
    """Run ``rounds`` rounds (1-based) of ``strategy``; resumes from ``checkpoint`` if present.

    ``on_results`` sees each round's answers as the hub would aggregate them (decoded, decompressed), with
    the round's kind, before the strategy aggregates them.

    The strategy must already be ``initialize``-d with the starting model. A resumed run starts the
    clinics' compression residuals afresh (they are not part of the checkpoint).
    """
    clients = list(learners)
    feedback: dict[str, ErrorFeedback] = {}
    run = FederationRun()
    start = 1
    if checkpoint is not None and (saved := checkpoint.load()) is not None:
        done, strategy_state, client_states, run = saved
        strategy.load_state_dict(strategy_state)
        for cid, state in client_states.items():
            learners[cid].restore(state)
        start = done + 1
        log.info("resumed %s after round %d", strategy.name, done)
        for rnd in range(1, start):
            if on_round is not None:
                on_round(rnd)
    for rnd in range(start, rounds + 1):
        t0 = time.perf_counter()
        ledger = UploadLedger()
        results: list[ClientResult] = []
        failures: list[ClientFailure] = []
        kinds: set[str] = set()
        for task in strategy.configure_round(rnd, clients):
            kinds.add(task.kind.value)
            compress = compressor is not None and task.kind is not UpdateKind.STATS
            try:
                result = learners[task.client_id].fit(task)
                if compress and compressor is not None:
                    ef = feedback.setdefault(task.client_id, ErrorFeedback(compressor))
                    result = replace(result, update=ef.compress(result.update))
                envelope, payload = encode_result(result, task.kind)
            except Exception as exc:  # a broken clinic must not stop the round
                log.warning("round %d: clinic %s failed: %s", rnd, task.client_id, exc)
                failures.append(ClientFailure(task.client_id, rnd, f"{type(exc).__name__}: {exc}"))
                continue
            ledger.record(envelope)
            decoded = decode_or_failure(envelope, payload)
            if isinstance(decoded, ClientResult) and compress and compressor is not None:
                sent = {key.rsplit(SEP, 1)[0] for key in decoded.update}
                layout = layout_of({n: a for n, a in task.params.items() if n in sent})
                try:
                    decoded = decompress_result(decoded, compressor, layout)
                except PayloadError as exc:
                    decoded = ClientFailure(task.client_id, rnd, str(exc))
            if isinstance(decoded, ClientResult):
                results.append(decoded)
            else:
                failures.append(decoded)
        kind = next(iter(kinds)) if len(kinds) == 1 else "mixed"
        if on_results is not None:
            on_results(rnd, kind, results)
        new = strategy.aggregate(rnd, results, failures)
        bytes_up = {cid: b for (cid, _), b in ledger.per_client_round().items()}
        run.rounds.append(
            RoundLog(
                rnd,
                bytes_up,
                [f"{f.client_id}: {f.reason}" for f in failures],
                time.perf_counter() - t0,
                new is not None,
                kind,
            )
        )
        if checkpoint is not None:
            checkpoint.save(rnd, strategy, learners, run)
        if on_round is not None:
            on_round(rnd)
    return run
