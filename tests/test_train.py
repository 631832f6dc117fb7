"""Whole runs: fast_dev_run for each strategy, results.json, multirun, kdlab-eval."""

import json
from pathlib import Path

import pytest
import torch

from kdlab.evaluate import evaluate
from kdlab.train import run
from tests.conftest import FAST, make_cfg


@pytest.mark.parametrize("distill", ["none", "kd"])
def test_fast_dev_run(distill, tmp_path):
    cfg = make_cfg(tmp_path, [f"distill={distill}", "trainer.fast_dev_run=true",
                              "teacher=mlp", "teacher.model.hidden=[32]", "latency.repeats=1",
                              "trainer.enable_progress_bar=false"])
    results = run(cfg)
    assert results["student"]["metrics"]["test/acc"] >= 0
    assert ("teacher" in results) == (distill == "kd")
    assert ("baseline" in results) == (distill == "kd")
    if distill == "kd":  # a fast_dev_run teacher is never stored
        assert results["teacher"]["source"]["stored"] is False
        assert not list((tmp_path / "teachers").rglob("teacher.pt"))


def test_run_writes_results_json_with_all_three_roles(tmp_path):
    cfg = make_cfg(tmp_path, [*FAST, "trainer.limit_test_batches=null"])
    run(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["distill"]["kd"]["_target_"] == "kdlab.strategies.KD"
    assert results["config"]["seed"] == 0
    for role in ("teacher", "student", "baseline"):
        entry = results[role]
        assert entry["params"] > 0 and entry["latency_ms"] > 0
        assert 0 <= entry["metrics"]["test/acc"] <= 1
        assert "val/acc" in entry["metrics"]
    assert results["teacher"]["params"] > results["student"]["params"]
    assert results["student"]["params"] == results["baseline"]["params"]
    assert results["wall_time_s"] > 0
    ckpt = torch.load(results["student"]["last_ckpt"], weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    header = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert {"train/ce_epoch", "train/kd_epoch", "train/loss_epoch", "val/acc"} <= set(
        header.split(","))
    assert (tmp_path / "run" / "baseline" / "logs" / "metrics.csv").is_file()

    # kdlab-eval on the student checkpoint reproduces the run's test accuracy
    eval_cfg = make_cfg(tmp_path, [f"ckpt_path={results['student']['best_ckpt']}",
                                   "latency.repeats=1"], config_name="eval")
    evaluated = evaluate(eval_cfg)
    assert evaluated["student"]["metrics"]["test/acc"] == pytest.approx(
        results["student"]["metrics"]["test/acc"])
    # … beside the run's stored teacher, with its footprint and the teacher ÷ student ratios
    teacher, student = evaluated["teacher"], evaluated["student"]
    assert teacher["metrics"]["test/acc"] == pytest.approx(
        results["teacher"]["metrics"]["test/acc"])
    assert (teacher["params"], student["params"]) == (
        results["teacher"]["params"], results["student"]["params"])
    assert set(student["latency_ms_by_batch"]) == {1, 128}
    assert student["flops_per_sample"] > 0 and student["checkpoint_bytes"] > 0
    ratio = evaluated["ratios"]
    assert ratio["compression_params"] == pytest.approx(teacher["params"] / student["params"])
    assert ratio["flops_reduction"] == pytest.approx(
        teacher["flops_per_sample"] / student["flops_per_sample"])
    assert ratio["accuracy_gap_points"] == pytest.approx(
        100 * (teacher["metrics"]["test/acc"] - student["metrics"]["test/acc"]))
    best = Path(results["student"]["best_ckpt"])  # eval.json goes beside the run it reads
    saved = json.loads((tmp_path / "run" / "eval" / best.stem / "eval.json").read_text())
    assert saved["ratios"]["compression_params"] == pytest.approx(ratio["compression_params"])


def test_multirun_shares_one_teacher(multirun_2x2):
    tmp_path, proc = multirun_2x2
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = sorted(tmp_path.glob("multiruns/*/*/results.json"))
    assert len(results) == 4
    loaded = [json.loads(p.read_text()) for p in results]
    assert sorted((r["strategy"], r["config"]["seed"]) for r in loaded) == [
        ("kd", 1), ("kd", 2), ("none", 1), ("none", 2)]
    sources = [r["teacher"]["source"]["source"] for r in loaded if "teacher" in r]
    assert sorted(sources) == ["store", "trained"]
    assert len(list((tmp_path / "teachers").glob("*/teacher.pt"))) == 1



def test_a_given_teacher_is_measured_on_the_batches_the_trainer_limits_allow(tmp_path):
    """``trainer.limit_val_batches`` / ``limit_test_batches`` apply to every network of a run,
    a given teacher too: with 1 validation and 2 test batches of 256 images, the teacher's
    accuracies are whole numbers of 256ths and 512ths (not of the full splits' 5,000ths and
    10,000ths)."""
    from tests.strategies.harness import PAIR, pair_teacher

    results = run(make_cfg(tmp_path, ["distill=kd", *PAIR, f"teacher.ckpt={pair_teacher()}",
                                      "trainer.limit_train_batches=2"]))
    assert results["teacher"]["source"]["source"] == "ckpt"
    for split, images in (("val", 256), ("test", 512)):
        hits = results["teacher"]["metrics"][f"{split}/acc"] * images
        assert abs(hits - round(hits)) < 1e-3, (split, hits)
