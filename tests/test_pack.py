"""Packed cohorts (kdlab/engine/pack.py, kdlab/modes/pack.py, hydra/launcher=packed): a packed
member ends where its run alone ends, each job keeps its own files, and the planner packs only
jobs that can share a teacher pass."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.modes.pack import plan_packs, unpackable
from kdlab.packed import execute_pack
from kdlab.train import execute
from tests.conftest import FAST, make_cfg

#: the members share the labelled subset, so they may differ by seed
COMMON = [*FAST, "data.label_seed=0", "baseline=false"]
#: two members that differ by seed, strategy and learning rate; the CNN student has dropout
MEMBERS = [["distill=kd", "distill.kd.temperature=2", "seed=1"],
           ["distill=dkd", "seed=2", "optimizer.lr=0.005"]]


def member_cfg(tmp: Path, folder: str, overrides: list[str]):
    cfg = make_cfg(tmp, [*COMMON, *overrides])
    cfg.paths.output_dir = str(tmp / folder)
    return cfg


def last_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)


def losses(folder: Path) -> list[str]:
    with open(folder / "logs" / "metrics.csv") as f:
        return [row["train/loss_step"] for row in csv.DictReader(f) if row["train/loss_step"]]


@pytest.fixture(scope="module")
def packed_and_alone(tmp_path_factory):
    """The two members trained as a pack, and each trained alone on the pack's data order."""
    tmp = tmp_path_factory.mktemp("pack")
    cfgs = [member_cfg(tmp, f"pack/{k}", m) for k, m in enumerate(MEMBERS)]
    results = execute_pack(cfgs, tmp / "pack" / "pack-0-1")
    alone = [execute(member_cfg(tmp, f"alone/{k}", [*m, "data.shuffle_seed=1"]))
             for k, m in enumerate(MEMBERS)]
    return tmp, results, alone


def test_a_packed_member_ends_where_its_run_alone_ends(packed_and_alone):
    tmp, results, alone = packed_and_alone
    for k in range(len(MEMBERS)):
        packed, single = last_state(tmp / f"pack/{k}"), last_state(tmp / f"alone/{k}")
        assert packed["state_dict"].keys() == single["state_dict"].keys()
        for key, value in single["state_dict"].items():  # same ops, same order: bit for bit
            assert torch.equal(packed["state_dict"][key], value), (k, key)
        assert packed["global_step"] == single["global_step"] > 0
        for a, b in zip(packed["optimizer_states"][0]["state"].values(),
                        single["optimizer_states"][0]["state"].values()):
            assert torch.equal(a["exp_avg"], b["exp_avg"])
        assert packed["lr_schedulers"] == single["lr_schedulers"]
        assert torch.equal(packed["kdlab_rng"]["torch"], single["kdlab_rng"]["torch"])
        assert losses(tmp / f"pack/{k}") == losses(tmp / f"alone/{k}")
        assert results[k]["student"]["metrics"] == alone[k]["student"]["metrics"]
    # member 1 would have had another order alone: the pack wrote the order it trained on
    assert results[1]["config"]["data"]["shuffle_seed"] == 1
    assert results[1]["student"]["packed"]["members"] == 2


def test_each_member_keeps_its_own_files(packed_and_alone):
    tmp, results, _ = packed_and_alone
    for k in range(len(MEMBERS)):
        folder = tmp / f"pack/{k}"
        saved = json.loads((folder / "results.json").read_text())
        assert saved["student"]["metrics"]["test/acc"] > 0.3  # above chance (10 classes)
        best = Path(saved["student"]["best_ckpt"])
        assert best.parent == folder / "checkpoints"
        ckpt = torch.load(best, weights_only=True)
        # a plain student checkpoint of this member: its config, no teacher, no other member
        assert ckpt["hyper_parameters"]["config"]["seed"] == int(MEMBERS[k][-1 if k == 0 else 1]
                                                                  .split("=")[1])
        assert not any(key.startswith(("teacher.", "members.")) for key in ckpt["state_dict"])
        assert len(ckpt["optimizer_states"]) == 1
        assert all(not key.endswith("]") for key in ckpt["callbacks"])
    pack = torch.load(tmp / "pack/pack-0-1/checkpoints/last.ckpt", weights_only=True)
    assert len(pack["optimizer_states"]) == 2 and len(pack["kdlab_member_rng"]) == 2


def test_the_planner_packs_only_jobs_that_share_a_teacher_pass(tmp_path):
    def cfg(*overrides):
        return make_cfg(tmp_path, [*COMMON, *overrides])

    jobs = [cfg("distill=kd", "seed=1"), cfg("distill=dkd", "seed=2"),
            cfg("distill=kd", "teacher.seed=5"), cfg("distill=none"),
            cfg("distill=kd", "mode=mutual"), cfg("distill=kd", "trainer.precision=16-mixed"),
            cfg("distill=kd", "teacher.seed=5", "seed=3")]
    packs, alone = plan_packs(jobs, [[]] * len(jobs), max_members=8)
    assert packs == [[0, 1], [2, 6]]  # the jobs of another teacher form their own pack
    assert "no teacher pass" in alone[3] and "mode=mutual" in alone[4]
    assert "16-mixed" in alone[5]
    packs, alone = plan_packs(jobs[:2], [[], ["data.shuffle_seed=7"]], max_members=8)
    assert packs == [] and set(alone) == {0, 1}  # a swept data order is a real difference
    assert unpackable(cfg("distill=kd", "logger=wandb")).startswith("logger=wandb")


def test_a_packed_multirun_writes_every_job_and_reports_a_failed_one(tmp_path):
    """The same -m command with hydra/launcher=packed: one pack for the jobs that share a
    teacher, the bad job fails alone with its line, the sweep exits 1 with the summary."""
    args = [sys.executable, "-m", "kdlab.train", "-m", "hydra/launcher=packed",
            "distill.kd.temperature=2,-1,4", f"paths.log_dir={tmp_path}", *COMMON]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 3 jobs of the sweep failed" in proc.stderr, proc.stderr[-3000:]
    assert "distill.kd.temperature" in proc.stderr
    sweep = next((tmp_path / "multiruns").iterdir())
    assert (sweep / "pack-0-2" / "checkpoints" / "last.ckpt").is_file()
    for job in (0, 2):
        results = json.loads((sweep / str(job) / "results.json").read_text())
        assert results["student"]["packed"]["members"] == 2
        assert (sweep / str(job) / ".hydra" / "overrides.yaml").is_file()
    assert not (sweep / "1" / "results.json").exists()
