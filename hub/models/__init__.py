"""Model registry and model families: `create_model("student_cnn_s")`, timm style."""

from hub.models import student, teacher
from hub.models.registry import (
    DataConfig,
    create_model,
    get_data_config,
    is_model,
    list_models,
    register_model,
)

__all__ = [
    "DataConfig",
    "create_model",
    "get_data_config",
    "is_model",
    "list_models",
    "register_model",
    "student",
    "teacher",
]
