"""A benchmark's record of finished sweeps, kept in the repository (``docs/results/``).

A table such as the 12-epoch protocol takes longer than one working session, and a session's
``outputs/`` do not survive it. The record keeps, for every finished Hydra multirun, what a
table is written from: the exact overrides it ran with (the key: a sweep is reused only when
they are equal, minus machine-specific paths), each run's seed, chosen value and accuracies, the
sweep's wall time, date, commit and CPU. It also names the one teacher every run reads (store key,
SHA-256 of its weights, test accuracy): runs made with another teacher are refused, and a copy of
the teacher's store entry beside the record lets a later session train against the same weights
instead of retraining one (CPU kernels differ between machines, so a retrained teacher is not
bit-identical).

Writes are atomic (a temporary file renamed over the record), so a stopped benchmark never
leaves a broken record.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from kdlab.util.files import write_atomic

#: overrides that name places on this machine, not what a run computes
PORTABLE_SKIP = ("paths.teacher_store=",)


def portable(overrides: list[str]) -> list[str]:
    """``overrides`` without the machine-specific ones (the record's key)."""
    return [o for o in overrides if not o.startswith(PORTABLE_SKIP)]


def _commit(root: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                         capture_output=True)
    return out.stdout.strip() or "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nested(path: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def compact(result: dict, paths: list[str]) -> dict:
    """What a table reads of one run's ``results.json``: the config values at ``paths`` (and
    the seed), the student's validation and test accuracy (and each head's, ``test/acc_<head>``,
    for a student that averages heads) and size, the teacher's, the baseline's test accuracy."""
    config: dict = {"seed": result["config"].get("seed")}
    for path in paths:
        value: Any = result["config"]
        for part in path.split("."):
            value = value[part]
        _merge(config, _nested(path, value))
    student = result["student"]
    metrics = {k: student["metrics"][k] for k in ("val/acc", "test/acc")}
    metrics.update({k: v for k, v in student["metrics"].items() if k.startswith("test/acc_")})
    out = {"config": config, "student": {"metrics": metrics, "params": student.get("params")}}
    baseline = result.get("baseline")
    if baseline:
        out["baseline"] = {"metrics": {"test/acc": baseline["metrics"]["test/acc"]}}
    teacher = result.get("teacher")
    if teacher:
        source = teacher.get("source") or {}
        out["teacher"] = {"metrics": {"test/acc": teacher["metrics"]["test/acc"]},
                          "params": teacher.get("params"), "key": source.get("key")}
    return out


class Record:
    """The record file ``path`` (created on the first finished sweep)."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path, self.root = path, root
        self.data: dict = json.loads(path.read_text()) if path.exists() else \
            {"teacher": None, "sweeps": {}}
        self.teachers = path.parent / (path.stem + "-teacher")

    def recorded(self, name: str, overrides: list[str], expected: int) -> list[dict] | None:
        """The runs of sweep ``name`` when it is recorded with exactly these overrides."""
        entry = self.data["sweeps"].get(name)
        if entry is None:
            return None
        if entry["overrides"] != portable(overrides):
            raise SystemExit(
                f"{self.path}: sweep {name} is recorded with other overrides\n"
                f"  recorded: {' '.join(entry['overrides'])}\n"
                f"  now:      {' '.join(portable(overrides))}\n"
                "remove its entry (or the record) to run it again")
        if len(entry["runs"]) < expected:
            return None
        return entry["runs"]

    def add(self, name: str, overrides: list[str], runs: list[dict], wall_s: float,
            paths: list[str], store: Path) -> list[dict]:
        """Record a finished sweep; returns its compact runs."""
        runs = [compact(r, paths) for r in runs]
        for run in runs:
            if "teacher" in run:
                self._check_teacher(run["teacher"], store)
        self.data["sweeps"][name] = {
            "overrides": portable(overrides), "wall_s": round(wall_s, 1),
            "date": time.strftime("%Y-%m-%d"), "commit": _commit(self.root), "cpu": _cpu(),
            "runs": runs}
        self.save()
        return runs

    def _check_teacher(self, teacher: dict, store: Path) -> None:
        entry = store / str(teacher["key"])
        meta = json.loads((entry / "teacher.json").read_text())
        mine = {"key": teacher["key"], "sha256": meta["sha256"],
                "test_acc": teacher["metrics"]["test/acc"], "params": teacher["params"]}
        known = self.data.get("teacher")
        if known is None:
            self.data["teacher"] = mine
            self.teachers.mkdir(parents=True, exist_ok=True)
            for name in ("teacher.json", "teacher.pt"):
                shutil.copy2(entry / name, self.teachers / name)
        elif known["key"] != mine["key"] or known["sha256"] != mine["sha256"]:
            raise SystemExit(
                f"{self.path}: this run read teacher {mine['key']} (sha256 {mine['sha256'][:12]}, "
                f"{100 * mine['test_acc']:.2f}%) but the record's runs read {known['key']} "
                f"(sha256 {known['sha256'][:12]}, {100 * known['test_acc']:.2f}%): rows made "
                "with two teachers would not compare; start a new record (--record)")

    def seed_store(self, store: Path) -> None:
        """Put the record's teacher into ``store`` when it is not there, so that new runs read
        the same weights as the recorded ones."""
        known = self.data.get("teacher")
        if known is None or (store / known["key"] / "teacher.pt").exists():
            return
        if not (self.teachers / "teacher.pt").exists():
            raise SystemExit(f"{self.path} names teacher {known['key']} but {self.teachers} "
                             "does not hold it: new runs could not use the same teacher")
        target = store / known["key"]
        target.mkdir(parents=True, exist_ok=True)
        for name in ("teacher.pt", "teacher.json"):
            shutil.copy2(self.teachers / name, target / name)
        print(f"teacher {known['key']} copied into {store} from {self.teachers}", flush=True)

    def sweeps(self, names: list[str]) -> list[dict]:
        return [self.data["sweeps"][n] for n in names if n in self.data["sweeps"]]

    def save(self) -> None:
        write_atomic(self.path, (json.dumps(self.data, indent=1) + "\n").encode())


def sweep(record: Record, name: str, folder: Path, overrides: list[str], expected: int,
          store: Path, keep: list[str] = (), start: bool = True, cwd: Path | None = None
          ) -> tuple[list[dict], float | None]:
    """Sweep ``name`` of a benchmark: from ``record`` when it holds it under these overrides,
    else one Hydra multirun into ``folder`` (started only when ``start``; runs finished there
    are read either way), recorded once it is whole and timed. Returns its compact runs (with
    the config values at ``keep``) and its wall time in seconds (None: not a whole sweep)."""
    recorded = record.recorded(name, overrides, expected)
    if recorded is not None:
        return recorded, record.data["sweeps"][name]["wall_s"]
    done = sorted(folder.glob("*/results.json"))
    wall_file = folder / "wall_s.txt"
    wall = None
    if len(done) < expected and not start:
        print(f"not starting {folder} ({len(done)} of {expected} runs finished)", flush=True)
    elif len(done) < expected:
        command = ["kdlab-train", "-m", *overrides, f"hydra.sweep.dir={folder}"]
        print("+", " ".join(command), flush=True)
        begin = time.perf_counter()
        proc = subprocess.run(command, cwd=cwd, text=True, stdout=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(command)}")
        wall = time.perf_counter() - begin
        wall_file.write_text(f"{wall:.1f}\n")
        done = sorted(folder.glob("*/results.json"))
    elif wall_file.exists():
        wall = float(wall_file.read_text())
    runs = [json.loads(p.read_text()) for p in done]
    if wall is None or len(runs) < expected:  # not a whole sweep of this benchmark: not recorded
        return [compact(r, list(keep)) for r in runs], None
    return record.add(name, overrides, runs, wall, list(keep), store), wall
