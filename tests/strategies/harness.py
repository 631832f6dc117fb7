"""Run a strategy config end to end, short: 120 batches of a student learning from a trained
teacher, on a teacher/student pair whose stages differ in channels, spatial size and number
(teacher CNN 32-64: stages 14×14 and 7×7; student CNN 8-16-16: 14×14, 7×7 and 3×3). The teacher
is trained once per test session (:func:`pair_teacher`) and given as ``teacher.ckpt``; every
run must learn (:func:`assert_learned`)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdlab.strategies.base import Batch, Outputs
from kdlab.train import run
from tests.conftest import make_cfg

PAIR = [
    "teacher=cnn",
    "student=cnn",
    "student.model.channels=[8,16,16]",
    "student.model.hidden=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=120",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "data.batch_size=32",
    "data.eval_batch_size=256",
    "data.num_labels=null",
    "teacher_cache.enabled=false",
    "baseline=false",
    "latency.repeats=1",
    "latency.batch_size=4",
    "logger=none",
]
#: test accuracy a short run must beat (chance is 0.1 on Fashion-MNIST's 10 classes)
LEARNED = 0.3
_TEACHER: dict[str, Path] = {}


def pair_teacher() -> Path:
    """The pair's teacher (CNN 32-64, ~80% test accuracy), trained once per test session:
    150 batches of 64 on every label."""
    if "path" not in _TEACHER:
        from kdlab.modes.teacher import get_teacher

        folder = Path(tempfile.mkdtemp(prefix="kdlab-pair-teacher-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        cfg = make_cfg(folder, ["teacher=cnn", "teacher.train.max_epochs=1",
                                "teacher.train.batch_size=64", "teacher.train.augment=false",
                                "trainer.limit_train_batches=150", "trainer.limit_val_batches=1",
                                "trainer.enable_progress_bar=false", "logger=none"])
        model, _ = get_teacher(cfg, folder)
        torch.save(model.state_dict(), folder / "teacher.pt")
        _TEACHER["path"] = folder / "teacher.pt"
    return _TEACHER["path"]


def run_short(distill: str, tmp_path: Path, *overrides: str) -> dict[str, Any]:
    """``kdlab-train distill=<distill> …`` (a name or a list ``[kd,at]``) with the pair above
    for 120 batches; returns the results dict."""
    return run(make_cfg(tmp_path, [f"distill={distill}", *PAIR,
                                   f"teacher.ckpt={pair_teacher()}", *overrides]))


def assert_learned(results: dict[str, Any]) -> None:
    """The distilled student is clearly above chance (:data:`LEARNED`)."""
    accuracy = results["student"]["metrics"]["test/acc"]
    assert accuracy > LEARNED, f"test/acc {accuracy:.3f}: the student did not learn"


def connect(strategy, student: list, teacher: list):
    """Set up ``strategy`` on lists of student/teacher feature maps tapped as ``s<i>`` /
    ``t<i>``; returns their Outputs and a Batch of matching size."""
    s_out = Outputs(torch.zeros(1), {f"s{i}": f for i, f in enumerate(student)})
    t_out = Outputs(torch.zeros(1), {f"t{i}": f for i, f in enumerate(teacher)})
    strategy.student_paths = list(s_out.features)
    strategy.teacher_paths = list(t_out.features)
    strategy.setup(s_out, t_out, 10)
    n = student[0].shape[0]
    return s_out, t_out, Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long),
                               torch.arange(n))
