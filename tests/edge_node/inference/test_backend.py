"""Inference backend: provider selection (with a fake GPU runtime), the real CPU session, variants, scores."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_node.errors import ModelError
from edge_node.inference.backend import (
    CPU,
    CUDA,
    TENSORRT,
    BackendOptions,
    OnnxRuntimeBackend,
    ProviderPlan,
    SessionConfig,
    plan_providers,
)
from edge_node.inference.loaded_model import MAX_BATCH, load_model, scores_from_outputs
from edge_node.protocol.manifest import ClassLabel, TaskSpec
from tests.support.onnxgen import make_bundle

# -- a stand-in for a GPU build of onnxruntime (the provider logic only) -------------------------------------


@dataclass
class _Input:
    name: str = "input"
    type: str = "tensor(float)"


@dataclass
class FakeSession:
    providers: list[str]

    def get_providers(self) -> Sequence[str]:
        return self.providers

    def get_inputs(self) -> Sequence[Any]:
        return [_Input()]

    def get_outputs(self) -> Sequence[Any]:
        return [_Input(name="logits")]

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> Sequence[Any]:
        x = input_feed["input"]
        return [x.reshape(x.shape[0], -1).sum(axis=1, keepdims=True)]


@dataclass
class FakeGpuRuntime:
    """Lists GPU providers like onnxruntime-gpu; ``loads`` says which of them a session really gets."""

    available: list[str] = field(default_factory=lambda: [TENSORRT, CUDA, CPU])
    loads: set[str] = field(default_factory=lambda: {CPU})
    raise_on_gpu: bool = False
    calls: list[tuple[SessionConfig, ProviderPlan]] = field(default_factory=list)

    def available_providers(self) -> list[str]:
        return list(self.available)

    def create_session(self, model_path: Path, config: SessionConfig, plan: ProviderPlan) -> FakeSession:
        self.calls.append((config, plan))
        if self.raise_on_gpu and any(name != CPU for name, _ in plan):
            raise RuntimeError("CUDA driver version is insufficient")
        return FakeSession([name for name, _ in plan if name in self.loads])


# -- provider plans ------------------------------------------------------------------------------------------


def test_plan_keeps_config_order_drops_unavailable_and_ends_with_cpu(tmp_path: Path) -> None:
    opts = BackendOptions(providers=(TENSORRT, CUDA), trt_engine_cache_dir=tmp_path / "trt", trt_fp16=True)
    plan = plan_providers(opts, [TENSORRT, CUDA, CPU])
    assert [name for name, _ in plan] == [TENSORRT, CUDA, CPU]
    trt = dict(plan)[TENSORRT]
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert trt["trt_fp16_enable"] == "True"
    assert dict(plan)[CUDA] == {"device_id": "0"}
    assert [n for n, _ in plan_providers(opts, [CPU])] == [CPU]
    no_cache = dict(plan_providers(BackendOptions(providers=(TENSORRT,)), [TENSORRT, CPU]))[TENSORRT]
    assert "trt_engine_cache_enable" not in no_cache and no_cache["trt_fp16_enable"] == "False"


def test_silent_cpu_fallback_is_detected_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = FakeGpuRuntime(loads={CPU})
    with caplog.at_level(logging.WARNING, logger="edge_node.inference.backend"):
        backend = OnnxRuntimeBackend(tmp_path / "m.onnx", BackendOptions(threads=2), runtime=runtime)
    assert backend.requested == TENSORRT
    assert backend.provider == CPU
    assert "runs on CPUExecutionProvider" in caplog.text
    config, plan = runtime.calls[0]
    assert [name for name, _ in plan] == [TENSORRT, CUDA, CPU]
    # A 2-core clinic PC: the configured intra-op threads, one inter-op thread, and no spinning when idle.
    assert config.intra_op_threads == 2 and config.inter_op_threads == 1
    assert config.config_entries["session.intra_op.allow_spinning"] == "0"


def test_provider_really_used_is_reported() -> None:
    runtime = FakeGpuRuntime(loads={CUDA, CPU})
    backend = OnnxRuntimeBackend(Path("m.onnx"), BackendOptions(), runtime=runtime)
    assert backend.provider == CUDA and backend.requested == TENSORRT
    out = backend.run(np.ones((2, 1, 2, 2), np.float32))
    np.testing.assert_allclose(out, [[4.0], [4.0]])


def test_a_gpu_stack_that_raises_falls_back_to_cpu() -> None:
    runtime = FakeGpuRuntime(raise_on_gpu=True)
    backend = OnnxRuntimeBackend(Path("m.onnx"), BackendOptions(providers=(CUDA, CPU)), runtime=runtime)
    assert backend.provider == CPU
    assert [[n for n, _ in plan] for _, plan in runtime.calls] == [[CUDA, CPU], [CPU]]


def test_cpu_failure_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"onnxruntime cannot load broken\.onnx"):
        OnnxRuntimeBackend(tmp_path / "broken.onnx", BackendOptions(providers=(CPU,)))


# -- the real onnxruntime ------------------------------------------------------------------------------------


def test_real_session_runs_on_cpu_and_matches_numpy(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    # Asking for GPUs on a CPU build: they are not available, the session says CPU.
    model = load_model(bundle, [TENSORRT, CUDA, CPU], threads=1)
    assert model.provider == CPU
    assert (model.model_id, model.model_version) == ("test-student", "1.2.3")
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    logits = bundle.model.logits(x)[:, 0]
    np.testing.assert_allclose(model.predict(x), 1 / (1 + np.exp(-logits)), atol=1e-6)
    probs = model.probabilities(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_int8_variant_is_chosen_when_asked_and_shipped(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, with_int8_variant=True)
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    fp32 = load_model(bundle, [CPU], 1)
    int8 = load_model(bundle, [CPU], 1, precision="int8")
    assert (fp32.model_file, fp32.precision) == ("model.onnx", "fp32")
    assert (int8.model_file, int8.precision) == ("model.int8.onnx", "int8")
    # The stand-in variant negates the logits: its scores are 1 - the fp32 scores.
    np.testing.assert_allclose(int8.predict(x), 1 - fp32.predict(x), atol=1e-6)
    plain = make_bundle(tmp_path / "plain")
    assert load_model(plain, [CPU], 1, precision="int8").model_file == "model.onnx"


def test_missing_model_file_is_a_model_error(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ModelError, match="missing from the bundle"):
        load_model(bundle, [CPU], 1)


def test_scores_from_outputs() -> None:
    binary = TaskSpec(
        kind="binary",
        classes=[ClassLabel(index=0, name="n"), ClassLabel(index=1, name="p")],
        output_activation="sigmoid",
    )
    probs = scores_from_outputs(np.array([[0.0], [2.0], [-800.0]]), binary)
    np.testing.assert_allclose(probs[:, 1], [0.5, 1 / (1 + np.exp(-2.0)), 0.0], atol=1e-12)
    np.testing.assert_allclose(probs[:, 0], 1 - probs[:, 1])
    multi = TaskSpec(
        kind="multiclass",
        classes=[ClassLabel(index=i, name=str(i)) for i in range(3)],
        output_activation="softmax",
    )
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, 0.0]])
    e = np.exp(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(scores_from_outputs(logits, multi)[0], e / e.sum())
    np.testing.assert_allclose(scores_from_outputs(logits, multi)[1], [1.0, 0.0, 0.0])


# -- the real GPU path (device machine only) -----------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_and_tensorrt_really_load(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA execution provider")
    bundle = make_bundle(tmp_path / "bundle")
    cuda = load_model(bundle, [CUDA, CPU], threads=1)
    if cuda.provider != CUDA:
        pytest.skip(f"CUDAExecutionProvider is listed but did not load (session got {cuda.provider})")
    x = np.random.default_rng(2).random((8, 1, 28, 28), dtype=np.float32)
    expected = 1 / (1 + np.exp(-bundle.model.logits(x)[:, 0]))
    np.testing.assert_allclose(cuda.predict(x), expected, atol=1e-4)
    if TENSORRT in ort.get_available_providers():
        cache = tmp_path / "trt-cache"
        trt = load_model(bundle, [TENSORRT, CUDA, CPU], threads=1, trt_engine_cache_dir=cache)
        if trt.provider == TENSORRT:
            np.testing.assert_allclose(trt.predict(x), expected, atol=1e-3)
            assert any(cache.iterdir()), "TensorRT built no engine into the cache directory"


def test_long_batches_run_in_chunks_with_the_same_result(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    model = load_model(bundle, [CPU], 1)
    calls: list[int] = []
    run = model.backend.run

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        return run(batch)

    model.backend.run = counting  # type: ignore[method-assign]
    x = np.random.default_rng(3).random((MAX_BATCH * 2 + 5, 1, 28, 28), dtype=np.float32)
    expected = 1 / (1 + np.exp(-bundle.model.logits(x)[:, 0]))
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-6)
    assert calls == [MAX_BATCH, MAX_BATCH, 5]
