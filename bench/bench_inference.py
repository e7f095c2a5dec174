"""Per-image inference latency on real PneumoniaMNIST test images: ORT fp32, ORT int8 and torch eager.

Each backend runs in its own subprocess with one thread (OMP/MKL/ORT), batch 1, so no runtime warms or
starves another. Usage (from the repository root, hub venv)::

    .venv/bin/python bench/bench_inference.py --checkpoint runs/x/best --json out/bench-student.json
    FEDCLINIC_TEST_BUNDLE=build/dev-bundle .venv/bin/python bench/bench_inference.py   # its run/best
    .venv/bin/python bench/bench_inference.py --model teacher_cnn_l --json out/bench-teacher.json

``--model`` benchmarks a freshly initialised model (latency does not depend on the weight values; its AUC
would be meaningless, so none is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("torch-eager", "ort-fp32", "ort-int8")
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# -- worker side: imports only the runtime it measures ---------------------------------------------------


def _load_runner(backend: str, artifact: Path) -> Any:
    """A callable x (1, C, H, W) -> output, for one backend; the imports live here on purpose (see above)."""
    if backend == "torch-eager":
        import torch

        from hub.training.checkpoint import load_checkpoint

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        model = load_checkpoint(artifact).build_model()

        def run_torch(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(x))

        return run_torch
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(artifact), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run_ort(x: np.ndarray) -> Any:
        return session.run(None, {name: x})

    return run_ort


def batch1_latency(run: Callable[[np.ndarray], Any], x: np.ndarray, n: int, warmup: int) -> dict[str, float]:
    """Per-image latency of ``run`` at batch 1 over ``n`` calls (images of ``x`` in turn) after ``warmup``."""
    for i in range(warmup):
        run(x[i % len(x)][None])
    times = np.empty(n, dtype=np.float64)
    for i in range(n):
        one = x[i % len(x)][None]  # (1, C, H, W)
        start = time.perf_counter_ns()
        run(one)
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "mean_ms": float(times.mean()),
        "min_ms": float(times.min()),
    }


def worker(backend: str, artifact: Path, inputs: Path, n: int, warmup: int) -> dict[str, Any]:
    x = np.load(inputs, allow_pickle=False)  # (N, C, H, W) float32, preprocessed real test images
    return {"backend": backend, "n": n, **batch1_latency(_load_runner(backend, artifact), x, n, warmup)}


# -- driver side --------------------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Export fp32 + int8 ONNX and write the preprocessed test images; returns artifact paths and facts."""
    import torch

    from export.onnx_export import export_onnx
    from export.quantize import quantize_int8
    from hub.data.medmnist import load_medmnist
    from hub.models.common import count_parameters
    from hub.models.registry import create_model, get_data_config
    from hub.training.checkpoint import CheckpointConfig, load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    if args.checkpoint is not None:
        ckpt = load_checkpoint(args.checkpoint)
        model, cfg, torch_artifact = ckpt.build_model(), ckpt.config, args.checkpoint
        trained = True
    else:
        torch.manual_seed(0)
        model = create_model(args.model).eval()
        data_config = get_data_config(args.model)
        cfg = CheckpointConfig(
            model_name=args.model, model_config={}, dataset=args.dataset, data_config=data_config, epoch=0
        )
        torch_artifact = save_checkpoint(work / "ckpt", model, cfg)
        trained = False
    dc = cfg.data_config
    x_test = dc.preprocess(load_medmnist(cfg.dataset, "test").images)  # (N, 1, 28, 28)
    x_val = dc.preprocess(load_medmnist(cfg.dataset, "val").images)
    np.save(work / "inputs.npy", x_test, allow_pickle=False)
    fp32 = export_onnx(model, dc.input_size, work / "model.onnx").path
    int8 = quantize_int8(fp32, work / "model.int8.onnx", x_val)
    return {
        "model": cfg.model_name,
        "trained_weights": trained,
        "parameters": count_parameters(model),
        "artifacts": {"torch-eager": torch_artifact, "ort-fp32": fp32, "ort-int8": int8},
        "sizes": {"ort-fp32": fp32.stat().st_size, "ort-int8": int8.stat().st_size},
        "inputs": work / "inputs.npy",
        "images": len(x_test),
    }


