"""The edge's GPU path on a signed bundle: verify it, load it on CUDA and on the CPU, time both in one run.

Runs where ``onnxruntime-gpu`` and an NVIDIA GPU are (the device machine); elsewhere it reports that CUDA
did not load and times the CPU alone. Everything goes through the node's own code: ``verify_bundle`` with
the hub's public key, then ``load_model`` with the provider plan a node would use, so the provider each
session really got is what is reported (onnxruntime-gpu lists CUDA and TensorRT even where they cannot
load). The CPU session has one thread, as in the other benchmarks; the GPU figures are ratios against it.

    python bench/bench_gpu_inference.py --bundle build/test-bundle/bundle \\
        --keys build/test-bundle/hub.pub --json out/gpu.json

``--images`` takes an .npy of preprocessed images (N, C, H, W) float32; without it, uniform noise of the
bundle's input shape (the latency of this model does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_node.inference.backend import CPU, CUDA, TENSORRT
from edge_node.inference.loaded_model import LoadedModel, load_model
from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.signing import load_public_keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import batch1_latency

PLANS: dict[str, list[str]] = {
    "cpu": [CPU],
    "cuda": [CUDA, CPU],
    # What a node configured for TensorRT asks for: where TensorRT cannot load, the session says so.
    "tensorrt": [TENSORRT, CUDA, CPU],
}


def _throughput(model: LoadedModel, images: np.ndarray, batch: int, repeats: int) -> float:
    """Images per second at ``batch`` (the loaded model splits what exceeds its own maximum batch)."""
    x = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)
    model.predict(x)  # warm-up: allocations, kernel selection
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.predict(x)
    return batch * repeats / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    bundle = verify_bundle(args.bundle, load_public_keys(args.keys))
    shape = bundle.manifest.io.inputs[0].shape
    if args.images is not None:
        images = np.load(args.images).astype(np.float32)
    else:
        images = np.random.default_rng(0).random((256, *shape[1:]), dtype=np.float32)
    out: dict[str, Any] = {
        "model": f"{bundle.manifest.model_id} {bundle.manifest.model_version}",
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "python": platform.python_version(),
        "plans": {},
    }
    reference: np.ndarray | None = None
    with tempfile.TemporaryDirectory() as cache:
        for name, providers in PLANS.items():
            model = load_model(bundle, providers, threads=1, trt_engine_cache_dir=Path(cache))
            scores = model.predict(images)
            if reference is None:
                reference = scores
            row: dict[str, Any] = {
                "asked": providers,
                "got": model.provider,
                "max_abs_diff_vs_cpu": float(np.max(np.abs(scores - reference))),
                "batch1": batch1_latency(model.predict, images, args.n, args.warmup),
                "images_per_s": {str(b): _throughput(model, images, b, args.repeats) for b in args.batches},
            }
            out["plans"][name] = row
            print(f"{name:9s} got {model.provider}: {json.dumps(row['batch1'])}", flush=True)
    cpu = out["plans"]["cpu"]
    for row in out["plans"].values():
        row["batch1_p50_vs_cpu"] = row["batch1"]["p50_ms"] / cpu["batch1"]["p50_ms"]
        row["throughput_vs_cpu"] = {
            b: row["images_per_s"][b] / cpu["images_per_s"][b] for b in row["images_per_s"]
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a signed bundle directory or zip")
    parser.add_argument("--keys", type=Path, required=True, help="the hub's public key file(s)")
    parser.add_argument("--images", type=Path, help="preprocessed images, .npy (N, C, H, W)")
    parser.add_argument("--n", type=int, default=500, help="timed batch-1 calls per plan")
    parser.add_argument("--warmup", type=int, default=50, help="untimed batch-1 calls first")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024], help="throughput batch sizes")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per throughput batch")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
