"""Where the node's time per single-image study goes, stage by stage, in one process (no network, no DB).

For ``--studies`` PneumoniaMNIST test images wrapped as one-image CR studies (``fedclinic-hub data
dicomize``), with the test bundle on onnxruntime CPU (one thread): read + preprocess, the model (one study
at a time, and all studies in batches of 8 as the worker runs a backlog), the SR built by highdicom and by
the per-model template, and the SR written durably (file and directory fsync). Medians in milliseconds.

    OMP_NUM_THREADS=1 FEDCLINIC_TEST_BUNDLE=build/test-bundle .venv/bin/python bench/study_stages.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

T = TypeVar("T")
P = ParamSpec("P")


def _timed(samples: list[float], fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)``, its milliseconds appended to ``samples``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    samples.append(1000 * (time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from edge_node.analysis.analyzer import PreparedStudy, finish_study, prepare_study, score_studies
    from edge_node.analysis.report_sr import build_sr
    from edge_node.analysis.report_template import fast_sr
    from edge_node.analysis.result_warmup import warm_up_results
    from edge_node.inference.loaded_model import load_model
    from edge_node.protocol.bundle import verify_bundle
    from edge_node.protocol.signing import load_public_keys
    from harness.demo.clinic import find_bundle
    from hub.data.dicomize import dicomize_images
    from hub.data.medmnist import load_medmnist
    from tests.edge_node.conftest import instance_rows

    bundle = find_bundle()
    if bundle is None:
        parser.error("no signed test bundle: run `make test-bundle` or set FEDCLINIC_TEST_BUNDLE")
    work = Path(tempfile.mkdtemp(prefix="study-stages-"))
    data_env = os.environ.get("FEDCLINIC_DATA")
    data_root = Path(data_env) if data_env else REPO_ROOT.parent / "shared" / "data"
    images = load_medmnist("pneumoniamnist", "test", root=data_root).images
    studies = dicomize_images(
        images, work / "cr", dataset="pneumoniamnist", split="test", indices=range(args.studies)
    )
    verified = verify_bundle(bundle.bundle, load_public_keys(bundle.public_key))
    model = load_model(verified, ["CPUExecutionProvider"], 1)
    warm_up_results(model.manifest)

    names = ("prepare", "model", "sr_highdicom", "sr_template", "write")
    stages: dict[str, list[float]] = {k: [] for k in names}
    prepared: list[PreparedStudy] = []
    for n, study in enumerate(studies):
        rows = instance_rows([study.path])
        p = _timed(stages["prepare"], prepare_study, rows, model, secondary_capture=False)
        assert isinstance(p, PreparedStudy)
        prepared.append(p)
        (probs,) = _timed(stages["model"], score_studies, [p], model)
        assert not isinstance(probs, Exception)
        sources = [a.dataset for a in p.analysed]
        out = work / f"run-{n}"
        out.mkdir()
        outcome = finish_study(p, probs, model, out, secondary_capture=False)
        findings = outcome.findings
        _timed(stages["sr_highdicom"], build_sr, sources, findings, model.manifest)
        _timed(stages["sr_template"], fast_sr, sources, findings, model.manifest)
        out2 = work / f"again-{n}"
        out2.mkdir()
        _timed(stages["write"], finish_study, p, probs, model, out2, secondary_capture=False)
    batched: list[float] = []
    for i in range(0, len(prepared), 8):
        chunk = prepared[i : i + 8]
        _timed(batched, score_studies, chunk, model)
    medians = {k: round(statistics.median(v), 2) for k, v in stages.items()}
    # finish_study builds (template) and writes: the write alone is the difference.
    medians["write"] = round(medians["write"] - medians["sr_template"], 2)
    medians["model_batched_8_per_study"] = round(statistics.median(batched) / 8, 3)
    result = {"studies": len(studies), "median_ms": medians, "load_average_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
