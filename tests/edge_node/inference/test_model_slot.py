"""Inference settings through the model slot and the node: precision variant, TensorRT options, the provider
really used (recorded at load and shown by ``status``), and the warm-up at start."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from edge_node.cli import app
from edge_node.errors import ConfigError, ModelError
from edge_node.inference.backend import (
    CPU,
    CUDA,
    TENSORRT,
    Backend,
    OrtRuntime,
    ProviderPlan,
    SessionConfig,
    SessionLike,
)
from edge_node.inference.loaded_model import LoadedModel, load_model
from edge_node.inference.model_slot import LoadOptions, ModelSlot
from edge_node.inference.serving_record import read_serving
from edge_node.node import Node
from edge_node.protocol.bundle import VerifiedBundle
from edge_node.settings import load_settings
from edge_node.state.node_state import NodeState
from tests.edge_node.conftest import TrustedBundle, make_signed_bundle

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_edge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FEDCLINIC_EDGE_"):
            monkeypatch.delenv(name)


def _config(path: Path, **values: str) -> Path:
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items()))
    return path


class SilentFallbackRuntime(OrtRuntime):
    """onnxruntime-gpu on a box without working CUDA: lists CUDA, and the session quietly runs on the CPU."""

    def available_providers(self) -> list[str]:
        return [CUDA, CPU]

    def create_session(self, model_path: Path, config: SessionConfig, plan: ProviderPlan) -> SessionLike:
        assert [name for name, _ in plan] == [CUDA, CPU]
        return super().create_session(model_path, config, [(CPU, {})])


def _fallback_loader(bundle: VerifiedBundle, options: LoadOptions) -> LoadedModel:
    return load_model(
        bundle,
        options.providers,
        options.threads,
        precision=options.precision,
        runtime=SilentFallbackRuntime(),
    )


@pytest.fixture
def int8_node(tmp_path: Path, test_bundle: TrustedBundle) -> Iterator[Node]:
    config = _config(
        tmp_path / "edge.toml",
        data_dir=str(tmp_path / "data"),
        trusted_keys=str(test_bundle.public_key),
        precision="int8",
    )
    settings = load_settings(config, port=0, providers=[CUDA, CPU])
    node = Node(settings)
    yield node
    node.stop()


def test_settings_defaults_and_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.precision == "fp32" and settings.trt_fp16 is False
    assert settings.trt_engine_cache_dir == tmp_path / "trt-cache" == settings.trt_cache_dir
    monkeypatch.setenv("FEDCLINIC_EDGE_PRECISION", "INT8")
    monkeypatch.setenv("FEDCLINIC_EDGE_TRT_FP16", "true")
    monkeypatch.setenv("FEDCLINIC_EDGE_TRT_ENGINE_CACHE_DIR", str(tmp_path / "engines"))
    settings = load_settings(data_dir=tmp_path)
    assert (settings.precision, settings.trt_fp16) == ("int8", True)
    assert settings.trt_cache_dir == tmp_path / "engines"
    with pytest.raises(ConfigError, match=r"FEDCLINIC_EDGE_PRECISION.*fp32"):
        load_settings(data_dir=tmp_path, precision="fp8")


def test_slot_passes_every_inference_setting_to_the_loader(
    tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = signing_key
    settings = load_settings(
        data_dir=tmp_path / "data",
        trusted_keys=pub,
        providers=[TENSORRT, CPU],
        intra_op_threads=2,
        precision="fp16",
        trt_fp16=True,
    )
    seen: list[LoadOptions] = []

    def loader(bundle: VerifiedBundle, options: LoadOptions) -> LoadedModel:
        seen.append(options)
        return load_model(bundle, [CPU], 1, precision=options.precision)

    store = NodeState.open(settings.db_path)
    slot = ModelSlot.from_settings(store.models, settings)
    slot.loader = loader
    slot.install(make_signed_bundle(tmp_path / "b", key))
    assert slot.current() is not None
    check, serving = seen
    # The install check runs the configured precision on the CPU; serving uses everything configured.
    assert check == LoadOptions(
        providers=(CPU,),
        threads=1,
        precision="fp16",
        trt_engine_cache_dir=tmp_path / "data" / "trt-cache",
        trt_fp16=True,
    )
    assert serving == LoadOptions(
        providers=(TENSORRT, CPU),
        threads=2,
        precision="fp16",
        trt_engine_cache_dir=tmp_path / "data" / "trt-cache",
        trt_fp16=True,
    )
    store.close()


@pytest.mark.slow
def test_int8_node_serves_the_int8_variant_and_status_shows_what_really_runs(
    int8_node: Node, test_bundle: TrustedBundle, caplog: pytest.LogCaptureFixture
) -> None:
    node = int8_node
    node.models.install(test_bundle.bundle)
    node.models.loader = _fallback_loader  # a GPU build whose CUDA does not load
    with caplog.at_level(logging.INFO):
        node.start()
    model = node.models.current()
    assert model is not None
    assert (model.model_file, model.precision) == ("model.int8.onnx", "int8")
    assert (model.requested_provider, model.provider) == (CUDA, CPU)
    # The slot loaded it at start (before any study), warmed it up, and warmed up the result builders.
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"model {model.model_id} ") and "warmed up in" in m for m in messages)
    assert any(m.startswith("result builders (SR, SC) warmed up") for m in messages)

    record = read_serving(node.settings.serving_path)
    assert record is not None and record.fell_back
    assert (record.model_file, record.precision, record.provider) == ("model.int8.onnx", "int8", CPU)
    config = _config(
        node.settings.data_dir.parent / "status.toml",
        data_dir=str(node.settings.data_dir),
        trusted_keys=str(test_bundle.public_key),
    )
    result = runner.invoke(app, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    model_line = text.split("serving:", 1)[1]
    assert "model.int8.onnx (int8)" in model_line and "runs on CPUExecutionProvider" in model_line
    assert "asked for CUDAExecutionProvider" in model_line


def test_status_says_when_the_bundle_has_no_variant_or_the_node_has_not_loaded(
    tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, pub = signing_key
    config = _config(tmp_path / "edge.toml", data_dir=str(tmp_path / "data"), trusted_keys=str(pub))
    settings = load_settings(config, precision="int8", providers=[CPU])
    store = NodeState.open(settings.db_path)
    slot = ModelSlot.from_settings(store.models, settings)
    slot.install(make_signed_bundle(tmp_path / "b", key))  # a bundle without an int8 variant
    before = runner.invoke(app, ["status", "--config", str(config)])
    assert "not loaded yet" in before.output
    store.close()
    node = Node(load_settings(config, precision="int8", providers=[CPU], port=0))
    node.start()  # loads the model at start, before any study
    node.stop()
    after = " ".join(runner.invoke(app, ["status", "--config", str(config)]).output.split())
    assert "model.onnx (fp32) - the bundle has no int8 variant, runs on CPUExecutionProvider" in after
    assert "asked for" not in after


class _NaNBackend(Backend):
    @property
    def provider(self) -> str:
        return CPU

    @property
    def input_dtype(self) -> type[np.generic]:
        return np.float32

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.full((batch.shape[0], 1), np.nan, dtype=np.float32)


def test_warm_up_runs_one_image_and_refuses_a_model_that_gives_no_scores(test_bundle: TrustedBundle) -> None:
    from edge_node.protocol.bundle import verify_bundle
    from edge_node.protocol.signing import load_public_keys

    verified = verify_bundle(test_bundle.bundle, load_public_keys(test_bundle.public_key))
    model = load_model(verified, [CPU], 1)
    calls: list[tuple[int, ...]] = []
    run = model.backend.run

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        return run(batch)

    model.backend.run = counting  # type: ignore[method-assign]
    assert model.warm_up() >= 0.0
    assert calls == [(1, 1, 28, 28)]  # the dynamic batch dimension becomes 1
    broken = LoadedModel(model.manifest, _NaNBackend(), "model.onnx", "fp32")
    with pytest.raises(ModelError, match="gives no usable scores"):
        broken.warm_up()
