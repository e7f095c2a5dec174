"""K-class tasks in `bench fl`: label mixes, the grading partition, macro scores, K-class training losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from harness.cli import app
from harness.flbench.datasets import TASKS, mix_sample, unit_images
from harness.flbench.partition import mix_counts, partition_indices
from harness.flbench.scoring import threshold_metrics, validation_threshold
from harness.flbench.setting import load_setting
from hub.training.checkpoint import load_checkpoint
from hub.training.fedhelp_kd import class_kl, class_ranking_hinge, large_loss, proxy_loss
from hub.training.hsl_train import balance_primary
from hub.training.learners import supervised_loss


def test_mix_counts_are_exact_and_keep_every_grade_present() -> None:
    assert mix_counts(100, [0.5, 0.2, 0.15, 0.1, 0.05]) == (50, 20, 15, 10, 5)
    tiny = mix_counts(6, [0.9, 0.025, 0.025, 0.025, 0.025])
    assert sum(tiny) == 6 and min(tiny) == 1  # room for all five: each grade at least once
    assert mix_counts(24, [0.8, 0.2]) == (19, 5)  # two classes: the binary rule (class_counts)
    with pytest.raises(ValueError, match="proportions"):
        mix_counts(10, [1.0])


def test_partition_by_class_mix_gives_each_clinic_its_grades() -> None:
    labels = np.repeat(np.arange(5), [486, 128, 206, 194, 66])  # RetinaMNIST's train split
    mixes = [(0.45, 0.12, 0.19, 0.18, 0.06), (0.8, 0.05, 0.05, 0.05, 0.05), (0.1, 0.1, 0.3, 0.3, 0.2)]
    parts = partition_indices(labels, [600, 80, 40], mixes, np.random.default_rng(0))
    for idx, size, mix in zip(parts, [600, 80, 40], mixes, strict=True):
        assert len(idx) == size
        assert tuple(np.bincount(labels[idx], minlength=5)) == mix_counts(size, mix)
    small = np.concatenate(parts[1:])
    assert len(np.unique(small)) == len(small)


def test_clinic_prevalence_skews_a_grading_task_and_a_mix_overrides_it(tmp_path: Path) -> None:
    setting = load_setting()
    base = [0.45, 0.12, 0.19, 0.18, 0.06]
    f = next(c for c in setting.clinics if c.name == "F")  # prevalence 0.2
    mix = f.label_mix("retina", base)
    assert mix[0] == pytest.approx(0.8) and sum(mix) == pytest.approx(1.0)
    assert mix[1] / mix[2] == pytest.approx(base[1] / base[2])  # the findings keep the split's grade mix
    assert f.label_mix("pneumonia", [0.3, 0.7]) == (0.8, 0.2)
    text = (
        '[[clinic]]\nname = "A"\nsmall = true\nshare = { retina = 0.5 }\nprevalence = 0.5\n'
        "mix = { retina = [1, 1, 1, 1, 6] }\n"
        '[[clinic]]\nname = "B"\nshare = { retina = 0.5 }\nprevalence = 0.5\n[unseen.u]\ngamma = 1.2\n'
    )
    (tmp_path / "s.toml").write_text(text)
    a = load_setting(tmp_path / "s.toml").clinics[0]
    assert a.label_mix("retina", base) == pytest.approx((0.1, 0.1, 0.1, 0.1, 0.6))
    (tmp_path / "bad.toml").write_text(text.replace("[1, 1, 1, 1, 6]", "[1, -1, 1]"))
    with pytest.raises(ValueError, match="mix"):
        load_setting(tmp_path / "bad.toml")


def test_mix_sample_hits_the_mix_without_replacement() -> None:
    labels = np.repeat(np.arange(5), [174, 46, 92, 68, 20])  # RetinaMNIST's test split
    idx = mix_sample(labels, (0.8, 0.05, 0.05, 0.05, 0.05), np.random.default_rng(0))
    assert len(np.unique(idx)) == len(idx)
    counts = np.bincount(labels[idx], minlength=5)
    assert counts[0] == 174 and counts[1:] == pytest.approx([11] * 4, abs=1)


def test_colour_images_become_bt601_luma() -> None:
    rgb = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    rgb[0, 0, 0] = (255, 0, 0)
    rgb[0, 1, 1] = (0, 255, 0)
    grey = unit_images(rgb)
    assert grey.shape == (1, 2, 2)
    assert grey[0, 0, 0] == pytest.approx(0.299) and grey[0, 1, 1] == pytest.approx(0.587)
    assert grey[0, 0, 1] == 0.0
    assert TASKS["retina"].num_outputs == 5 and TASKS["pneumonia"].num_outputs == 1


def test_multiclass_scores_macro_auc_balanced_accuracy_and_any_finding() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(3)[[0, 0, 1, 2, 2, 2]] * 4.0  # one grade-1 image called grade 2
    m = threshold_metrics(y, logits, validation_threshold(y, logits))
    assert math.isnan(validation_threshold(y, logits))  # the argmax decides: no threshold
    assert m["bacc"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["sens"] == 1.0 and m["spec"] == 1.0  # every finding called a finding, every normal normal
    # class 1: its images score p1 = high and low; the one called grade 2 ties with the negatives below it
    assert m["auc_c0"] == 1.0 and m["auc_c2"] == pytest.approx(0.875)
    assert m["auc"] == pytest.approx(np.mean([m["auc_c0"], m["auc_c1"], m["auc_c2"]]))
    partial = threshold_metrics(np.array([0, 0, 2]), np.eye(3)[[0, 0, 2]], math.nan)
    assert math.isnan(partial["auc_c1"]) and partial["auc"] == 1.0  # an absent grade is left out


def test_kclass_losses_reduce_to_cross_entropy_kl_and_a_ranking_over_pairs() -> None:
    y = torch.tensor([2.0, 0.0])
    logits = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    model = torch.nn.Identity()
    ce = torch.nn.functional.cross_entropy(logits, y.long())
    assert supervised_loss(model, logits, y).item() == pytest.approx(ce.item())
    assert class_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    p, q = torch.softmax(logits, 1), torch.softmax(logits.flip(1), 1)
    want = (p * (p.log() - q.log())).sum(1).mean()
    assert class_kl(logits, logits.flip(1)).item() == pytest.approx(want.item(), rel=1e-6)
    # proxy's top class 2 (sample 0); the large model's gaps to classes 0 and 1 are 2 − 0 = 2 each
    hinge = class_ranking_hinge(logits[:1], logits[:1], margin=3.0)
    assert hinge.item() == pytest.approx((1 + 1) / (2 * 2))
    assert class_ranking_hinge(logits[:1], logits[:1], sign="snapshot").item() == pytest.approx(4 / 4)
    assert proxy_loss(logits, logits, y).item() == pytest.approx(ce.item(), rel=1e-6)
    assert large_loss(logits, logits, y, rank_weight=0.0).item() == pytest.approx(ce.item(), rel=1e-6)


def test_hsl_balancing_evens_out_k_classes() -> None:
    labels = torch.tensor([0.0] * 90 + [1.0] * 5 + [3.0] * 5)
    gen = torch.Generator().manual_seed(0)
    picked = balance_primary(torch.arange(100).repeat(30), labels, gen)
    counts = torch.bincount(labels[picked].long(), minlength=4).float() / len(picked)
    assert counts[[0, 1, 3]] == pytest.approx([1 / 3] * 3, abs=0.02) and counts[2] == 0


@pytest.mark.slow
def test_bench_fl_quick_retina_runs_the_references_and_strategies(tmp_path: Path) -> None:
    out = tmp_path / "retina"
    methods = "central_aug,fedavg_aug,hsl,fedhelp,pfednet"
    res = CliRunner().invoke(
        app, ["bench", "fl", "--task", "retina", "--quick", "--methods", methods, "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["methods"]) == set(methods.split(","))
    for name, summary in doc["methods"].items():
        assert math.isfinite(summary["small_auc"]["mean"]) and math.isfinite(summary["unseen"]["auc"]["mean"])
        assert set(summary["class_auc"]) == {f"c{k}" for k in range(5)}, name
        assert all(math.isfinite(v["mean"]) for v in summary["class_auc"].values()), name
    distill = next(r for r in doc["records"] if r["method"] == "fedhelp")["extra"]["distill"]
    student = load_checkpoint(out / distill["checkpoint"])  # what `fedclinic-hub export` reads
    assert student.config.data_config.num_outputs == 5 and len(student.config.data_config.labels) == 5
    assert student.build_model()(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    assert "Per-class one-vs-rest AUC" in (out / "results.md").read_text()
