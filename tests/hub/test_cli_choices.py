"""The hub CLI's choice enums name exactly what the registries hold."""

from __future__ import annotations

import hub.models
from hub.commands.choices import DatasetName, ModelName, Split
from hub.data.medmnist import LABELS, OFFICIAL_MD5


def test_choices_match_the_model_registry_and_the_dataset_table() -> None:
    assert sorted(m.value for m in ModelName) == sorted(hub.models.list_models())
    assert sorted(d.value for d in DatasetName) == sorted(OFFICIAL_MD5) == sorted(LABELS)
    assert [s.value for s in Split] == ["train", "val", "test"]
