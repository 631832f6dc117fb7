"""Resume after kill -9: the same command, killed at random points several times, ends where
an uninterrupted run does (CPU, deterministic=true) — weights, metrics, everything."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST

#: FAST with more batches per epoch and one optimizer step per Lightning step, so that kills
#: land inside epochs of every stage (teacher, student, baseline)
ARGS = [*FAST, "teacher.train.max_epochs=2", "trainer.max_epochs=3",
        "trainer.limit_train_batches=40", "steps_per_call=1", "trainer.deterministic=true",
        "student.model.dropout=0.3"]  # dropout: the RNG state must be restored too


def _command(folder: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "kdlab.train", *ARGS, f"hydra.run.dir={folder}",
            f"paths.teacher_store={store}", f"paths.log_dir={folder.parent}"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _last_writes(folder: Path, seen: set) -> int:
    """Add every (last.ckpt, mtime) not seen before to ``seen``; returns how many there are."""
    for path in folder.rglob("last.ckpt"):
        try:
            seen.add((str(path), path.stat().st_mtime_ns))
        except FileNotFoundError:  # replaced while we looked
            pass
    return len(seen)


def _weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(_command(reference, tmp_path / "store_a"), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = json.loads((reference / "results.json").read_text())

    rng = random.Random(int(os.environ.get("KDLAB_TEST_SEED", "0")))
    folder, store = tmp_path / "killed", tmp_path / "store_b"
    seen: set = set()
    kills = 0
    for attempt in range(3):  # kill -9 inside an epoch after a random number of epochs, 3 times
        target = _last_writes(folder, seen) + rng.randint(1, 3)
        log = (tmp_path / f"attempt{attempt}.log").open("w")
        proc = subprocess.Popen(_command(folder, store), cwd=tmp_path, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if _last_writes(folder, seen) >= target:
                time.sleep(rng.uniform(0.05, 0.5))  # inside the next epoch
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        log.close()
    assert kills >= 2, "the run finished before it could be killed: lengthen it"
    logs = "".join((tmp_path / f"attempt{i}.log").read_text() for i in range(1, 3))
    assert "Resuming " in logs and "checkpoints/last.ckpt" in logs  # a stage went on mid-way

    final = subprocess.run(_command(folder, store), cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "Resuming the run in" in final.stdout + final.stderr
    resumed = json.loads((folder / "results.json").read_text())
    for role in ("teacher", "student", "baseline"):
        assert resumed[role]["metrics"]["test/acc"] == expected[role]["metrics"]["test/acc"], role
        assert resumed[role]["metrics"]["val/acc"] == expected[role]["metrics"]["val/acc"], role
    for role in ("student", "baseline"):
        a, b = _weights(expected[role]["last_ckpt"]), _weights(resumed[role]["last_ckpt"])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{role} weights differ after resume"
    # every stage's metrics.csv holds the whole history, each row once, as if never stopped
    files = sorted(p.relative_to(reference) for p in reference.rglob("metrics.csv"))
    assert len(files) == 3 and files == sorted(p.relative_to(folder)
                                               for p in folder.rglob("metrics.csv"))
    for name in files:
        assert _history(folder / name) == _history(reference / name), name
    assert not list(folder.rglob("*.before-resume"))


def _history(path: Path) -> list[tuple]:
    """A metrics.csv's rows without the timing columns (speed/…), sorted."""
    import csv

    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return sorted(tuple(sorted((k, v) for k, v in r.items() if v and not k.startswith("speed/")))
                  for r in rows)


def test_ckpt_path_last_finds_the_unfinished_run(fast_cfg, tmp_path):
    from kdlab.modes.resume import MARKER, run_key, select_last_run
    from kdlab.util.errors import KdlabError

    cfg = fast_cfg("ckpt_path=last")
    with pytest.raises(KdlabError, match="ckpt_path=last: no unfinished run of this config"):
        select_last_run(cfg)
    old = tmp_path / "logs" / "runs" / "2026-01-01_00-00-00"
    old.mkdir(parents=True)
    (old / MARKER).write_text(json.dumps({"key": run_key(cfg)}))
    select_last_run(cfg)
    assert cfg.paths.output_dir == str(old) and cfg.ckpt_path is None


def test_a_folder_of_another_unfinished_run_is_refused(fast_cfg, tmp_path):
    from kdlab.modes.resume import prepare_run
    from kdlab.util.errors import KdlabError

    folder = tmp_path / "run"
    folder.mkdir()
    assert prepare_run(fast_cfg("distill=kd"), folder) is False
    assert prepare_run(fast_cfg("distill=kd"), folder) is True  # same config: resume
    assert prepare_run(fast_cfg("distill=at"), folder) is False  # no checkpoint yet: reused
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(KdlabError, match="holds an unfinished run of another config"):
        prepare_run(fast_cfg("distill=none"), folder)
    (folder / "results.json").write_text("{}")  # finished: the folder may be reused
    assert prepare_run(fast_cfg("distill=none"), folder) is False


