"""A user's own repository adds strategies, models and experiments without forking kdlab:
a config folder on Hydra's search path (``--config-dir`` or ``hydra.searchpath``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kdlab
from kdlab.cli import check_overrides
from kdlab.util.errors import KdlabError

CODE = '''
import torch
from torch import nn

from kdlab import Strategy


class HalfKD(Strategy):
    """Soft-target MSE between student and teacher probabilities, weighted."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, student, teacher, batch):
        p_s, p_t = student.logits.softmax(-1), teacher.logits.softmax(-1)
        return {"half": self.weight * (p_s - p_t).pow(2).sum(-1).mean()}


class Tiny(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()),
                                                         num_classes))

    def forward(self, x):
        return self.net(x)
'''


@pytest.fixture
def user_repo(tmp_path) -> Path:
    """A user's folder: ``my_kd.py`` with a strategy and a model, and ``conf/`` with a
    ``distill`` option, a ``student`` option and an ``experiment``."""
    (tmp_path / "my_kd.py").write_text(CODE)
    conf = tmp_path / "conf"
    (conf / "distill").mkdir(parents=True)
    (conf / "student").mkdir()
    (conf / "experiment").mkdir()
    (conf / "distill" / "halfkd.yaml").write_text(textwrap.dedent("""\
        # @package distill.halfkd
        _target_: my_kd.HalfKD
        weight: 0.5
        """))
    (conf / "student" / "tiny.yaml").write_text(textwrap.dedent("""\
        model:
          _target_: my_kd.Tiny
        init_from_teacher: null
        """))
    (conf / "experiment" / "mine.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /distill: [kd, halfkd]
          - override /student: tiny
        task_name: mine
        """))
    return tmp_path


def test_group_checks_see_the_users_options(user_repo):
    conf = user_repo / "conf"
    with pytest.raises(KdlabError, match="distill=halfkd is not an option"):
        check_overrides(["distill=halfkd"])
    check_overrides(["--config-dir", str(conf), "distill=[kd,halfkd]", "student=tiny"])
    check_overrides([f"hydra.searchpath=[file://{conf}]", "experiment=mine"])


def test_the_api_composes_a_users_experiment(user_repo):
    cfg = kdlab.compose(["experiment=mine"], config_dirs=[user_repo / "conf"])
    assert list(cfg.distill) == ["kd", "halfkd"] and cfg.distill.halfkd.weight == 0.5
    assert cfg.student.model._target_ == "my_kd.Tiny" and cfg.task_name == "mine"


def test_a_strategy_and_model_from_outside_train_from_the_command_line(user_repo):
    env = {**os.environ, "PYTHONPATH": f"{user_repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [sys.executable, "-m", "kdlab.train", "--config-dir", str(user_repo / "conf"),
            "experiment=mine", "distill.halfkd.weight=2", "teacher=mlp",
            "teacher.model.hidden=[32]", "teacher.train.max_epochs=1", "trainer.max_epochs=1",
            "trainer.limit_train_batches=2", "steps_per_call=1", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "baseline=false", "latency.repeats=1",
            "trainer.enable_progress_bar=false", "logger=csv", f"paths.log_dir={user_repo}/out",
            f"hydra.run.dir={user_repo}/out/run"]
    proc = subprocess.run(args, cwd=user_repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((user_repo / "out" / "run" / "results.json").read_text())
    assert results["strategy"] == "kd+halfkd" and results["student"]["model"] == "Tiny"
    assert results["config"]["distill"]["halfkd"]["weight"] == 2
    (metrics,) = (user_repo / "out" / "run" / "logs").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0]
    assert "train/half" in header and "train/kd" in header
