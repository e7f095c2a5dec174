"""A round's ``client.*`` settings reach every node's task; the agreement term across augmented views
(``client.consistency``), the random convolutions (``client.randconv``) and SAM's radius (``client.sam_rho``)
are refused at the hub when the nodes could not use them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hub.fl.errors import StrategyConfigError
from hub.models.registry import create_model
from hub.rounds.plan import build_plan
from hub.training.learners import LocalConfig, to_params

pytestmark = pytest.mark.hub


def _start() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return to_params(create_model("fl_cnn", norm="group"))


def test_the_weight_reaches_every_task_and_the_node_learner_reads_it() -> None:
    config = {"client.augment": True, "client.consistency": 12.0}
    plan = build_plan("fedavg", config, _start(), ["n-a", "n-b"])
    tasks = plan.tasks(1, ["n-a", "n-b"])
    assert [t.config["consistency"] for t in tasks] == [12.0, 12.0]
    assert LocalConfig.from_task(tasks[0].config, LocalConfig()).consistency == 12.0


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"client.consistency": 12.0}, "add --config client.augment=true"),
        ({"client.consistency": 4, "client.augment": False}, "add --config client.augment=true"),
        ({"client.consistency": -1.0, "client.augment": True}, "a number from 0"),
        ({"client.consistency": "high", "client.augment": True}, "a number from 0"),
        ({"client.consistency": math.inf, "client.augment": True}, "a number from 0"),
    ],
)
def test_a_weight_the_nodes_could_not_use_is_refused(config: dict[str, object], reason: str) -> None:
    with pytest.raises(StrategyConfigError, match=reason):
        build_plan("fedavg", config, _start(), ["n-a"])


def test_weight_zero_needs_no_augmentation() -> None:
    plan = build_plan("fedavg", {"client.consistency": 0.0}, _start(), ["n-a"])
    assert plan.tasks(1, ["n-a"])[0].config["consistency"] == 0.0


def test_random_convolutions_reach_every_task_and_the_node_learner_reads_them() -> None:
    config = {"client.augment": True, "client.randconv": True, "client.consistency": 12.0}
    plan = build_plan("fedavg", config, _start(), ["n-a", "n-b"])
    tasks = plan.tasks(1, ["n-a", "n-b"])
    assert [t.config["randconv"] for t in tasks] == [True, True]
    cfg = LocalConfig.from_task(tasks[0].config, LocalConfig())
    assert cfg.randconv and cfg.augment and cfg.consistency == 12.0


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"client.randconv": True}, "add --config client.augment=true"),
        ({"client.randconv": True, "client.augment": False}, "add --config client.augment=true"),
        ({"client.randconv": 1, "client.augment": True}, "true or false"),
        ({"client.randconv": "yes", "client.augment": True}, "true or false"),
    ],
)
def test_random_convolutions_the_nodes_could_not_use_are_refused(
    config: dict[str, object], reason: str
) -> None:
    with pytest.raises(StrategyConfigError, match=reason):
        build_plan("fedavg", config, _start(), ["n-a"])


def test_sams_radius_reaches_every_task_and_the_node_learner_reads_it() -> None:
    plan = build_plan("fedavg", {"client.augment": True, "client.sam_rho": 0.05}, _start(), ["n-a", "n-b"])
    tasks = plan.tasks(1, ["n-a", "n-b"])
    assert [t.config["sam_rho"] for t in tasks] == [0.05, 0.05]
    assert LocalConfig.from_task(tasks[0].config, LocalConfig()).sam_rho == 0.05
    assert LocalConfig.from_task({}, LocalConfig()).sam_rho == 0.0  # plain steps unless a round asks


@pytest.mark.parametrize("rho", [-0.05, "wide", True, math.inf, math.nan])
def test_a_radius_the_nodes_could_not_use_is_refused(rho: object) -> None:
    with pytest.raises(StrategyConfigError, match=r"client\.sam_rho must be a number from 0"):
        build_plan("fedavg", {"client.sam_rho": rho}, _start(), ["n-a"])
