"""Model registry: `@register_model` factories, `create_model(name, **cfg)`, and each model's data config."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
from torch import nn

__all__ = [
    "DataConfig",
    "ModelEntry",
    "create_model",
    "get_data_config",
    "get_entry",
    "is_model",
    "list_models",
    "register_model",
]


#: ITU-R BT.601 luma weights (R, G, B), the edge preprocessing's colour → grey.
BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)


@dataclass(frozen=True)
class DataConfig:
    """How images must look when they reach the model: what a bundle's preprocessing is built from.

    The model sees ``(x / 255 - mean) / std`` of an 8-bit grey image resized to ``input_size[1:]`` with
    ``interpolation``: exactly what an edge computes from a DICOM instance, so training and inference agree.
    """

    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    interpolation: str = "area"
    #: Number of logits the model emits: 1 for a binary task (sigmoid), else one per label (softmax).
    num_outputs: int = 1

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """8-bit images (N, H, W), or RGB (N, H, W, 3), -> model input (N, C, H, W) float32: x/255, then
        (x - mean) / std. RGB becomes one channel with BT.601 luma weights, as the edge does (colour
        "luminance" in the manifest's preprocessing)."""
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        c, h, w = self.input_size
        if images.ndim == 4 and images.shape[-1] == 3:
            grey = images.astype(np.float64) @ BT601  # (N, H, W), the edge's luminance
        elif images.ndim == 3:
            grey = images.astype(np.float64)
        else:
            raise ValueError(
                f"expected grey (N, {h}, {w}) or RGB (N, {h}, {w}, 3) images, got shape {images.shape}"
            )
        if grey.shape[1:] != (h, w) or c != 1:
            raise ValueError(
                f"expected images of shape (N, {h}, {w}) for a {c}-channel input, got {images.shape}"
            )
        x = grey.astype(np.float32)[:, None, :, :] / np.float32(255.0)  # (N, 1, H, W) in [0, 1]
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        return cls(
            input_size=(int(data["input_size"][0]), int(data["input_size"][1]), int(data["input_size"][2])),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            labels=tuple(str(v) for v in data["labels"]),
            interpolation=str(data.get("interpolation", "area")),
            num_outputs=int(data.get("num_outputs", 1)),
        )


ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: ModelFactory
    data_config: DataConfig
    family: str
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(*, data_config: DataConfig, description: str = "") -> Callable[[F], F]:
    """Register a model factory under its function name; the factory's keyword arguments are its config."""

    def decorator(factory: F) -> F:
        name = factory.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice ({factory.__module__})")
        family = factory.__module__.rsplit(".", 1)[-1]
        _REGISTRY[name] = ModelEntry(
            name=name,
            factory=factory,
            data_config=data_config,
            family=family,
            description=description or (factory.__doc__ or "").strip().splitlines()[0],
        )
        return factory

    return decorator


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def create_model(name: str, **cfg: Any) -> nn.Module:
    """Build a registered model with its factory's keyword arguments; the model carries ``data_config``."""
    entry = _entry(name)
    model = entry.factory(**cfg)
    # Like timm's pretrained_cfg: the module knows the preprocessing it was built for.
    model.data_config = entry.data_config  # type: ignore[assignment]
    return model


def get_data_config(name: str) -> DataConfig:
    return _entry(name).data_config


def get_entry(name: str) -> ModelEntry:
    return _entry(name)


def is_model(name: str) -> bool:
    return name in _REGISTRY


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
