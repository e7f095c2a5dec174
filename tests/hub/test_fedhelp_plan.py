"""FedHelp and HSL rounds at the hub: roles from `--large`, and the public set shipped to the clients that
train on it (FedHelp's small clients, every HSL client), never asked back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edge_node.protocol.tensors import decode_tensors
from hub.cli import app
from hub.fl.errors import StrategyConfigError
from hub.models.registry import create_model
from hub.rounds.plan import PUBLIC_PREFIX, build_plan
from hub.training.learners import to_params

pytestmark = pytest.mark.hub


def _start() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return to_params(create_model("fedhelp_small"))


def test_roles_and_the_public_set_reach_the_right_tasks() -> None:
    public = {
        PUBLIC_PREFIX + "x": np.zeros((6, 1, 28, 28), np.float32),
        PUBLIC_PREFIX + "soft_labels": np.full((6, 2), 0.5, np.float32),
    }
    plan = build_plan("fedhelp", {"large_clients": "n-a"}, {**_start(), **public}, ["n-a", "n-b"])
    tasks = {t.node_id: t for t in plan.tasks(1, ["n-a", "n-b"])}
    assert tasks["n-a"].config["role"] == "large" and tasks["n-b"].config["role"] == "small"
    assert not any(k.startswith(PUBLIC_PREFIX) for k in tasks["n-a"].params)
    assert PUBLIC_PREFIX + "x" in tasks["n-b"].params
    for task in tasks.values():  # what comes back: the small model without its public head
        assert not any(k.startswith((PUBLIC_PREFIX, "public_head")) for k in task.expected)
    assert "public/x" not in (plan.state() or {})  # the next round does not ship it again


@pytest.mark.parametrize(
    ("public", "reason"),
    [
        ({PUBLIC_PREFIX + "x": np.zeros((2, 1, 28, 28), np.float32)}, "soft_labels and/or"),
        (
            {
                PUBLIC_PREFIX + "x": np.zeros((2, 1, 28, 28), np.float32),
                PUBLIC_PREFIX + "soft_labels": np.full((2, 2), 0.7, np.float32),
            },
            "class probabilities",
        ),
    ],
)
def test_a_bad_public_set_is_refused_with_the_reason(public: dict[str, np.ndarray], reason: str) -> None:
    with pytest.raises(StrategyConfigError, match=reason):
        build_plan("fedhelp", {}, {**_start(), **public}, ["n-a"])


def test_hsl_ships_the_anchor_set_to_every_client() -> None:
    torch.manual_seed(0)
    start = to_params(create_model("hsl_mmoe"))
    public = {
        PUBLIC_PREFIX + "x": np.zeros((4, 1, 28, 28), np.float32),
        PUBLIC_PREFIX + "y": np.array([0, 1, 1, 0], np.float32),
    }
    plan = build_plan("hsl", {}, {**start, **public}, ["n-a", "n-b"])
    for task in plan.tasks(1, ["n-a", "n-b"]):
        assert PUBLIC_PREFIX + "y" in task.params
        assert not any(k.startswith(PUBLIC_PREFIX) for k in task.expected)


def test_large_clients_must_take_part() -> None:
    with pytest.raises(StrategyConfigError, match="not among the clients"):
        build_plan("fedhelp", {"large_clients": "n-z"}, _start(), ["n-a"])


def test_the_public_set_command_writes_what_a_round_ships(tmp_path: Path) -> None:
    out = tmp_path / "public.npz"
    args = ["data", "public", "--out", str(out), "--size", "48", "--epochs", "1", "--format", "json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == 48
    arrays = decode_tensors(out.read_bytes())
    assert arrays["x"].shape == (48, 1, 28, 28) and arrays["soft_labels"].shape == (48, 2)
    public = {PUBLIC_PREFIX + k: v for k, v in arrays.items()}
    plan = build_plan("fedhelp", {}, {**_start(), **public}, ["n-a"])
    (task,) = plan.tasks(1, ["n-a"])
    np.testing.assert_array_equal(task.params[PUBLIC_PREFIX + "soft_labels"], arrays["soft_labels"])
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "already exists" in again.output
