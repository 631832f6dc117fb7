"""Run a strategy config end to end, fast: ``trainer.fast_dev_run`` on a teacher/student pair
whose stages differ in channels, spatial size and number (teacher CNN 32-64: stages 14×14 and
7×7; student CNN 8-16-16: 14×14, 7×7 and 3×3)."""

from __future__ import annotations

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
    "trainer.fast_dev_run=true",
    "trainer.enable_progress_bar=false",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "baseline=false",
    "latency.repeats=1",
    "latency.batch_size=4",
    "logger=none",
]


def run_fast_dev(distill: str, tmp_path: Path, *overrides: str) -> dict[str, Any]:
    """``kdlab-train distill=<distill> …`` (a name or a list ``[kd,at]``) with the pair above;
    returns the results dict."""
    return run(make_cfg(tmp_path, [f"distill={distill}", *PAIR, *overrides]))


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
