"""Tiny ONNX models and model bundles for edge tests, written as raw protobuf: no `onnx` package needed.

The edge-only environment has onnxruntime but neither torch nor onnx, so a test model is encoded by hand: a
linear classifier ``logits = flatten(x) @ W.T + b`` whose output numpy can recompute exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_node.protocol.manifest import (
    ClassLabel,
    FileEntry,
    IOSpec,
    Manifest,
    Preprocessing,
    Producer,
    Provenance,
    TaskSpec,
    TensorSpec,
)

__all__ = ["LinearModel", "ToyBundle", "linear_classifier_onnx", "make_bundle"]

_FLOAT = 1  # TensorProto.FLOAT
_ATTR_INT = 2  # AttributeProto.INT


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _str(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


def _tensor(name: str, arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype="<f4")
    dims = b"".join(_int(1, d) for d in arr.shape)
    return dims + _int(2, _FLOAT) + _str(8, name) + _bytes(9, arr.tobytes())


def _value_info(name: str, shape: list[int | str]) -> bytes:
    dims = b""
    for d in shape:
        dim = _str(2, d) if isinstance(d, str) else _int(1, d)
        dims += _bytes(1, dim)
    tensor_type = _int(1, _FLOAT) + _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(
    op: str, inputs: list[str], outputs: list[str], name: str, attrs: dict[str, int] | None = None
) -> bytes:
    body = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    body += _str(3, name) + _str(4, op)
    for key, value in (attrs or {}).items():
        body += _bytes(5, _str(1, key) + _int(3, value) + _int(20, _ATTR_INT))
    return body


def linear_classifier_onnx(
    weights: np.ndarray,
    bias: np.ndarray,
    input_shape: tuple[int, int, int],
    input_name: str = "input",
    output_name: str = "logits",
) -> bytes:
    """A serialised ONNX model: (N, C, H, W) float32 → (N, K) = flatten(x) @ weights.T + bias."""
    k, d = weights.shape
    if d != int(np.prod(input_shape)):
        raise ValueError("weights do not match the input shape")
    graph = b"".join(
        [
            _bytes(1, _node("Flatten", [input_name], ["flat"], "flatten", {"axis": 1})),
            _bytes(1, _node("MatMul", ["flat", "w"], ["mm"], "matmul")),
            _bytes(1, _node("Add", ["mm", "b"], [output_name], "add")),
            _str(2, "linear"),
            _bytes(5, _tensor("w", np.asarray(weights, dtype=np.float32).T)),
            _bytes(5, _tensor("b", np.asarray(bias, dtype=np.float32))),
            _bytes(11, _value_info(input_name, ["batch", *input_shape])),
            _bytes(12, _value_info(output_name, ["batch", k])),
        ]
    )
    opset = _str(1, "") + _int(2, 17)
    return _int(1, 8) + _str(2, "fedclinic-tests") + _bytes(7, graph) + _bytes(8, opset)


@dataclass(frozen=True)
class LinearModel:
    weights: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        flat = np.asarray(batch, dtype=np.float64).reshape(batch.shape[0], -1)
        return flat @ self.weights.astype(np.float32).astype(np.float64).T + self.bias.astype(np.float64)


@dataclass(frozen=True)
class ToyBundle:
    """Satisfies ``edge_node.inference.loaded_model.BundleView`` like a VerifiedBundle (no signature)."""

    root: Path
    manifest: Manifest
    model: LinearModel

    def path_of(self, entry: FileEntry) -> Path:
        return self.root / entry.path


def _entry(root: Path, name: str, data: bytes, role: str, variant: str | None = None) -> FileEntry:
    (root / name).write_bytes(data)
    return FileEntry(
        path=name,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        role=role,
        variant=variant,
    )


def make_bundle(
    root: Path,
    *,
    modalities: tuple[str, ...] = ("CR", "DX"),
    size: tuple[int, int] = (28, 28),
    kind: str = "binary",
    seed: int = 0,
    with_int8_variant: bool = False,
    preprocessing: Preprocessing | None = None,
) -> ToyBundle:
    """A bundle directory with a linear model (one sigmoid logit for binary, 3-class softmax otherwise)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = 1 if kind == "binary" else 3
    d = size[0] * size[1]
    weights = (rng.standard_normal((k, d)) * 0.05).astype(np.float32)
    bias = (rng.standard_normal(k) * 0.1).astype(np.float32)
    files = [_entry(root, "model.onnx", linear_classifier_onnx(weights, bias, (1, *size)), "model")]
    if with_int8_variant:
        # A distinguishable stand-in for an int8 file: same graph, other weights (selection is tested).
        files.append(
            _entry(
                root,
                "model.int8.onnx",
                linear_classifier_onnx(-weights, -bias, (1, *size)),
                "variant",
                "int8",
            )
        )
    if kind == "binary":
        classes = [
            ClassLabel(index=0, name="normal"),
            ClassLabel(
                index=1, name="pneumonia", code_value="233604007", code_scheme="SCT", code_meaning="Pneumonia"
            ),
        ]
        task = TaskSpec(kind="binary", classes=classes, positive_class=1, output_activation="sigmoid")
    else:
        classes = [ClassLabel(index=i, name=f"grade{i}") for i in range(3)]
        task = TaskSpec(kind="multiclass", classes=classes, output_activation="softmax")
    pre = preprocessing or Preprocessing(modalities=list(modalities), size=size, mean=[0.5], std=[0.5])
    manifest = Manifest(
        model_id="test-student",
        model_version="1.2.3",
        task=task,
        io=IOSpec(
            inputs=[TensorSpec(name="input", shape=[-1, 1, *size])],
            outputs=[TensorSpec(name="logits", shape=[-1, k])],
        ),
        preprocessing=pre,
        files=files,
        producer=Producer(fedclinic_version="0.1.0", opset=17),
        provenance=Provenance(
            training="unit test", dataset="random weights", created_at="2026-11-22T00:00:00Z"
        ),
    )
    (root / "manifest.json").write_bytes(manifest.canonical_bytes())
    return ToyBundle(root=root, manifest=manifest, model=LinearModel(weights=weights, bias=bias))
