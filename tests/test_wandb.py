"""logger=wandb without an API key: offline, never a prompt; one run per job with the config,
every loss term, max summaries, tags, group and the comparison table."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.train import run


def _records(run_dir: Path) -> list[dict]:
    """The records of the one offline W&B run under ``run_dir/wandb`` (``wandb leet inspect``)."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                           str(files[0])], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"this wandb cannot print offline records: {proc.stderr[-300:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_run_has_config_terms_summaries_and_table(fast_cfg, tmp_path,
                                                                 no_wandb_key, caplog):
    import wandb

    caplog.set_level(logging.WARNING)
    results = run(fast_cfg("logger=wandb"))
    assert wandb.run is None  # finished at the end of the job
    assert "wandb sync" in caplog.text and "offline" in caplog.text

    records = _records(tmp_path / "run")
    head = next(r["run"] for r in records if "run" in r)
    assert head["display_name"] == "kdlab-kd-seed0"
    assert head["run_group"] == "kdlab"
    assert set(head["tags"]) == {"strategy:kd", "teacher:MLP", "student:CNN", "mode:offline"}

    config = {}
    for r in records:
        if "config" in r:
            config.update(r["config"]["update"])
    assert list(config["config"]["distill"]) == ["kd"]
    assert config["config"]["seed"] == 0

    history = set()
    for r in records:
        if "history" in r:
            history |= set(r["history"]["item"])
    # every loss term of every stage, each stage but the student under its prefix
    assert {"train/kd_epoch", "train/ce_epoch", "train/loss_epoch", "val/acc", "test/acc",
            "baseline-train/ce_epoch", "baseline-val/acc", "teacher-val/acc"} <= history

    summaries = {r["metric"]["name"]: r["metric"].get("summary") for r in records
                 if "metric" in r and "name" in r["metric"]}
    assert summaries["val/acc"] == {"max": True}
    assert summaries["baseline-val/acc"] == {"max": True}

    summary = {}
    for r in records:
        if "summary" in r:
            summary.update(r["summary"]["update"])
    assert summary["final/student/test/acc"] == pytest.approx(
        results["student"]["metrics"]["test/acc"])
    assert summary["comparison._type"] == "table-file"
    assert summary["comparison.nrows"] == len(results["stages"])
    table_file = next((tmp_path / "run" / "wandb").glob("offline-run-*/files/"
                                                        + summary["comparison.path"]))
    table = json.loads(table_file.read_text())
    assert table["columns"][:2] == ["stage", "model"]
    assert [row[0] for row in table["data"]] == [e["stage"] for e in results["stages"]]
    assert [r["exit"]["exit_code"] for r in records if "exit" in r] == [0]


def test_each_job_gets_its_own_run(fast_cfg, tmp_path, no_wandb_key):
    ids = []
    for i, distill in enumerate(("none", "kd")):
        cfg = fast_cfg("logger=wandb", f"distill={distill}", "baseline=false",
                       f"paths.output_dir={tmp_path}/job{i}")
        run(cfg)
        ids.append(next(r["run"]["run_id"] for r in _records(tmp_path / f"job{i}") if "run" in r))
    assert ids[0] != ids[1]
