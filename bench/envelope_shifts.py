"""How many of a bundle's test images fall outside its input envelope when every image is altered alike.

For the PneumoniaMNIST test bundle: the 624 test images as they are, inverted, darkened, with squared
intensities, with Gaussian noise, and BreastMNIST ultrasound images sent to the chest model. Each set goes
through the bundle's fp32 model on ONNX Runtime (CPU, one thread) and the envelope checks the node uses
(``edge_node.protocol.envelope``): the embedding part, the grey-value (intensity) part, and either, which is
what a node counts as outside; with the share of images that look like negatives. docs/envelope.md reports
the table.

    OMP_NUM_THREADS=1 FEDCLINIC_DATA=../shared/data .venv/bin/python bench/envelope_shifts.py \
        --bundle build/test-bundle/bundle
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

#: Each alteration of uint8 (N, H, W) images, in the order of the table.
SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "unchanged": lambda im: im,
    "inverted": lambda im: 255 - im,
    "darkened to 70 %": lambda im: (im * 0.7).astype(np.uint8),
    "gamma 2 (squared intensities)": lambda im: (255 * (im / 255.0) ** 2).astype(np.uint8),
    "Gaussian noise, sd 25 grey levels": lambda im: np.clip(
        im + np.random.default_rng(0).normal(0, 25, im.shape), 0, 255
    ).astype(np.uint8),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "build" / "test-bundle" / "bundle")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck
    from edge_node.protocol.manifest import MANIFEST_FILE, parse_manifest
    from export.parity import cpu_session, run_onnx_outputs
    from hub.data.medmnist import load_medmnist

    manifest = parse_manifest((args.bundle / MANIFEST_FILE).read_bytes())
    if manifest.envelope is None:
        parser.error(f"{args.bundle} has no input envelope; export it again with this version")
    check = EnvelopeCheck.of(manifest.envelope)
    if manifest.envelope.intensity is None:
        parser.error(f"{args.bundle} has no grey-value part in its envelope; export it again")
    grey_check = IntensityCheck.of(manifest.envelope.intensity)
    session = cpu_session(args.bundle / "model.onnx")
    mean, std = manifest.preprocessing.mean[0], manifest.preprocessing.std[0]

    def shares(images: np.ndarray) -> dict[str, float]:
        grey = images.astype(np.float32) / 255.0  # (N, 28, 28): the model input before normalisation
        x = ((grey - mean) / std)[:, None]  # (N, 1, 28, 28), as the node feeds
        embedding = check.outside(run_onnx_outputs(session, x)[1])
        seen = grey_check.judge(grey)
        return {
            "embedding": float(embedding.mean()),
            "grey values": float(seen.outside.mean()),
            "either (the node)": float((embedding | seen.outside).mean()),
            "look negative": float(seen.negative.mean()),
        }

    test = load_medmnist("pneumoniamnist", "test").images
    rows = {name: shares(shift(test)) for name, shift in SHIFTS.items()}
    rows["BreastMNIST test images"] = shares(load_medmnist("breastmnist", "test").images)
    if args.format == "json":
        print(json.dumps({"bundle": str(args.bundle), "outside": rows}, indent=2))
        return 0
    table = Table(title=f"{manifest.model_id} {manifest.model_version}: test images outside the envelope")
    table.add_column("images")
    for column in next(iter(rows.values())):
        table.add_column(column, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(f"{share:.1%}" for share in row.values()))
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
