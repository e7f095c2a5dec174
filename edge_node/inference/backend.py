"""Inference backends: the Backend role and OnnxRuntimeBackend (TensorRT, CUDA or CPU execution providers).

onnxruntime-gpu lists CUDA and TensorRT as "available" even where they cannot load, and then silently runs
on the CPU. So the provider plan is only a wish: after the session exists, ``get_providers()`` says what the
session really got, and that is what the backend reports and logs.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_node.errors import ModelError

__all__ = [
    "CPU",
    "CUDA",
    "TENSORRT",
    "Backend",
    "BackendOptions",
    "OnnxRuntimeBackend",
    "OrtRuntime",
    "ProviderPlan",
    "Runtime",
    "SessionConfig",
    "SessionLike",
    "plan_providers",
]

logger = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


@dataclass(frozen=True)
class BackendOptions:
    """How to run a model; built from the node's settings."""

    providers: Sequence[str] = (TENSORRT, CUDA, CPU)
    #: ORT intra-op threads. A clinic PC has ~2 cores shared with the listener: keep this small.
    threads: int = 1
    #: TensorRT engines are built on first use (minutes) and cached here; None disables the cache.
    trt_engine_cache_dir: Path | None = None
    trt_fp16: bool = False
    device_id: int = 0


@dataclass(frozen=True)
class SessionConfig:
    """Session options in plain data, so the provider logic can be tested without a runtime."""

    intra_op_threads: int
    inter_op_threads: int = 1
    #: ORT config entries, e.g. spinning off: an idle node must not burn a core waiting for work.
    config_entries: dict[str, str] = field(default_factory=dict)


ProviderPlan = list[tuple[str, dict[str, str]]]


class SessionLike(Protocol):
    """The part of ``onnxruntime.InferenceSession`` a backend uses."""

    def get_providers(self) -> Sequence[str]: ...

    def get_inputs(self) -> Sequence[Any]: ...

    def get_outputs(self) -> Sequence[Any]: ...

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> Sequence[Any]: ...


class Runtime(Protocol):
    """The seam between provider selection and the real ONNX Runtime (faked in tests)."""

    def available_providers(self) -> list[str]: ...

    def create_session(self, model_path: Path, config: SessionConfig, plan: ProviderPlan) -> SessionLike: ...


class OrtRuntime:
    """The real ONNX Runtime, imported lazily so that importing this module costs nothing."""

    def available_providers(self) -> list[str]:
        import onnxruntime as ort

        return list(ort.get_available_providers())

    def create_session(self, model_path: Path, config: SessionConfig, plan: ProviderPlan) -> SessionLike:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = config.intra_op_threads
        opts.inter_op_num_threads = config.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in config.config_entries.items():
            opts.add_session_config_entry(key, value)
        session: SessionLike = ort.InferenceSession(
            str(model_path),
            sess_options=opts,
            providers=[name for name, _ in plan],
            provider_options=[options for _, options in plan],
        )
        return session


def plan_providers(options: BackendOptions, available: Sequence[str]) -> ProviderPlan:
    """The providers to ask for, in the configured order, with their options; CPU always closes the list.

    Providers the runtime does not even list are dropped here (logged); the ones it lists may still fail to
    load, which only the session can tell.
    """
    plan: ProviderPlan = []
    for name in options.providers:
        if name in (p for p, _ in plan):
            continue
        if name not in available:
            logger.info("execution provider %s is not available in this onnxruntime build; skipped", name)
            continue
        plan.append((name, _provider_options(name, options)))
    if CPU not in (p for p, _ in plan):
        plan.append((CPU, {}))
    return plan


def _provider_options(name: str, options: BackendOptions) -> dict[str, str]:
    if name == TENSORRT:
        trt: dict[str, str] = {
            "device_id": str(options.device_id),
            "trt_fp16_enable": "True" if options.trt_fp16 else "False",
        }
        if options.trt_engine_cache_dir is not None:
            cache = str(options.trt_engine_cache_dir)
            trt.update(
                {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": cache,
                }
            )
        return trt
    if name == CUDA:
        return {"device_id": str(options.device_id)}
    return {}


