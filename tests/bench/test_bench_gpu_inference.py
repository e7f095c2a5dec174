"""bench/bench_gpu_inference.py: the bundle is verified, and each plan reports the provider it really got.

Here (no GPU) the CUDA and TensorRT plans must say they ran on the CPU; on the device machine the same
script reported CUDA (docs/benchmarks.md, "Inference on an NVIDIA GPU").
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_node.inference.backend import CPU, CUDA
from edge_node.protocol.errors import SignatureError
from tests.edge_node.conftest import TrustedBundle, require_test_bundle
from tests.support.bench_script import load_bench_script

TINY = ["--n", "20", "--warmup", "2", "--batches", "8", "300", "--repeats", "2"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench_script("bench_gpu_inference")


@pytest.fixture(scope="module")
def trusted() -> TrustedBundle:
    return require_test_bundle()


def test_each_plan_reports_what_it_got_and_agrees_with_the_cpu(
    bench: ModuleType, trusted: TrustedBundle, tmp_path: Path
) -> None:
    images = np.random.default_rng(1).random((40, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "gpu.json"
    args = [
        "--bundle",
        str(trusted.bundle),
        "--keys",
        str(trusted.public_key),
        "--images",
        str(tmp_path / "x.npy"),
    ]
    assert bench.main([*args, *TINY, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["plans"]) == {"cpu", "cuda", "tensorrt"}
    plans = result["plans"]
    assert plans["cpu"]["got"] == CPU and plans["cpu"]["batch1_p50_vs_cpu"] == 1.0
    if CUDA not in ort.get_available_providers():  # this machine: the wish is not what the node reports
        assert plans["cuda"]["got"] == CPU and plans["tensorrt"]["got"] == CPU
    for row in plans.values():
        assert row["got"] in row["asked"]
        assert row["max_abs_diff_vs_cpu"] < 1e-4
        assert 0 < row["batch1"]["p50_ms"] <= row["batch1"]["p95_ms"]
        assert set(row["images_per_s"]) == {"8", "300"} and all(v > 0 for v in row["images_per_s"].values())


def test_a_bundle_signed_by_another_key_is_refused(
    bench: ModuleType, trusted: TrustedBundle, tmp_path: Path
) -> None:
    other = tmp_path / "other.pub"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(SignatureError):
        bench.main(["--bundle", str(trusted.bundle), "--keys", str(other), *TINY])
