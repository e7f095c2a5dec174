"""The ``[learning]`` section of edge.toml: how this node trains when a round asks it to."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["LearningSettings"]


class LearningSettings(BaseModel):
    """``torch_command``: the external learner (``["fedclinic-learn"]`` with ``fedclinic[train]``); unset, the
    node refuses ``weights_delta`` tasks with that reason. ``torch_timeout_s``: longest one task may train.
    ``training_set_file``: a labeled set already preprocessed as the installed bundle says (npz with ``x``
    float32 (N, C, H, W), ``y`` int64 (N,), ``sop_instance_uids``), e.g. a hospital's archive prepared once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    torch_command: list[str] | None = None
    torch_timeout_s: float = Field(default=3600.0, gt=0)
    training_set_file: Path | None = None

    @field_validator("torch_command")
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0].strip()):
            raise ValueError('give the learner command as a list, e.g. ["fedclinic-learn"]')
        return value
