"""Shared fixtures: configs composed with Hydra's compose API, sized to run in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kdlab.util.config import CONF_DIR

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core (-n auto): each worker, and the runs it starts, use one thread, so
    # the workers do not fight over the cores
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

#: overrides that make a whole run take seconds: a small MLP teacher, few batches per epoch
FAST = [
    "teacher=mlp",
    "teacher.model.hidden=[64]",
    "teacher.train.max_epochs=1",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=128",  # batches, run in chunks of steps_per_call
    "steps_per_call=32",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=32",
    "data.eval_batch_size=200",
    "data.num_labels=100",
    "latency.repeats=2",
    "latency.batch_size=8",
    "logger=csv",
]


def make_cfg(tmp: Path, overrides: list[str] = (), config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with outputs and the teacher store under ``tmp``."""
    paths = [f"paths.output_dir={tmp}/run", f"paths.teacher_store={tmp}/teachers",
             f"paths.log_dir={tmp}/logs"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*paths, *overrides])


@pytest.fixture
def fast_cfg(tmp_path):
    """``make_cfg`` with the FAST overrides first, then the test's own."""

    def _make(*overrides: str, tmp: Path | None = None) -> DictConfig:
        return make_cfg(tmp or tmp_path, [*FAST, *overrides])

    return _make


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny batches only lose to thread contention on a busy CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def multirun_2x2(tmp_path_factory):
    """``kdlab-train -m distill=none,kd seed=1,2`` run once in a subprocess (FAST settings):
    ``(folder, completed process)``; the four runs are in ``folder/multiruns/*/*``."""
    folder = tmp_path_factory.mktemp("multirun")
    args = [sys.executable, "-m", "kdlab.train", "-m", "distill=none,kd", "seed=1,2",
            f"paths.log_dir={folder}", *FAST]
    proc = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=600)
    return folder, proc
