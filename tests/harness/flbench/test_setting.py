"""Settings as data: the shipped clinics and panel files, Zipf sizes, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.flbench.partition import clinic_sizes
from harness.flbench.profiles import CLINIC_PROFILES, UNSEEN_PROFILE, render
from harness.flbench.setting import (
    DEFAULT_PANEL,
    DEFAULT_SETTING,
    SETTINGS_DIR,
    load_panel,
    load_setting,
)


def test_default_file_is_the_six_clinic_setting() -> None:
    s = load_setting(DEFAULT_SETTING)
    assert s.names == tuple("ABCDEF") and s.large == ("A", "B") and s.small == tuple("CDEF")
    assert {c.name: c.profile for c in s.clinics} == CLINIC_PROFILES
    assert s.unseen["unseen"] == UNSEEN_PROFILE
    assert [c.prevalence for c in s.clinics] == [0.75, 0.5, 0.85, 0.3, 0.9, 0.2]
    # The documented sizes: 2825/942/94/71/47/24 pneumonia, 326/108/40/32/24/16 breast train images.
    assert clinic_sizes(4708, [c.share("pneumonia") for c in s.clinics]) == [2825, 942, 94, 71, 47, 24]
    assert clinic_sizes(546, [c.share("breast") for c in s.clinics]) == [326, 108, 40, 32, 24, 16]


def test_zipf16_has_sixteen_clinics_with_zipf_sizes() -> None:
    s = load_setting(SETTINGS_DIR / "zipf16.toml")
    assert len(s.clinics) == 16 and len(s.small) == 12
    shares = np.array([c.share("pneumonia") for c in s.clinics])
    ratio = shares[0] / shares  # Zipf: share_k ∝ k^-s, so share_1/share_k = k^s
    np.testing.assert_allclose(np.log(ratio[1:]) / np.log(np.arange(2, 17)), 1.1, atol=1e-3)


def test_grouped_file_is_the_six_clinics_in_two_scanner_groups_that_match_the_label_groups() -> None:
    six, grouped = load_setting(DEFAULT_SETTING), load_setting(SETTINGS_DIR / "six-clinics-grouped.toml")
    assert [(c.name, c.small, c.prevalence, dict(c.shares)) for c in grouped.clinics] == [
        (c.name, c.small, c.prevalence, dict(c.shares)) for c in six.clinics
    ]
    profile = {c.name: c.profile for c in grouped.clinics}
    assert profile["A"] == profile["C"] == profile["E"] == CLINIC_PROFILES["C"]
    assert profile["B"] == profile["D"] == profile["F"] == CLINIC_PROFILES["D"]
    # The groups are the clinics that the similarity graph joins by label mix: high vs low prevalence.
    high = {c.name for c in grouped.clinics if c.prevalence >= 0.75}
    assert high == {"A", "C", "E"}


@pytest.mark.parametrize("path", [DEFAULT_PANEL, SETTINGS_DIR / "unseen-panel-b.toml"], ids=lambda p: p.stem)
def test_panel_is_outside_the_augmentation_envelope(path: Path) -> None:
    panel = load_panel(path)
    assert len(panel) >= 4
    # Every panel profile uses at least one operation the training augmentation never produces.
    for name, p in panel.items():
        assert (
            p.poisson_photons or p.speckle_sd or p.jpeg_quality or p.invert or p.rotate_deg or p.collimation
        ), name
    x = np.random.default_rng(0).random((4, 28, 28)).astype(np.float32)
    for p in panel.values():
        y = render(x, p, np.random.default_rng(1))
        assert y.shape == x.shape and y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = 'x'\n", "at least two"),
        ("[[clinic]]\nname='A'\nshare={pneumonia=0.5}\nprevalence=0.5\n[[clinic]]\nname='B'\n", "lacks"),
        (
            "[[clinic]]\nname='A'\nshare={pneumonia=0.5}\nprevalence=1.5\nsmall=true\n"
            "[[clinic]]\nname='B'\nshare={pneumonia=0.5}\nprevalence=0.5\n",
            "prevalence",
        ),
        (
            "[[clinic]]\nname='A'\nshare={pneumonia=0.5}\nprevalence=0.5\nsmall=true\nprofile={gama=1.0}\n"
            "[[clinic]]\nname='B'\nshare={pneumonia=0.5}\nprevalence=0.5\n",
            "unknown profile keys",
        ),
        (
            "[[clinic]]\nname='A'\nshare={pneumonia=0.5}\nprevalence=0.5\nsmall=true\n"
            "[[clinic]]\nname='B'\nshare={pneumonia=0.5}\nprevalence=0.5\n",
            "unseen",
        ),
        ("[[clinic]\n", "not valid TOML"),
    ],
)
def test_bad_clinics_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "clinics.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_setting(path)


def test_missing_panel_file_and_wrong_types_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_panel(tmp_path / "nope.toml")
    bad = tmp_path / "panel.toml"
    bad.write_text("[profile.p]\ninvert = 1\n")
    with pytest.raises(ValueError, match="invert must be a bool"):
        load_panel(bad)
