"""The model registry: names, factories, shapes, sizes and each model's data config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hub.models import create_model, get_data_config, list_models, register_model
from hub.models.common import PNEUMONIA_28, count_parameters
from hub.models.registry import DataConfig


def test_both_families_are_registered() -> None:
    assert {"student_cnn_s", "teacher_cnn_l"} <= set(list_models())
    assert list_models("student_*") == ["student_cnn_s"]


@pytest.mark.parametrize("name", ["student_cnn_s", "teacher_cnn_l"])
def test_models_map_a_grey_batch_to_one_logit(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(3, 1, 28, 28)  # (B, C, H, W)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (3, 1)
    assert model.data_config == get_data_config(name)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_student_is_compact_and_teacher_is_larger() -> None:
    student = count_parameters(create_model("student_cnn_s"))
    teacher = count_parameters(create_model("teacher_cnn_l"))
    assert student < 1_000_000
    assert 1_000_000 < teacher < 5_000_000
    assert teacher > 10 * student


def test_factory_keywords_are_the_model_config() -> None:
    wide = create_model("student_cnn_s", width=32)
    assert count_parameters(wide) > count_parameters(create_model("student_cnn_s"))
    with pytest.raises(TypeError):
        create_model("student_cnn_s", no_such_option=1)


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="student_cnn_s"):
        create_model("resnet9000")


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):

        @register_model(data_config=PNEUMONIA_28)
        def student_cnn_s() -> nn.Module:  # same name as the real one
            return nn.Identity()


def test_preprocess_is_x_over_255_then_standardised() -> None:
    cfg = get_data_config("student_cnn_s")
    images = np.array([[[0, 255], [128, 64]]], dtype=np.uint8)
    small = DataConfig(input_size=(1, 2, 2), mean=cfg.mean, std=cfg.std, labels=cfg.labels)
    x = small.preprocess(images)
    assert x.shape == (1, 1, 2, 2) and x.dtype == np.float32
    expected = (images.astype(np.float64) / 255.0 - cfg.mean[0]) / cfg.std[0]
    np.testing.assert_allclose(x[:, 0], expected, rtol=1e-6)


def test_preprocess_refuses_wrong_dtype_and_shape() -> None:
    cfg = get_data_config("student_cnn_s")
    with pytest.raises(ValueError, match="uint8"):
        cfg.preprocess(np.zeros((1, 28, 28), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        cfg.preprocess(np.zeros((1, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        cfg.preprocess(np.zeros((1, 28, 28, 4), dtype=np.uint8))


def test_preprocess_turns_rgb_into_the_edges_bt601_luma() -> None:
    cfg = get_data_config("student_cnn_s")
    rgb = np.zeros((1, 28, 28, 3), dtype=np.uint8)
    rgb[0, 0, 0] = (255, 0, 0)
    rgb[0, 0, 1] = (0, 0, 255)
    grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    want = cfg.preprocess(np.zeros((1, 28, 28), dtype=np.uint8))
    want[0, 0] += np.float32(grey[0] / 255.0 / cfg.std[0])
    assert cfg.preprocess(rgb) == pytest.approx(want, abs=1e-6)


def test_data_config_round_trips_through_a_dict() -> None:
    cfg = get_data_config("teacher_cnn_l")
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
