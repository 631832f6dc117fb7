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

import kdlab
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
    paths = [f"paths.teacher_store={tmp}/teachers", f"paths.log_dir={tmp}/logs"]
    results = kdlab.run_packed(MEMBERS, common=[*paths, *COMMON], output_dir=tmp / "pack")
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


def test_run_packed_refuses_jobs_that_cannot_share_a_pack(tmp_path):
    with pytest.raises(kdlab.KdlabError, match=r"job 1 \(distill=none\): distill=none has no"):
        kdlab.run_packed([["distill=kd"], ["distill=none"]], common=COMMON,
                         output_dir=tmp_path)


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


def test_a_stopped_pack_continues_to_the_uninterrupted_result(tmp_path):
    """SIGTERM during a packed sweep, then the same command: the pack continues from its own
    last.ckpt and every member ends where the uninterrupted sweep's does, curves included."""
    import os
    import signal
    import time

    def command(sweep: Path) -> list[str]:
        return [sys.executable, "-m", "kdlab.train", "-m", "hydra/launcher=packed",
                "distill.kd.temperature=2,4", f"hydra.sweep.dir={sweep}",
                f"paths.log_dir={tmp_path}", f"paths.teacher_store={tmp_path}/store", *COMMON,
                "trainer.max_epochs=3", "trainer.limit_train_batches=60", "steps_per_call=4"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command(tmp_path / "a"), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen(command(tmp_path / "b"), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pack = tmp_path / "b" / "pack-0-1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while proc.poll() is None and not pack.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by" in stderr and not (tmp_path / "b" / "0" / "results.json").exists()
    again = subprocess.run(command(tmp_path / "b"), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resuming the pack from" in again.stdout + again.stderr
    for job in ("0", "1"):
        a, b = tmp_path / "a" / job, tmp_path / "b" / job
        sa, sb = last_state(a)["state_dict"], last_state(b)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), job
        ra, rb = (json.loads((f / "results.json").read_text()) for f in (a, b))
        assert ra["student"]["metrics"] == rb["student"]["metrics"]
        assert losses(a) == losses(b)  # the curve before the stop was kept


def test_a_vectorised_pass_equals_each_student_alone():
    """One step of two CNN students (batch norm, channels_last) as one torch.func.vmap pass:
    logits, gradients and batch-norm statistics equal each student's own pass to float
    tolerance. The reference pass runs in float64: with one thread, torch's float32 batch-norm
    backward sums 25k terms in one sequence and its conv gradients are ~1e-3 off (the stacked
    pass is 3e-7 off), so two float32 passes can differ by more than the stacking does."""
    import copy

    import torch.nn.functional as F

    from kdlab.engine.stacked import StackedStudents
    from kdlab.models.cnn import CNN

    torch.manual_seed(0)
    students = [CNN((1, 28, 28), 10, channels=(8, 16), hidden=32, dropout=0.0)
                .to(memory_format=torch.channels_last) for _ in range(2)]
    alone = [copy.deepcopy(s).double() for s in students]
    x = torch.randn(32, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))
    logits = StackedStudents(students).forward(x, [0, 1])
    sum(F.cross_entropy(z, y) for z in logits).backward()
    for student, single, z in zip(students, alone, logits):
        out = single(x.double())
        F.cross_entropy(out, y).backward()
        assert torch.allclose(z.double(), out, rtol=1e-4, atol=1e-5)
        for (name, p), (_, q) in zip(student.named_parameters(), single.named_parameters()):
            assert torch.allclose(p.grad.double(), q.grad, rtol=1e-3, atol=1e-5), name
        for (name, b), (_, c) in zip(student.named_buffers(), single.named_buffers()):
            assert torch.allclose(b.float(), c.float(), rtol=1e-5, atol=1e-6), name
        assert int(dict(student.named_buffers())["stages.0.1.num_batches_tracked"]) == 1


def test_a_stacked_pack_trains_each_member_as_alone(tmp_path):
    """A pack with hydra.launcher.stack=true: each member ends where its run alone ends to
    float tolerance, batch-norm statistics included, over two epochs of 3 steps. (Longer runs
    drift apart: the vectorised pass's 1e-7 differences grow chaotically, to ~1e-4 after 32
    SGD steps, and faster under Adam, which divides near-zero gradients by their own size.)"""
    members = [["distill=kd", "seed=1", "student.model.dropout=0"],
               ["distill=dkd", "seed=2", "optimizer.lr=0.005", "student.model.dropout=0"]]
    short = ["trainer.limit_train_batches=3", "steps_per_call=2"]
    cfgs = [member_cfg(tmp_path, f"pack/{k}", [*m, *short]) for k, m in enumerate(members)]
    results = execute_pack(cfgs, tmp_path / "pack" / "pack-0-1", stack=True)
    assert all(isinstance(r, dict) for r in results), results
    for k, m in enumerate(members):
        execute(member_cfg(tmp_path, f"alone/{k}", [*m, *short, "data.shuffle_seed=1"]))
        packed, single = last_state(tmp_path / f"pack/{k}"), last_state(tmp_path / f"alone/{k}")
        for key, value in single["state_dict"].items():
            # member 0 (AdamW, lr 1e-3) differs by ~1e-6, member 1 (lr 5e-3) by ~1e-4; a wrong
            # gradient or statistic would be off by the 6 steps' movement, ~3e-2
            assert torch.allclose(packed["state_dict"][key].float(), value.float(), rtol=0,
                                  atol=1e-3), (k, key)


def test_stackable_says_why_students_cannot_share_one_pass():
    from torch import nn

    from kdlab.engine.stacked import stackable

    def mlp(dropout: float = 0.0, hidden: int = 8) -> nn.Module:
        return nn.Sequential(nn.Linear(4, hidden), nn.Dropout(dropout), nn.Linear(hidden, 3))

    assert stackable([mlp(), mlp()], [False, False]) is None
    assert "architecture" in stackable([mlp(), mlp(hidden=9)], [False, False])
    assert "dropout" in stackable([mlp(0.1), mlp(0.1)], [False, False])
    assert "features" in stackable([mlp(), mlp()], [False, True])


@pytest.mark.parametrize("override, message", [
    ("hydra.launcher.max_members=1", "hydra.launcher.max_members=1 must be an integer >= 2 "
     "(the most jobs in one pack)"),
    ("hydra.launcher.stack=maybe", "hydra.launcher.stack=maybe must be auto, true or false")])
def test_a_bad_launcher_option_fails_in_one_line(tmp_path, override, message):
    proc = subprocess.run([sys.executable, "-m", "kdlab.train", "-m", "hydra/launcher=packed",
                           override, "distill.kd.temperature=2,4", f"paths.log_dir={tmp_path}",
                           *COMMON], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"kdlab: error: {message}"
    assert not (tmp_path / "multiruns").exists() or not any((tmp_path / "multiruns").rglob(
        "results.json"))

