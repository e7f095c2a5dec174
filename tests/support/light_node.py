"""One enrolled node's learning round, run in an edge-only interpreter (the e2e tests block torch for it).

    python -m tests.support.light_node EDGE_TOML JOB_JSON OUT_JSON

JOB_JSON: ``held_out``, a list of {path, label, sop, study}, and ``timeout`` seconds. The node opens its
own database, model slot, label store and uplink exactly as ``fedclinic-edge serve`` does, answers the
hub's open head_delta task from the labels in its store (``fedclinic-edge labels import``) over HTTPS,
sends the update, then scores the held-out instances with the model it now serves (backbone + shared head
+ its personal head) and without the personal head. OUT_JSON gets the scores and labels, and a file beside
it the held-out embeddings, for the hub-side check.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from edge_node.inference.model_slot import ModelSlot
from edge_node.learning.examples import training_set_from
from edge_node.learning.training_set import LabeledInstance
from edge_node.settings import load_settings
from edge_node.state.node_state import NodeState
from edge_node.uplink.sync import sync_loop_for


def _instances(rows: list[dict[str, str]]) -> list[LabeledInstance]:
    return [LabeledInstance(r["sop"], r["study"], Path(r["path"]), r["label"], "import") for r in rows]


def main(config: Path, job_path: Path, out_path: Path) -> int:
    if "torch" in sys.modules:
        raise SystemExit("this script proves the edge-only path: torch must not be loaded")
    job = json.loads(job_path.read_text())
    settings = load_settings(config)
    state = NodeState.open(settings.db_path)
    slot = ModelSlot.from_settings(state.models, settings)
    loop = sync_loop_for(settings, slot, state)
    if loop is None or loop.learners is None:
        raise SystemExit("the node is not enrolled")
    deadline = time.time() + float(job["timeout"])
    answered = 0
    while answered == 0 and time.time() < deadline:
        answered = loop.pull_tasks(wait_seconds=2.0)
        if loop.skipped:  # a refusal or skip is the answer this run reports
            break
    sent = loop.flush_outbox()
    model = slot.current()
    assert model is not None
    held = training_set_from(
        _instances(job["held_out"]), model.preprocessing, model.task, model_id=model.model_id
    ).training_set
    served = model.probabilities(held.x)[:, model.task.positive_class]
    personal, model.personal = model.personal, None
    initial = model.probabilities(held.x)[:, model.task.positive_class]
    model.personal = personal
    np.save(out_path.with_suffix(".embedding.npy"), model.embed(held.x))
    out = {
        "answered": answered,
        "sent": sent,
        "skipped": loop.skipped,
        "personal": personal is not None,
        "labels": held.y.tolist(),
        "served": served.tolist(),
        "initial": initial.tolist(),
        "torch_loaded": "torch" in sys.modules,
    }
    out_path.write_text(json.dumps(out))
    loop.outbox.close()
    state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
