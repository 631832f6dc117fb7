"""trainer=ddp on 2 CPU processes (gloo), in a single run and inside a Hydra multirun: one
run folder, one results.json whose test accuracy equals a single-process evaluation of the
same checkpoint; the teacher is trained under DDP and stored once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdlab.evaluate import evaluate
from tests.conftest import FAST, make_cfg


@pytest.mark.parametrize("multirun", [True, False], ids=["multirun", "single-run"])
def test_ddp_two_cpu_processes(tmp_path, multirun):
    sweep = ["-m"] if multirun else [f"hydra.run.dir={tmp_path}/multiruns/single/0"]
    args = [sys.executable, "-m", "kdlab.train", *sweep, "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "seed=1", *FAST, "steps_per_call=auto",
            "trainer.limit_test_batches=null",
            f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # a second process took part
    sweeps = list((tmp_path / "multiruns").iterdir())
    assert len(sweeps) == 1, "the second rank must not start the sweep again"
    results = list(tmp_path.glob("multiruns/*/*/results.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    assert result["teacher"]["source"]["source"] == "trained"
    assert len(list((tmp_path / "teachers").glob("*/teacher.pt"))) == 1
    assert log.count("│ student ") == 1  # only rank 0 reports

    eval_cfg = make_cfg(tmp_path / "eval", [f"ckpt_path={result['student']['best_ckpt']}",
                                            "latency.repeats=1", "with_teacher=false"],
                        config_name="eval")
    evaluated = evaluate(eval_cfg)
    assert evaluated["student"]["metrics"]["test/acc"] == pytest.approx(
        result["student"]["metrics"]["test/acc"], abs=1e-6)
