"""A benchmark setting as data: clinics (size share, label skew, acquisition profile) and unseen panels."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.flbench.profiles import AcquisitionProfile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SETTINGS_DIR = Path(__file__).parent / "clinics"
#: The six-clinic setting of docs/benchmarks.md (two hospitals, four small clinics).
DEFAULT_SETTING = SETTINGS_DIR / "six-clinics.toml"
#: Unseen clinics outside the augmentation envelope, fixed before any method was tuned on this benchmark.
DEFAULT_PANEL = SETTINGS_DIR / "unseen-panel.toml"

_PROFILE_KEYS = {f.name: f.type for f in fields(AcquisitionProfile)}


@dataclass(frozen=True)
class ClinicSpec:
    """One simulated clinic: its share of each task's train split, label skew, scanner profile.

    The label skew is ``prevalence``, the fraction of images with a finding (any class above 0), and, for a
    task with more than two classes, optionally ``mixes[task]``: the clinic's own proportion of every class.
    """

    name: str
    small: bool
    shares: Mapping[str, float]
    prevalence: float
    profile: AcquisitionProfile
    mixes: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def share(self, task: str) -> float:
        if task not in self.shares:
            raise ValueError(f"clinic {self.name} has no share for task {task!r}")
        return self.shares[task]

    def label_mix(self, task: str, base: Sequence[float]) -> tuple[float, ...]:
        """The clinic's proportion of each class; ``base`` is the split's own (its length is K).

        Two classes: (1 − prevalence, prevalence). K classes: the clinic file's ``mix.<task>`` if it has
        one, else the prevalence spread over the classes above 0 as the split spreads them (so a file
        written for binary tasks skews a grading task the same way: how many images show a finding).
        """
        if len(base) == 2:
            return (1.0 - self.prevalence, self.prevalence)
        if task in self.mixes:
            mix = self.mixes[task]
            if len(mix) != len(base):
                raise ValueError(
                    f"clinic {self.name}: mix.{task} has {len(mix)} classes, the task {len(base)}"
                )
            return tuple(v / sum(mix) for v in mix)
        findings = sum(base[1:])
        return (1.0 - self.prevalence, *(self.prevalence * b / findings for b in base[1:]))


@dataclass(frozen=True)
class BenchSetting:
    """The clinics of a benchmark and its own unseen clinic(s), read from a TOML file."""

    name: str
    clinics: tuple[ClinicSpec, ...]
    unseen: Mapping[str, AcquisitionProfile]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.clinics)

    @property
    def small(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.clinics if c.small)

    @property
    def large(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.clinics if not c.small)


def parse_profile(where: str, table: Mapping[str, Any]) -> AcquisitionProfile:
    """An ``AcquisitionProfile`` from a TOML table; unknown keys and wrong types are errors."""
    unknown = sorted(set(table) - set(_PROFILE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown profile keys {unknown}; known: {', '.join(_PROFILE_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = str(_PROFILE_KEYS[key])
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value)
        if not ok:
            raise ValueError(f"{where}: {key} must be a {kind}, got {value!r}")
        values[key] = value
    return AcquisitionProfile(**values)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"settings file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None


def load_setting(path: Path = DEFAULT_SETTING) -> BenchSetting:
    """Read a clinics file: ``[[clinic]]`` tables (name, small, share.<task>, prevalence, optional
    mix.<task> class proportions, [clinic.profile]) and ``[unseen.<name>]`` profile tables."""
    doc = _read(path)
    raw = doc.get("clinic")
    if not isinstance(raw, list) or len(raw) < 2:
        raise ValueError(f"{path}: needs at least two [[clinic]] tables")
    clinics = []
    for k, c in enumerate(raw):
        where = f"{path}: clinic #{k + 1}"
        missing = {"name", "share", "prevalence"} - set(c)
        if missing:
            raise ValueError(f"{where} lacks {sorted(missing)}")
        shares = {str(t): float(v) for t, v in c["share"].items()}
        prevalence = float(c["prevalence"])
        if not 0.0 < prevalence < 1.0 or any(not 0.0 < v <= 1.0 for v in shares.values()):
            raise ValueError(f"{where}: prevalence must lie in (0, 1) and shares in (0, 1]")
        mixes = {str(t): tuple(float(v) for v in m) for t, m in c.get("mix", {}).items()}
        if any(len(m) < 3 or min(m) < 0 or sum(m) <= 0 for m in mixes.values()):
            raise ValueError(f"{where}: a mix lists ≥ 3 class proportions, none negative, not all 0")
        clinics.append(
            ClinicSpec(
                str(c["name"]),
                bool(c.get("small", False)),
                shares,
                prevalence,
                parse_profile(f"{where} profile", c.get("profile", {})),
                mixes,
            )
        )
    names = [c.name for c in clinics]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: clinic names repeat: {names}")
    if not any(c.small for c in clinics):
        raise ValueError(f"{path}: mark at least one clinic small = true (the small-clinic metric needs one)")
    unseen = {str(n): parse_profile(f"{path}: unseen {n}", t) for n, t in doc.get("unseen", {}).items()}
    if not unseen:
        raise ValueError(f"{path}: needs at least one [unseen.<name>] profile")
    return BenchSetting(str(doc.get("name", path.stem)), tuple(clinics), unseen)


def load_panel(path: Path = DEFAULT_PANEL) -> dict[str, AcquisitionProfile]:
    """An unseen-clinic panel: ``[profile.<name>]`` tables, each a clinic no method trains on."""
    doc = _read(path)
    panel = {str(n): parse_profile(f"{path}: profile {n}", t) for n, t in doc.get("profile", {}).items()}
    if not panel:
        raise ValueError(f"{path}: needs at least one [profile.<name>] table")
    return panel
