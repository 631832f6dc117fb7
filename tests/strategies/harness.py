"""Run a strategy config end to end, fast: ``trainer.fast_dev_run`` on a teacher/student pair
whose stages differ in channels, spatial size and number (teacher CNN 32-64: stages 14×14 and
7×7; student CNN 8-16-16: 14×14, 7×7 and 3×3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    """``kdlab-train distill=<distill> …`` with the pair above; returns the results dict."""
    return run(make_cfg(tmp_path, [f"distill={distill}", *PAIR, *overrides]))
