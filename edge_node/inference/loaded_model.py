"""A verified bundle turned into a runnable model: the ONNX session plus the manifest that describes it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from edge_node.errors import ModelError
from edge_node.inference.backend import Backend, BackendOptions, OnnxRuntimeBackend, Runtime
from edge_node.inference.personal_head import PersonalHead
from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck
from edge_node.protocol.manifest import FileEntry, HeadSpec, Manifest, Preprocessing, TaskSpec

__all__ = [
    "MAX_BATCH",
    "BundleView",
    "LoadedModel",
    "ModelScores",
    "Precision",
    "load_model",
    "pick_model_file",
    "scores_from_outputs",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]

#: Images per model call for a dynamic-batch model: bounds memory on a long series (a 500-slice CT).
MAX_BATCH = 32


class BundleView(Protocol):
    """What loading needs from ``edge_node.protocol.bundle.VerifiedBundle`` (which satisfies it)."""

    @property
    def manifest(self) -> Manifest: ...

    def path_of(self, entry: FileEntry) -> Path: ...


def pick_model_file(manifest: Manifest, precision: Precision = "fp32") -> FileEntry:
    """The ONNX file to load: the variant for ``precision`` when the bundle ships one, else the main model."""
    models = [f for f in manifest.files if f.role == "model"]
    if not models:
        raise ModelError(
            f"bundle {manifest.model_id} {manifest.model_version} lists no model file; re-export it"
        )
    if precision != "fp32":
        for entry in manifest.files:
            if entry.role == "variant" and (entry.variant or "").lower() == precision:
                return entry
        logger.info(
            "bundle %s ships no %s variant; using the full-precision model", manifest.model_id, precision
        )
    return models[0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Split by sign so that exp never overflows.
    out = np.empty_like(x, dtype=np.float64)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def scores_from_outputs(raw: np.ndarray, task: TaskSpec) -> np.ndarray:
    """Class probabilities (N, K) from raw model outputs, by the manifest's output activation.

    A binary sigmoid model may emit one logit per image (probability of ``positive_class``) or one per class.
    """
    logits = np.asarray(raw, dtype=np.float64)
    n = logits.shape[0]
    logits = logits.reshape(n, -1)  # (N, K)
    k = len(task.classes)
    if task.output_activation == "softmax":
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)
    if logits.shape[1] == 1 and k == 2:
        p = _sigmoid(logits[:, 0])
        probs = np.empty((n, 2), dtype=np.float64)
        probs[:, task.positive_class] = p
        probs[:, 1 - task.positive_class] = 1.0 - p
        return probs
    return _sigmoid(logits)


@dataclass(frozen=True)
class ModelScores:
    """What one model run says about a batch of images: their class probabilities and, when the bundle has an
    input envelope, where each image's embedding lies relative to it (both from the same run)."""

    #: (N, K)
    probabilities: np.ndarray
    #: (N,) bool: outside the bundle's input envelope (``EnvelopeCheck.outside``); None without an envelope.
    outside_envelope: np.ndarray | None = None
    #: (N,) each image's squared Mahalanobis distance as a multiple of the envelope's threshold (above 1:
    #: outside); with an intensity part, the larger of the two parts' ratios. None without an envelope.
    envelope_ratio: np.ndarray | None = None
    #: (N,) bool: outside the envelope's intensity part (its grey values unlike the validation images');
    #: ``outside_envelope`` includes these. None without an intensity part.
    intensity_outside: np.ndarray | None = None
    #: (N,) bool: outside the intensity part, while the image's inverse lies well inside (it looks like a
    #: negative, ``IntensityCheck.judge``). None without an intensity part.
    negative: np.ndarray | None = None
    #: (N, D) the embedding the envelope judged, as the model gave it (the node keeps it for the envelope's
    #: federated refit). None without an envelope.
    embedding: np.ndarray | None = None
    #: (N, L) the images' own grey-value features the intensity part judged (not their inverses'). None
    #: without an intensity part.
    intensity_features: np.ndarray | None = None

    def split(self, sizes: Sequence[int]) -> list[ModelScores]:
        """The scores of consecutive groups of ``sizes`` images each (one per study of a batch)."""
        bounds = np.cumsum(sizes)[:-1]

        def parts(a: np.ndarray | None) -> list[np.ndarray | None]:
            return [None] * len(sizes) if a is None else list(np.split(a, bounds))

        return [
            ModelScores(p, o, r, i, n, e, f)
            for p, o, r, i, n, e, f in zip(
                np.split(self.probabilities, bounds),
                parts(self.outside_envelope),
                parts(self.envelope_ratio),
                parts(self.intensity_outside),
                parts(self.negative),
                parts(self.embedding),
                parts(self.intensity_features),
                strict=True,
            )
        ]