def test_sigterm_stops_with_a_nonzero_exit_and_the_command_that_resumes(tmp_path):
    """A scheduler's stop (SIGTERM) in the middle of the student's training: exit code 143,
    no results.json, one line with the command; that command finishes the run."""
    folder, store = tmp_path / "run", tmp_path / "store"
    command = _command(folder, store)
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    student_last = folder / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while proc.poll() is None and not student_last.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the student's first epoch did"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not (folder / "results.json").exists()
    (line,) = [x for x in stderr.splitlines() if x.startswith("kdlab: error: ")]
    assert "stopped by SIGTERM before the run finished (no results.json)" in line
    resume = line.split("continues it from its last checkpoint: ", 1)[1]
    assert resume.startswith("kdlab-train ") and f"hydra.run.dir={folder}" in resume
    args = shlex.split(resume)[1:]  # the line is a shell command
    done = subprocess.run([sys.executable, "-m", "kdlab.train", *args], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resuming " in done.stdout + done.stderr
    assert json.loads((folder / "results.json").read_text())["student"]["metrics"]["epochs"] == 3


def test_ctrl_c_and_sigterm_raise_run_stopped_with_the_shells_exit_code():
    from kdlab.util.runtime import RunStopped, stop_on_signals

    for signum in (signal.SIGINT, signal.SIGTERM):
        with pytest.raises(RunStopped) as stopped, stop_on_signals():
            os.kill(os.getpid(), signum)
            time.sleep(1)
        assert stopped.value.exit_code == 128 + signum and str(stopped.value) == signum.name
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_the_run_key_leaves_out_where_the_run_writes(tmp_path):
    """The default CSV logger's save_dir is ${paths.output_dir}: two launches of one config in
    two folders (and other log, store folders) are the same run."""
    from kdlab.modes.resume import run_key
    from tests.conftest import make_cfg

    a, b = make_cfg(tmp_path / "a", FAST), make_cfg(tmp_path / "b", FAST)
    assert a.logger.csv.save_dir != b.logger.csv.save_dir
    assert run_key(a) == run_key(b)
    assert run_key(a) != run_key(make_cfg(tmp_path / "a", [*FAST, "seed=7"]))


def _stop_when(proc: subprocess.Popen, path_glob: str, log_dir: Path) -> None:
    """SIGTERM ``proc`` as soon as a file matching ``path_glob`` exists under ``log_dir``."""
    deadline = time.time() + 300
    while proc.poll() is None and not list(log_dir.glob(path_glob)) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM


def test_the_plain_rerun_continues_the_unfinished_run_teacher_included(tmp_path):
    """No hydra.run.dir: each launch gets a fresh Hydra folder. Stopped while the teacher
    trains, the same command continues that run in its folder (teacher from its last.ckpt);
    stopped again in the student, ckpt_path=last finishes it there."""
    logs, store = tmp_path / "logs", tmp_path / "store"
    command = [sys.executable, "-m", "kdlab.train", *ARGS, f"paths.log_dir={logs}",
               f"paths.teacher_store={store}", "trainer.deterministic=false"]

    def launch():
        return subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    _stop_when(launch(), "runs/*/teacher/checkpoints/last.ckpt", logs)
    (first,) = list((logs / "runs").iterdir())
    time.sleep(1.1)  # Hydra's folders are named by the second
    proc = launch()
    _stop_when(proc, "runs/*/checkpoints/last.ckpt", logs)
    second = [f for f in (logs / "runs").iterdir() if f != first]
    assert len(second) == 1 and json.loads((second[0] / "kdlab_continued.json").read_text()) \
        == {"continued_in": str(first)}
    assert not (second[0] / "checkpoints").exists()  # nothing trained in the fresh folder
    assert "Resuming " in (first / "train.log").read_text()  # the teacher went on mid-way
    time.sleep(1.1)
    done = subprocess.run([*command, "ckpt_path=last"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((first / "results.json").read_text())
    assert results["student"]["metrics"]["epochs"] == 3
    teacher = torch.load(first / "teacher" / "checkpoints" / "last.ckpt", weights_only=True)
    assert teacher["epoch"] == 1  # its 2 epochs, trained in the first folder
    assert not [f for f in (logs / "runs").iterdir() if (f / "results.json").exists()
                and f != first]


def test_a_second_run_into_a_folder_in_use_is_refused(fast_cfg, tmp_path):
    """The first run holds the folder's lock: a second one into it is one line naming the
    first (pid), and a folder in use is never picked to be continued."""
    from kdlab.modes.resume import MARKER, find_unfinished, hold_run_folder, run_key
    from kdlab.train import execute
    from kdlab.util.errors import KdlabError

    cfg = fast_cfg()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"key": run_key(cfg)}))
    with hold_run_folder(folder):
        with pytest.raises(KdlabError, match=rf"paths.output_dir={folder} is in use by another "
                                             rf"kdlab run \(pid {os.getpid()} on .* since "):
            execute(cfg)
        assert find_unfinished(tmp_path, run_key(cfg)) is None
    (tmp_path / "runs").mkdir()
    os.replace(folder, tmp_path / "runs" / "old")
    assert find_unfinished(tmp_path, run_key(cfg)) == tmp_path / "runs" / "old"