def _spawn(backend: str, artifact: Path, inputs: Path, n: int, warmup: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        backend,
        "--artifact",
        str(artifact),
        "--inputs",
        str(inputs),
        "--n",
        str(n),
        "--warmup",
        str(warmup),
    ]
    env = {**os.environ, **WORKER_ENV}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory(prefix="fedclinic-bench-") as tmp:
        prep = _prepare(args, Path(tmp))
        rows = {}
        for backend in BACKENDS:
            console.print(f"[dim]{backend}: {args.n} images, batch 1, 1 thread ...[/dim]")
            rows[backend] = _spawn(backend, prep["artifacts"][backend], prep["inputs"], args.n, args.warmup)
    torch_p50 = rows["torch-eager"]["p50_ms"]
    for row in rows.values():
        row["speedup_vs_torch_p50"] = torch_p50 / row["p50_ms"]
    report = {
        "model": prep["model"],
        "parameters": prep["parameters"],
        "trained_weights": prep["trained_weights"],
        "dataset_images": prep["images"],
        "batch": 1,
        "threads": 1,
        "results": rows,
        "sizes_bytes": prep["sizes"],
        "ort_fp32_vs_torch_eager": rows["ort-fp32"]["speedup_vs_torch_p50"],
        "machine": {
            "cpu": _cpu_name(),
            "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    table = Table(
        title=f"{prep['model']} ({prep['parameters']:,} params): per-image latency, batch 1, 1 thread"
    )
    for col in ("backend", "p50 ms", "p95 ms", "mean ms", "vs torch (p50)", "model file"):
        table.add_column(col, justify="right" if col != "backend" else "left")
    for backend, row in rows.items():
        size = prep["sizes"].get(backend)
        table.add_row(
            backend,
            f"{row['p50_ms']:.3f}",
            f"{row['p95_ms']:.3f}",
            f"{row['mean_ms']:.3f}",
            f"{row['speedup_vs_torch_p50']:.1f}x",
            f"{size / 1024:.0f} KiB" if size else "-",
        )
    console.print(table)
    ratio = report["ort_fp32_vs_torch_eager"]
    verdict = "[green]meets[/green]" if ratio >= 4 else "[yellow]below[/yellow]"
    console.print(f"ORT fp32 is {ratio:.1f}x faster than torch eager at p50 ({verdict} the 4x target)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return report


def _default_checkpoint() -> Path | None:
    """The trained student of the test bundle (``make test-bundle``), when $FEDCLINIC_TEST_BUNDLE has one."""
    env = os.environ.get("FEDCLINIC_TEST_BUNDLE")
    best = Path(env) / "run" / "best" if env else None
    return best if best is not None and (best / "config.json").is_file() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--checkpoint", type=Path, help="trained checkpoint (default: $FEDCLINIC_TEST_BUNDLE/run/best)"
    )
    src.add_argument("--model", help="registered model with fresh weights (latency only), e.g. teacher_cnn_l")
    parser.add_argument("--dataset", default="pneumoniamnist", help="images for --model")
    parser.add_argument("--n", type=int, default=500, help="timed images per backend")
    parser.add_argument("--warmup", type=int, default=50, help="untimed images first")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and args.checkpoint is None and args.model is None:
        args.checkpoint = _default_checkpoint()
        if args.checkpoint is None:
            parser.error("pass --checkpoint or --model (or set FEDCLINIC_TEST_BUNDLE to a built test bundle)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.artifact, args.inputs, args.n, args.warmup)))
        return 0
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
