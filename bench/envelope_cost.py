"""What judging each image against the input envelope costs a node, beside scoring it alone.

The test bundle's fp32 model on ONNX Runtime (CPU, one thread) scores the same batch of PneumoniaMNIST test
images three ways through ``LoadedModel.scores``: with no envelope (the probabilities alone, the baseline),
with the embedding part only, and with both parts (what a node does with a bundle of this version). Each
way runs ``--repeats`` times in alternation, after a warm-up; the table gives the median time per image and
its ratio to the baseline of the same run.

    OMP_NUM_THREADS=1 FEDCLINIC_DATA=../shared/data .venv/bin/python bench/envelope_cost.py \\
        --bundle build/test-bundle/bundle
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "build" / "test-bundle" / "bundle")
    parser.add_argument("--images", type=int, default=32, help="images per scored batch (a study's worth)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from edge_node.inference.loaded_model import LoadedModel, load_model
    from edge_node.protocol.bundle import verify_bundle
    from edge_node.protocol.signing import load_public_keys
    from hub.data.medmnist import load_medmnist

    verified = verify_bundle(args.bundle, load_public_keys(args.bundle.parent / "hub.pub"))
    full = load_model(verified, ["CPUExecutionProvider"], 1)
    envelope = full.manifest.envelope
    if envelope is None or envelope.intensity is None:
        parser.error(f"{args.bundle} has no envelope with a grey-value part; export it again")

    def variant(env: object) -> LoadedModel:
        manifest = full.manifest.model_copy(update={"envelope": env})
        return LoadedModel(manifest, full.backend, full.model_file, full.precision)

    models = {
        "probabilities only": variant(None),
        "embedding part": variant(envelope.model_copy(update={"intensity": None})),
        "embedding and grey-value parts": full,
    }
    pre = full.preprocessing
    images = load_medmnist("pneumoniamnist", "test").images[: args.images] / 255.0
    batch = ((images - pre.mean[0]) / pre.std[0])[:, None].astype(np.float32)  # (N, 1, 28, 28)
    for model in models.values():
        model.scores(batch)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():  # alternated, so that drift in the machine hits every way alike
            t0 = time.perf_counter()
            model.scores(batch)
            times[name].append((time.perf_counter() - t0) / len(batch))
    per_image = {name: statistics.median(t) for name, t in times.items()}
    base = per_image["probabilities only"]
    rows = {name: {"us_per_image": 1e6 * t, "ratio": t / base} for name, t in per_image.items()}
    if args.format == "json":
        print(json.dumps({"bundle": str(args.bundle), "images": len(batch), "rows": rows}, indent=2))
        return 0
    table = Table(title=f"LoadedModel.scores, {len(batch)} images a batch, median of {args.repeats}")
    for column in ("envelope", "µs per image", "× probabilities only"):
        table.add_column(column, justify="right" if column != "envelope" else "left")
    for name, row in rows.items():
        table.add_row(name, f"{row['us_per_image']:.1f}", f"{row['ratio']:.2f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
