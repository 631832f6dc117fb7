"""Finished runs read back: ``results.json`` files found, grouped by the config keys that differ,
aggregated over seeds into table rows (mean ± std, n); the tables :mod:`kdlab.compare.cli`
prints and writes."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.util.errors import KdlabError, close_matches

#: config keys that never define a group: where files went, the seed (aggregated over), the
#: resume checkpoint, progress bars and the logger's folders
IGNORED_PREFIXES = ("paths.", "hydra.", "seed", "ckpt_path", "trainer.enable_progress_bar",
                    "logger.", "latency.", "callbacks.")


@dataclass
class Run:
    """One finished run: its folder, its ``results.json`` and its flattened config."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


@dataclass
class Row:
    """One (group, stage) of the comparison, aggregated over the group's runs."""

    group: dict[str, str]
    stage: str
    model: str
    runs: list[Path]
    test_acc: list[float]
    val_acc: list[float]
    params: int | None
    latencies: list[float]
    stage_dirs: list[Path]

    @property
    def n(self) -> int:
        return len(self.test_acc)

    @property
    def latency_ms(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.group.items()) or "all runs"

    @property
    def short_label(self) -> str:
        """The group's values only (``kd/4``), for plots."""
        return "/".join(self.group.values()) or "all runs"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become their JSON text."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, list):
        return {prefix[:-1]: json.dumps(node)}
    return {prefix[:-1]: node}


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` given or below the given folders, in a stable order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.name == "results.json":
            found.append(path)
        elif path.is_dir():
            hits = sorted(path.rglob("results.json"))
            if not hits:
                raise KdlabError(f"{path}: no results.json below this folder (is the run "
                                 "finished? kdlab-train writes it at the end of a run)")
            found += hits
        else:
            raise KdlabError(f"{path}: not a folder or a results.json file")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """The runs of :func:`find_results`; an unreadable file is named in the error."""
    runs = []
    for path in find_results(paths):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise KdlabError(f"{path}: not a readable results.json ({e})") from None
        if "student" not in results and not results.get("stages"):
            raise KdlabError(f"{path}: no student or stages in it; is it a kdlab results.json?")
        runs.append(Run(path.parent, results, run_config(results.get("config") or {})))
    return runs


def run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's config flattened (:func:`flatten`), with ``distill.name``: the label of its
    strategies (``kd``, ``kd+at``, ``none``; the strategies sit under their names,
    ``distill.<name>.<key>``), so that runs group by strategy first."""
    flat = flatten(config)
    distill = config.get("distill")
    if isinstance(distill, Mapping) and "name" not in distill:
        flat["distill.name"] = "+".join(str(k) for k, v in distill.items()
                                        if isinstance(v, Mapping)) or "none"
    return flat


def _ignored(key: str) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p) for p in IGNORED_PREFIXES)


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys (seed and bookkeeping aside) whose values are not the same in every run."""
    keys = sorted({k for run in runs for k in run.config})
    return [k for k in keys if not _ignored(k)
            and len({json.dumps(run.config.get(k), default=str) for run in runs}) > 1]


def _priority(key: str) -> tuple[int, int, str]:
    return (0 if key.endswith(".name") or key == "task_name" else 1, key.count("."), key)


def group_keys(runs: Sequence[Run]) -> list[str]:
    """A small set of differing keys that splits the runs exactly as all of them do, seeds
    aside: a key is kept only if it splits the runs further than the seed and the keys kept
    before it (so ``data.label_seed: ${seed}`` and the like never form groups)."""
    chosen: list[str] = []

    def parts(keys: list[str]) -> int:
        return len({(str(r.seed), *(str(r.config.get(k)) for k in keys)) for r in runs})

    current = parts([])
    for key in sorted(differing_keys(runs), key=_priority):
        split = parts([*chosen, key])
        if split > current:
            chosen.append(key)
            current = split
    return chosen


def _display(key: str) -> str:
    return key[: -len(".name")] if key.endswith(".name") else key


def _stages(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    if results.get("stages"):
        return list(results["stages"])
    return [{"stage": role, **results[role]} for role in ("teacher", "student", "baseline")
            if results.get(role)]


def _stage_dir(entry: Mapping[str, Any], run: Run) -> Path:
    ckpt = entry.get("best_ckpt") or entry.get("last_ckpt")
    if ckpt:
        return Path(ckpt).parent.parent
    return run.path


def aggregate(runs: Sequence[Run], keys: Sequence[str] | None = None,
              metric: str = "test/acc") -> tuple[list[str], list[Row]]:
    """Group ``runs`` by ``keys`` (default :func:`group_keys`) and aggregate every stage."""
    keys = list(group_keys(runs) if keys is None else keys)
    for key in keys:
        if not any(key in run.config for run in runs):
            options = sorted({k for run in runs for k in run.config})
            raise KdlabError(f"--by {key}: no run has this config key"
                             f"{close_matches(key, options)}")
    rows: dict[tuple, Row] = {}
    for run in runs:
        group = {_display(k): _short(run.config.get(k)) for k in keys}
        for entry in _stages(run.results):
            metrics = entry.get("metrics") or {}
            value = metrics.get(metric)
            if value is None:
                continue
            stage = str(entry.get("stage", "student"))
            ident = (tuple(group.items()), stage)
            row = rows.get(ident)
            if row is None:
                row = rows[ident] = Row(group, stage, str(entry.get("model", "")), [], [], [],
                                        entry.get("params"), [], [])
            row.runs.append(run.path)
            row.test_acc.append(float(value))
            if metrics.get("val/acc") is not None:
                row.val_acc.append(float(metrics["val/acc"]))
            if entry.get("latency_ms") is not None:
                row.latencies.append(float(entry["latency_ms"]))
            row.stage_dirs.append(_stage_dir(entry, run))
    return [_display(k) for k in keys], list(rows.values())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text.rsplit(".", 1)[-1] if text.count(".") > 1 and " " not in text else text


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` for one value)."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan
