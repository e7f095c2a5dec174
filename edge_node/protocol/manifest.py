"""The model bundle manifest: a self-describing, signed description of one exported model."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from edge_node.protocol.errors import SchemaError

#: Bumped on any incompatible change of the manifest; the edge refuses versions it does not know.
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"


VoiRule = Literal["header_window", "bit_depth", "min_max", "fixed"]
DEFAULT_VOI: tuple[VoiRule, ...] = ("header_window", "bit_depth")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassLabel(_Strict):
    index: int
    name: str
    #: SNOMED CT or other coded concept for the SR finding, e.g. ("233604007", "SCT", "Pneumonia").
    code_value: str | None = None
    code_scheme: str | None = None
    code_meaning: str | None = None


class TaskSpec(_Strict):
    """What the model answers."""

    kind: Literal["binary", "multiclass"]
    classes: list[ClassLabel]
    #: For binary tasks: the class whose probability is reported as the score.
    positive_class: int = 1
    #: Output transform applied to the raw logits: sigmoid of one logit, or softmax over classes.
    output_activation: Literal["sigmoid", "softmax"]
    #: Score at or above which the finding is reported as present.
    decision_threshold: float = 0.5


class TensorSpec(_Strict):
    name: str
    #: Shape with -1 for a dynamic dimension, e.g. [-1, 1, 28, 28] (N, C, H, W).
    shape: list[int]
    dtype: Literal["float32", "float16", "int8", "uint8"] = "float32"
    layout: Literal["NCHW"] = "NCHW"


class IOSpec(_Strict):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class HeadTensor(_Strict):
    """One tensor of the final linear layer, named as in the student's state dict."""

    name: str
    shape: list[int]


class HeadSpec(_Strict):
    """The model's final linear layer, for learners that train on the embedding output.

    The prediction output is exactly ``embedding @ weight.T + bias`` (checked at export), so a node can
    train a head on embeddings of its own images without the backbone's weights and send a delta named like
    the student's tensors (``weight.name``, ``bias.name``).
    """

    #: Name of the ONNX output that holds the head's input, (N, D).
    embedding_output: str
    #: Name of the ONNX output the head produces, (N, K) logits.
    prediction_output: str
    #: (K, D)
    weight: HeadTensor
    #: (K,)
    bias: HeadTensor

    @property
    def embedding_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def num_outputs(self) -> int:
        return int(self.weight.shape[0])


class GaussianEnvelope(_Strict):
    """A region of feature space: a point is outside when its squared Mahalanobis distance from ``mean``
    exceeds ``threshold``: ``|W (f - mean)|^2 > threshold``. ``W`` whitens a shrunk covariance of the
    features (``W Σ Wᵀ = I``). The mean and covariance come from the exporter's validation images; the
    threshold is the ``quantile`` of their cross-fitted distances (each image's distance from an envelope
    fitted on the other ``folds``), so about ``1 - quantile`` of images like the validation set fall outside
    by chance.
    """

    #: (D,)
    mean: list[float]
    #: (D, D)
    whitening: list[list[float]]
    threshold: float
    quantile: float
    #: Ledoit–Wolf weight of the scaled identity in the covariance (0 = the sample covariance).
    shrinkage: float
    #: Validation images the mean and covariance were fitted on, and the folds that set the threshold.
    fitted_on: int
    folds: int

    @property
    def dim(self) -> int:
        return len(self.mean)

    def _check_shape(self, d: int, what: str) -> None:
        if self.dim != d or len(self.whitening) != d or any(len(row) != d for row in self.whitening):
            raise ValueError(f"the {what} must be {d}-dimensional: mean (D,), whitening (D, D)")
        if not (0.0 < self.quantile < 1.0) or not self.threshold > 0.0:
            raise ValueError(f"the {what} needs 0 < quantile < 1 and a positive threshold")


class IntensityEnvelope(GaussianEnvelope):
    """Where the validation images' own grey values lie, whatever the model makes of them: the features
    are each image's grey-value quantiles at ``levels``, taken on the model input before normalisation
    (preprocessing step 7, values in [0, 1]). A model trained to ignore intensity changes embeds an
    inverted display much like a normal one; its histogram still says what happened.
    """

    #: Increasing, in [0, 1]: the quantiles of an image's grey values that are its features (D of them).
    levels: list[float]
    #: Each validation image also entered the fit this many times more, through the training augmentation
    #: (random gamma, contrast, offset, blur, noise): the grey values the model was trained to take in
    #: stride, not only the hub's own scanners'. ``fitted_on`` counts the images, not the copies.
    augmented_copies: int = 0


class InputEnvelope(GaussianEnvelope):
    """Where the model's embeddings of the images it was checked on lie (the features are the head's
    ``embedding_output``), and optionally where those images' grey values lie (``intensity``), so a node can
    tell an image unlike them (a scanner, a protocol or a display the model never saw) from one like them.
    An image outside either part is outside the envelope.
    """

    #: The images' own grey values; None for bundles exported before it existed.
    intensity: IntensityEnvelope | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_intensity(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        # Envelopes signed before the intensity part existed have no such key: keep their bytes.
        data = handler(self)
        if isinstance(data, dict) and data.get("intensity") is None:
            data.pop("intensity", None)
        return data


class Preprocessing(_Strict):
    """How an edge turns a DICOM instance into the model's input, step by step, in this order.

    1. modality filter: instances whose Modality is not in ``modalities`` are skipped with a reason;
    2. frames: a multi-frame instance contributes the frame chosen by ``frame_rule``; a multi-slice series
       (several single-frame instances of one series) contributes the slice chosen by ``series_rule``;
    3. Modality LUT / RescaleSlope+Intercept when ``apply_modality_lut``;
    4. VOI: ``voi`` picks the first rule that applies, in the order given:
       ``header_window`` (WindowCenter/Width or VOI LUT in the header),
       ``bit_depth`` (stored values scaled by 2**BitsStored - 1), ``min_max`` (per image),
       ``fixed`` (``fixed_window`` = (center, width));
       the result lies in [0, 1];
    5. MONOCHROME1 is inverted so that bright always means dense (MONOCHROME2 convention);
    6. colour (RGB/YBR) becomes one channel by ``color`` (``luminance``: ITU-R BT.601 weights);
    7. resize to ``size`` (H, W) with ``interpolation`` (area averaging when shrinking is what the training
       data saw: MedMNIST is downsampled with area averaging);
    8. normalise: (x - mean) / std, per channel.
    """

    modalities: list[str]
    frame_rule: Literal["middle", "first"] = "middle"
    series_rule: Literal["each_instance", "middle_slice"] = "each_instance"
    apply_modality_lut: bool = True
    voi: list[VoiRule] = Field(default_factory=lambda: list(DEFAULT_VOI))
    fixed_window: tuple[float, float] | None = None
    invert_monochrome1: bool = True
    color: Literal["luminance", "reject"] = "luminance"
    size: tuple[int, int]
    interpolation: Literal["area", "bilinear"] = "area"
    mean: list[float]
    std: list[float]
    #: Images larger than this (rows or columns) are refused as absurd before decoding.
    max_dimension: int = 16384


class FileEntry(_Strict):
    path: str
    sha256: str
    size: int
    role: Literal["model", "variant", "engine", "other"] = "model"
    #: For variants: "int8", "fp16"; for engines: a description.
    variant: str | None = None


class EngineEntry(_Strict):
    """A prebuilt TensorRT engine; valid only for this TensorRT version and GPU compute capability."""

    path: str
    tensorrt_version: str
    compute_capability: str
    precision: Literal["fp32", "fp16", "int8"]


class Producer(_Strict):
    fedclinic_version: str
    git_revision: str | None = None
    torch_version: str | None = None
    onnx_version: str | None = None
    onnxruntime_version: str | None = None
    opset: int


class Provenance(_Strict):
    """Where the weights came from and how good they were on held-out data."""

    training: str
    dataset: str
    federation: str | None = None
    round: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    parity_max_abs_diff: float | None = None
    created_at: str


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    model_id: str
    model_version: str
    description: str = ""
    task: TaskSpec
    io: IOSpec
    preprocessing: Preprocessing
    files: list[FileEntry]
    engines: list[EngineEntry] = Field(default_factory=list)
    producer: Producer
    provenance: Provenance
    min_edge_version: str = "0.1.0"
    #: The final linear layer behind the embedding output; None for bundles exported without one.
    head: HeadSpec | None = None
    #: Where the embeddings of the validation images lie; None for bundles exported without one.
    envelope: InputEnvelope | None = None

    @model_validator(mode="after")
    def _envelope_fits_head(self) -> Manifest:
        env = self.envelope
        if env is None:
            return self
        if self.head is None:
            raise ValueError("an input envelope needs the head's embedding output; the manifest has no head")
        env._check_shape(self.head.embedding_dim, "input envelope")
        if env.intensity is not None:
            levels = env.intensity.levels
            env.intensity._check_shape(len(levels), "intensity envelope")
            if not levels or any(not 0.0 <= v <= 1.0 for v in levels) or sorted(set(levels)) != levels:
                raise ValueError("the intensity envelope's levels must increase strictly within [0, 1]")
            if env.intensity.quantile != env.quantile:
                # A node's monitor and drift alarm use one chance rate for both parts.
                raise ValueError("the intensity envelope's quantile must be the input envelope's")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_parts(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        # Bundles signed before the head (or the envelope) existed have no such key: leaving them out when
        # absent keeps those bundles' canonical bytes, and so their signatures, valid.
        data = handler(self)
        if isinstance(data, dict):
            for key in ("head", "envelope"):
                if data.get(key) is None:
                    data.pop(key, None)
        return data

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
        return canonical_json(self.model_dump(mode="json"))

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise SchemaError(f"manifest lists no file {path!r}")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_manifest(raw: bytes) -> Manifest:
    """Parse manifest bytes, refusing unknown schema versions with a message that says what to do."""
    return validate_manifest(load_manifest_dict(raw))


#: A manifest is a few kB; anything far larger is refused before it is parsed.
MAX_MANIFEST_BYTES = 1024 * 1024


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice is refused (which one a reader keeps is not defined)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SchemaError(f"manifest.json gives the key {key!r} twice; refusing an ambiguous manifest")
        out[key] = value
    return out


def load_manifest_dict(raw: bytes) -> dict[str, Any]:
    """Decode manifest bytes to a JSON object and check its schema version, without validating the rest.

    Bundle verification needs this first step alone: the version decides whether this edge can check the
    signature and the schema at all, so an unknown version is reported as such, before anything else.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SchemaError(
            f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes; this is not a fedclinic manifest"
        )
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"manifest.json is not valid JSON ({exc}); re-export the bundle") from exc
    except RecursionError:
        raise SchemaError("manifest.json is nested too deeply to be a manifest; refusing it") from None
    if not isinstance(data, dict):
        raise SchemaError("manifest.json must hold a JSON object; re-export the bundle")
    version = data.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise SchemaError(
            f"bundle manifest schema version {version!r} is not supported by this edge "
            f"(supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)}); upgrade fedclinic on this node "
            "or export the bundle for this schema"
        )
    return data


def validate_manifest(data: dict[str, Any]) -> Manifest:
    """Validate a decoded manifest object (from ``load_manifest_dict``) against the schema."""
    version = data.get("schema_version")
    try:
        return Manifest.model_validate(data)
    except ValueError as exc:
        raise SchemaError(f"manifest.json does not match schema {version}: {exc}") from exc
