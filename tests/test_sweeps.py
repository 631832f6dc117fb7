"""Sweeps: the Optuna search's objective is the student's validation accuracy; parallel jobs
(joblib) that start together train their shared teacher once; a missing plugin fails in one
line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from kdlab.cli import check_plugins
from kdlab.util.errors import KdlabError
from tests.conftest import FAST


def _train(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdlab.train", *args, *FAST,
                           f"paths.log_dir={cwd}", "trainer.max_epochs=1"],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_optuna_search_maximises_the_validation_accuracy(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _train(["hparams_search=kd_optuna", "hydra.sweeper.n_trials=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = [json.loads(p.read_text()) for p in tmp_path.glob("multiruns/*/*/results.json")]
    assert len(trials) == 3
    best = yaml.safe_load(next(tmp_path.glob("multiruns/*/optimization_results.yaml")).read_text())
    values = [t["student"]["metrics"]["val/acc"] for t in trials]
    assert best["best_value"] == pytest.approx(max(values))
    winners = [t["config"]["distill"]["kd"] for t, v in zip(trials, values) if v == max(values)]
    chosen = best["best_params"]  # one of the trials with the best value (ties are possible)
    assert any(chosen["distill.kd.temperature"] == pytest.approx(w["temperature"])
               and chosen["distill.kd.alpha"] == pytest.approx(w["alpha"]) for w in winners)
    assert all("baseline" not in t for t in trials)
    assert len({t["config"]["distill"]["kd"]["temperature"] for t in trials}) == 3


def test_parallel_jobs_train_their_teacher_once(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = _train(["-m", "hydra/launcher=local_parallel", "distill=kd", "seed=1,2",
                   "baseline=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in tmp_path.glob("multiruns/*/*/results.json")]
    assert len(results) == 2
    assert sorted(r["teacher"]["source"]["source"] for r in results) == ["store", "trained"]
    assert len(list((tmp_path / "teachers").glob("*/teacher.pt"))) == 1


def test_a_missing_plugin_is_named_with_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else real(name))
    with pytest.raises(KdlabError, match=r"hparams_search=kd_optuna needs the Hydra plugin "
                                         r"hydra-optuna-sweeper: pip install -e '\.\[sweep\]'"):
        check_plugins(["distill=kd", "hparams_search=kd_optuna"])
    with pytest.raises(KdlabError, match="hydra-submitit-launcher"):
        check_plugins(["hydra/launcher=slurm"])
    check_plugins(["distill=kd", "hparams_search=null"])  # nothing asked for


def test_slurm_launcher_runs_one_task_per_device():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from kdlab.util.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


def test_a_failed_job_does_not_cancel_the_sweep_and_is_summarised(tmp_path):
    """Job 0 of three has a bad value: jobs 1 and 2 still run and finish, and the sweep ends
    with exit code 1 and one summary naming the failed job, its overrides and its error."""
    proc = _train(["-m", "distill=kd", "distill.kd.temperature=-1,2,4", "baseline=false"],
                  tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    assert not (sweep / "0" / "results.json").exists()
    assert (sweep / "1" / "results.json").exists() and (sweep / "2" / "results.json").exists()
    summary = proc.stderr[proc.stderr.index("kdlab: error: 1 of 3 jobs of the sweep failed"):]
    assert f"the list is in {sweep / 'failed_jobs.json'}" in summary
    assert f"job 0 [distill.kd.temperature=-1] in {sweep / '0'}: " \
           "distill.kd.temperature" in summary
    (failed,) = json.loads((sweep / "failed_jobs.json").read_text())
    assert failed["job"] == 0 and "distill.kd.temperature=-1" in failed["overrides"]
    assert "Traceback" not in proc.stderr
