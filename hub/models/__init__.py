"""Model registry and model families: `create_model("student_cnn_s")`, timm style."""

# Importing a family registers its models; every family is imported so that any checkpoint can be rebuilt.
from hub.models import fedhelp_nets, fl_cnn, hsl_mmoe, student, teacher
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
    "fedhelp_nets",
    "fl_cnn",
    "get_data_config",
    "hsl_mmoe",
    "is_model",
    "list_models",
    "register_model",
    "student",
    "teacher",
]
