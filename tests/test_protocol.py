"""Staged protocols (conf/protocol/): experiment=cifar100 runs AB, FSP and FT as RepDistiller
did — 30 epochs of initialisation, then the 240-epoch recipe, its milestones moved by 30 —
while protocol=none, a command-line key or a list of strategies select the other variants."""

from __future__ import annotations

import csv
import logging

import pytest
from omegaconf import OmegaConf

from kdlab.modes.build import build_strategy, warn_about_long_pre_stages
from kdlab.train import run
from kdlab.util.errors import KdlabError
from kdlab.util.resolvers import after_pre_stage
from tests.conftest import make_cfg

CIFAR = ["experiment=cifar100", "data=synthetic_cifar100"]


def composed(tmp_path, *overrides: str) -> dict:
    cfg = make_cfg(tmp_path, [*CIFAR, *overrides])
    return {key: OmegaConf.to_container(cfg[key], resolve=True)
            for key in ("distill", "trainer", "scheduler")}


def test_cifar100_runs_ab_fsp_ft_as_repdistiller(tmp_path):
    ab = composed(tmp_path, "distill=ab")
    assert {k: ab["distill"]["ab"][k] for k in ("init_epochs", "beta", "reduction")} == {
        "init_epochs": 30, "beta": 0.0, "reduction": "authors"}
    assert ab["trainer"]["max_epochs"] == 270
    assert ab["scheduler"]["milestones"] == [180, 210, 240]
    fsp = composed(tmp_path, "distill=fsp")["distill"]["fsp"]
    assert (fsp["init_epochs"], fsp["beta"]) == (30, 0.0)
    ft = composed(tmp_path, "distill=ft")
    assert {k: ft["distill"]["ft"][k] for k in ("init_epochs", "factor", "reconstruction",
                                               "beta")} == {
        "init_epochs": 30, "factor": "channel_mean_sq", "reconstruction": "mse", "beta": 200.0}
    assert ft["trainer"]["max_epochs"] == 270


def test_single_stage_methods_keep_the_240_epoch_recipe(tmp_path):
    for distill in ("kd", "fitnets", "crd"):
        cfg = composed(tmp_path, f"distill={distill}")
        assert cfg["trainer"]["max_epochs"] == 240, distill
        assert cfg["scheduler"]["milestones"] == [150, 180, 210], distill
    # FitNets stays one stage, as RepDistiller trains it (the paper's hint stage: a key)
    assert composed(tmp_path, "distill=fitnets")["distill"]["fitnets"]["init_epochs"] == 0


def test_protocol_none_gives_kdlab_single_stage_defaults(tmp_path):
    cfg = composed(tmp_path, "distill=ab", "protocol=none")
    assert {k: cfg["distill"]["ab"][k] for k in ("init_epochs", "beta", "reduction")} == {
        "init_epochs": 0, "beta": 1.0, "reduction": "mean"}
    assert cfg["trainer"]["max_epochs"] == 240
    ft = composed(tmp_path, "distill=ft", "protocol=none")
    assert (ft["distill"]["ft"]["init_epochs"], ft["trainer"]["max_epochs"]) == (1, 241)
    # outside the CIFAR recipe there is no protocol: the configs' own values
    plain = OmegaConf.to_container(make_cfg(tmp_path, ["distill=ab"]).distill, resolve=True)
    assert (plain["ab"]["init_epochs"], plain["ab"]["beta"]) == (0, 1.0)


def test_a_command_line_key_wins_over_the_protocol(tmp_path):
    cfg = composed(tmp_path, "distill=ab", "distill.ab.init_epochs=10", "distill.ab.beta=2")
    assert (cfg["distill"]["ab"]["init_epochs"], cfg["distill"]["ab"]["beta"]) == (10, 2.0)
    assert cfg["trainer"]["max_epochs"] == 250
    assert cfg["scheduler"]["milestones"] == [160, 190, 220]
    assert composed(tmp_path, "distill=ab", "trainer.max_epochs=5")["trainer"]["max_epochs"] == 5


def test_a_list_of_strategies_moves_the_schedule_by_its_longest_pre_stage(tmp_path):
    cfg = composed(tmp_path, "distill=[ab,kd]", "distill.ab.init_epochs=12")
    assert set(cfg["distill"]) == {"ab", "kd"}
    assert cfg["trainer"]["max_epochs"] == 252


def test_after_pre_stage_resolver_checks_its_inputs():
    root = OmegaConf.create({"distill": {"ab": {"init_epochs": 3}, "kd": {"alpha": 0.9}}})
    assert after_pre_stage(10, _root_=root) == 13
    assert after_pre_stage([1, 2], _root_=root) == [4, 5]
    assert after_pre_stage(10, _root_=OmegaConf.create({"distill": {}})) == 10
    with pytest.raises(KdlabError, match="distill.ab.init_epochs=-1"):
        after_pre_stage(10, _root_=OmegaConf.create({"distill": {"ab": {"init_epochs": -1}}}))
    with pytest.raises(KdlabError, match="after_pre_stage"):
        after_pre_stage("x", _root_=root)


def test_a_pre_stage_that_fills_the_schedule_is_named(tmp_path, caplog):
    cfg = make_cfg(tmp_path, [*CIFAR, "distill=ab", "trainer.max_epochs=2"])
    with caplog.at_level(logging.WARNING):
        members = {"ab": build_strategy(cfg).members["ab"]}
    assert "distill.ab.init_epochs=30" in caplog.text and "protocol=none" in caplog.text
    assert warn_about_long_pre_stages(members, 31) == []


@pytest.mark.usefixtures("one_thread")
def test_staged_ab_trains_its_init_stage_then_ce_alone(tmp_path):
    """Two epochs: AB alone (the student's classifier untouched), then CE with beta=0."""
    small = ["trainer.enable_progress_bar=false", "latency.repeats=1", "latency.batch_size=2",
             "data.batch_size=8", "data.eval_batch_size=16", "data.train_size=64",
             "data.val_size=16", "data.test_size=32", "trainer.limit_train_batches=2",
             "teacher.model.name=resnet8", "student.model.name=resnet8",
             "teacher.train.max_epochs=1", "distill.ab.init_epochs=1",
             "trainer.max_epochs=${after_pre_stage:1}",
             "scheduler.milestones=${after_pre_stage:[1]}"]
    results = run(make_cfg(tmp_path, [*CIFAR, "distill=ab", *small]))
    student = results["student"]
    assert student["metrics"]["epochs"] == 2
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss_epoch"]]
    by_epoch = {int(r["epoch"]): r for r in rows}
    assert sorted(by_epoch) == [0, 1]
    assert by_epoch[0]["train/ab_init_epoch"] and not by_epoch[0]["train/ce_epoch"]
    assert by_epoch[1]["train/ce_epoch"] and not by_epoch[1]["train/ab_init_epoch"]
    assert float(by_epoch[1]["train/ab_epoch"]) == 0.0  # beta = 0: CE alone
