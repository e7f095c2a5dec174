"""ServerApp: FedAvg over every node, rounds timed from configuring the round to its aggregate."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from roundbench.student import student_arrays

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round starts (configure) and ends (aggregate) and how many replied."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.rounds: list[dict[str, float]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.rounds.append({"round": server_round, "start": time.time()})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        entry = self.rounds[-1]
        entry["end"] = time.time()
        entry["replies"] = sum(1 for r in replies if r.has_content())
        return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = int(context.run_config["nodes"])
    rounds = int(context.run_config["num-server-rounds"])
    strategy = TimedFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes
    )
    strategy.start(grid=grid, initial_arrays=ArrayRecord(student_arrays()), num_rounds=rounds)
    Path(str(context.run_config["out"])).write_text(json.dumps(strategy.rounds))