def session_config(options: BackendOptions) -> SessionConfig:
    return SessionConfig(
        intra_op_threads=options.threads,
        inter_op_threads=1,
        config_entries={
            "session.intra_op.allow_spinning": "0",
            "session.inter_op.allow_spinning": "0",
        },
    )


class Backend(ABC):
    """Runs one model: a batch in, the first output out."""

    @property
    @abstractmethod
    def provider(self) -> str:
        """The execution provider the model really runs on."""

    @property
    def requested_provider(self) -> str:
        """The provider that was asked for first; differs from ``provider`` after a silent fallback."""
        return self.provider

    @property
    @abstractmethod
    def input_dtype(self) -> type[np.generic]:
        """The numpy dtype the model's input takes."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a (N, C, H, W) batch; returns the first output, e.g. (N, K) logits."""

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """Run the model once and return the named outputs, in that order (e.g. logits and embedding)."""
        raise ModelError(f"this backend returns only the first output; it cannot give {list(names)}")


class OnnxRuntimeBackend(Backend):
    """An ONNX Runtime session with the configured providers, thread budget and TensorRT cache."""

    def __init__(self, model_path: Path, options: BackendOptions, runtime: Runtime | None = None) -> None:
        self._runtime = runtime if runtime is not None else OrtRuntime()
        if options.trt_engine_cache_dir is not None and TENSORRT in options.providers:
            options.trt_engine_cache_dir.mkdir(parents=True, exist_ok=True)
        self.plan = plan_providers(options, self._runtime.available_providers())
        self.requested = self.plan[0][0]
        config = session_config(options)
        try:
            self._session = self._runtime.create_session(model_path, config, self.plan)
        except Exception as exc:  # a broken GPU stack may raise instead of falling back
            if [p for p, _ in self.plan] == [CPU]:
                raise ModelError(f"onnxruntime cannot load {model_path.name}: {exc}") from exc
            logger.warning(
                "onnxruntime failed to create a session with %s (%s); retrying on the CPU",
                [p for p, _ in self.plan],
                exc,
            )
            self.plan = [(CPU, {})]
            try:
                self._session = self._runtime.create_session(model_path, config, self.plan)
            except Exception as cpu_exc:
                raise ModelError(f"onnxruntime cannot load {model_path.name}: {cpu_exc}") from cpu_exc
        got = list(self._session.get_providers())
        self._provider = got[0] if got else CPU
        if self._provider != self.requested:
            logger.warning(
                "asked onnxruntime for %s but the session runs on %s (the requested provider did not load; "
                "check the CUDA/cuDNN/TensorRT libraries)",
                self.requested,
                self._provider,
            )
        else:
            logger.info("inference session runs on %s (threads=%d)", self._provider, options.threads)
        inputs = list(self._session.get_inputs())
        if len(inputs) != 1:
            raise ModelError(f"{model_path.name} has {len(inputs)} inputs; the edge runs single-input models")
        self._input_name = str(inputs[0].name)
        self._input_dtype = _NUMPY_DTYPES.get(str(inputs[0].type), np.float32)

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def requested_provider(self) -> str:
        return self.requested

    @property
    def providers(self) -> list[str]:
        """Every provider the session holds, in priority order."""
        return list(self._session.get_providers())

    @property
    def input_name(self) -> str:
        return self._input_name

    @property
    def input_dtype(self) -> type[np.generic]:
        return self._input_dtype

    def run(self, batch: np.ndarray) -> np.ndarray:
        feed = {self._input_name: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        outputs = self._session.run(None, feed)
        return np.asarray(outputs[0])

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        feed = {self._input_name: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        return [np.asarray(out) for out in self._session.run(list(names), feed)]