@dataclass
class LoadedModel:
    """A model ready to run; ``provider`` is what the session really got, not what was asked for."""

    manifest: Manifest
    backend: Backend
    model_file: str
    precision: str
    #: The clinic's personal head, added to the shared one when set (``ModelSlot`` keeps it current).
    personal: PersonalHead | None = None
    #: The manifest's input envelope as arrays (None without one), built once per loaded model.
    envelope: EnvelopeCheck | None = field(init=False, default=None, repr=False)
    #: The envelope's intensity part as arrays (None without one).
    intensity: IntensityCheck | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        found = self.manifest.envelope
        self.envelope = EnvelopeCheck.of(found) if found is not None else None
        if found is not None and found.intensity is not None:
            self.intensity = IntensityCheck.of(found.intensity)

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def provider(self) -> str:
        return self.backend.provider

    @property
    def requested_provider(self) -> str:
        """The provider asked for first; not ``provider`` when a GPU provider silently did not load."""
        return self.backend.requested_provider

    @property
    def preprocessing(self) -> Preprocessing:
        return self.manifest.preprocessing

    @property
    def task(self) -> TaskSpec:
        return self.manifest.task

    @property
    def input_shape(self) -> list[int]:
        return list(self.manifest.io.inputs[0].shape)

    @property
    def channels(self) -> int:
        shape = self.input_shape
        return shape[1] if len(shape) == 4 and shape[1] > 0 else 1

    @property
    def head(self) -> HeadSpec | None:
        """The final linear layer behind the embedding output; None for bundles exported without one."""
        return self.manifest.head

    def _step(self) -> int:
        fixed = self.input_shape[0] if self.input_shape and self.input_shape[0] > 0 else 0
        return fixed or MAX_BATCH

    def logits_and_embedding(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, H, W) → the model's own logits (N, K) and its embedding (N, D), from one run."""
        head = self.head
        if head is None:
            raise ModelError(
                f"model {self.model_id} {self.model_version} has no embedding output (exported before "
                "bundles carried one); learning on this node needs a bundle exported with it"
            )
        names = [head.prediction_output, head.embedding_output]
        step = self._step()
        parts = [self.backend.run_outputs(batch[i : i + step], names) for i in range(0, batch.shape[0], step)]
        if not parts:
            return np.zeros((0, head.num_outputs)), np.zeros((0, head.embedding_dim), dtype=np.float32)
        logits = np.concatenate([p[0] for p in parts], axis=0).reshape(batch.shape[0], -1)  # (N, K)
        embedding = np.concatenate([p[1] for p in parts], axis=0).reshape(batch.shape[0], -1)  # (N, D)
        return logits, embedding

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) → (N, D) float32: the final linear layer's input (the frozen backbone's output)."""
        return np.asarray(self.logits_and_embedding(np.asarray(batch))[1], dtype=np.float32)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) → (N, K) class probabilities, in chunks (fixed model batch size, else MAX_BATCH).

        With a personal head: backbone + (shared + personal) head, i.e. the bundle's logits plus the personal
        head's logits of the same embedding.
        """
        batch = np.asarray(batch)
        personal = self.personal  # read once: the slot may swap it between studies
        if personal is not None and self.head is not None:
            logits, embedding = self.logits_and_embedding(batch)
            return self._probabilities_of(logits, embedding, personal)
        step = self._step()
        parts = [self.backend.run(batch[i : i + step]) for i in range(0, batch.shape[0], step)]
        raw = np.concatenate(parts, axis=0) if parts else np.zeros((0, 1), dtype=np.float32)
        return scores_from_outputs(raw, self.task)

    def _probabilities_of(
        self, logits: np.ndarray, embedding: np.ndarray, personal: PersonalHead | None
    ) -> np.ndarray:
        """(N, K) probabilities from the bundle's logits, plus the personal head's logits of the embedding."""
        raw = logits.astype(np.float64)
        if personal is not None:
            raw = raw + personal.logits(embedding)  # (N, K)
        return scores_from_outputs(raw, self.task)

    def scores(self, batch: np.ndarray) -> ModelScores:
        """(N, C, H, W) → the probabilities and, when the bundle has an input envelope, each image's place
        relative to it, from ONE model run (the embedding judged is the one the probabilities came from),
        with the features judged (the embedding and, with an intensity part, the grey-value features).

        Without an envelope this is ``probabilities`` exactly, as before envelopes existed.
        """
        check = self.envelope
        if check is None:
            return ModelScores(self.probabilities(batch))
        personal = self.personal  # read once: the slot may swap it between studies
        batch = np.asarray(batch)
        logits, embedding = self.logits_and_embedding(batch)
        outside, ratio = check.judge(embedding)
        probabilities = self._probabilities_of(logits, embedding, personal)
        if self.intensity is None:
            return ModelScores(
                probabilities, outside_envelope=outside, envelope_ratio=ratio, embedding=embedding
            )
        seen = self.intensity.judge(self.grey(batch))
        return ModelScores(
            probabilities,
            outside_envelope=outside | seen.outside,
            envelope_ratio=np.maximum(ratio, seen.ratio),
            intensity_outside=seen.outside,
            negative=seen.negative,
            embedding=embedding,
            intensity_features=seen.features,
        )

    def grey(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) model input → (N, H, W) its grey values before normalisation (channel 0; every
        channel repeats the one grey image, preprocessing step 8)."""
        pre = self.preprocessing
        return np.asarray(batch[:, 0], dtype=np.float64) * float(pre.std[0]) + float(pre.mean[0])

    def warm_up(self) -> float:
        """Run one all-zero image through the model; returns the seconds it took.

        The first run of a session allocates its buffers (and TensorRT builds its engine): done at load, it
        does not land on the first study. A model that cannot run a plain input is broken: ModelError.
        """
        shape = [d if d > 0 else 1 for d in self.input_shape]  # dynamic dimensions (-1) become 1
        batch = np.zeros(shape, dtype=self.backend.input_dtype)  # (N, C, H, W), N = the fixed batch or 1
        t0 = time.perf_counter()
        try:
            probs = self.probabilities(batch)
        except Exception as exc:
            raise ModelError(
                f"model {self.model_id} {self.model_version} does not run ({type(exc).__name__}: {exc})"
            ) from exc
        if probs.shape[0] != shape[0] or not np.all(np.isfinite(probs)):
            raise ModelError(f"model {self.model_id} {self.model_version} gives no usable scores")
        return time.perf_counter() - t0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N,) scores: positive-class probability (binary) or the top class's probability (multiclass)."""
        probs = self.probabilities(batch)
        if self.task.kind == "binary":
            return np.asarray(probs[:, self.task.positive_class], dtype=np.float64)
        return np.asarray(probs.max(axis=1), dtype=np.float64)


def load_model(
    bundle: BundleView,
    providers: Sequence[str],
    threads: int,
    *,
    precision: Precision = "fp32",
    trt_engine_cache_dir: Path | None = None,
    trt_fp16: bool = False,
    runtime: Runtime | None = None,
) -> LoadedModel:
    """Open the bundle's model (or its ``precision`` variant) on the first provider that really loads."""
    manifest = bundle.manifest
    entry = pick_model_file(manifest, precision)
    path = bundle.path_of(entry)
    if not path.is_file():
        raise ModelError(f"model file {entry.path} is missing from the bundle; reinstall the bundle")
    options = BackendOptions(
        providers=tuple(providers),
        threads=threads,
        trt_engine_cache_dir=trt_engine_cache_dir,
        trt_fp16=trt_fp16,
    )
    backend = OnnxRuntimeBackend(path, options, runtime=runtime)
    used = "fp32" if entry.role == "model" else (entry.variant or "fp32")
    logger.info(
        "loaded model %s %s (%s, %s) on %s",
        manifest.model_id,
        manifest.model_version,
        entry.path,
        used,
        backend.provider,
    )
    return LoadedModel(manifest=manifest, backend=backend, model_file=entry.path, precision=used)
