"""``kdlab-compare PATH…``: compare finished runs without W&B.

Reads the ``results.json`` of runs (a run folder, a multirun folder, or any folder above them),
groups the runs by the config keys whose values differ between them (the seed aside), aggregates
the seeds of each group (mean ± sample std, n) for every stage of the runs (student, baseline,
teacher, generations …), prints the table, writes ``compare.csv`` and ``compare.md`` and plots
the PNGs of :mod:`kdlab.compare_plots`.

The grouping keys are chosen to be few and readable: among the keys that differ, a key is kept
only if it splits the runs further than the keys kept before it, trying ``<group>.name`` keys
first (shown as ``distill=kd``), then shallower keys. ``--by KEY`` fixes them by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.errors import KdlabError, close_matches
from kdlab.report import markdown

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
        runs.append(Run(path.parent, results, flatten(results.get("config") or {})))
    return runs


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


def _pm(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    return f"{100 * mean:.2f}" + ("" if math.isnan(std) else f" ± {100 * std:.2f}")


HEADERS = ["stage", "model", "n", "test acc %", "val acc %", "params", "CPU ms/batch"]


def table(keys: Sequence[str], rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of the comparison table."""
    body = []
    for row in rows:
        body.append([*(row.group[k] for k in keys), row.stage, row.model, str(row.n),
                     _pm(row.test_acc), _pm(row.val_acc),
                     "—" if row.params is None else f"{row.params:,}",
                     "—" if row.latency_ms is None else f"{row.latency_ms:.2f}"])
    return [*keys, *HEADERS], body


def write_csv(path: Path, keys: Sequence[str], rows: Sequence[Row], metric: str) -> None:
    """One line per (group, stage) with the numbers unrounded."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "stage", "model", "n", f"{metric} mean", f"{metric} std",
                         "val/acc mean", "val/acc std", "params", "latency_ms", "runs"])
        for row in rows:
            test, val = mean_std(row.test_acc), mean_std(row.val_acc)
            writer.writerow([*(row.group[k] for k in keys), row.stage, row.model, row.n,
                             *("" if math.isnan(v) else repr(v) for v in (*test, *val)),
                             "" if row.params is None else row.params,
                             "" if row.latency_ms is None else repr(row.latency_ms),
                             " ".join(str(p) for p in row.runs)])


def print_rich(headers: Sequence[str], body: Sequence[Sequence[str]], title: str) -> None:
    """The table in the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    out = Table(title=title)
    for header in headers:
        numeric = header in HEADERS[2:]
        out.add_column(header, justify="right" if numeric else "left")
    for cells in body:
        out.add_row(*cells)
    console.print(out)


def compare(paths: Sequence[str | Path], out: Path | None = None, by: Sequence[str] | None = None,
            metric: str = "test/acc", plots: bool = True) -> dict[str, Any]:
    """Compare the runs under ``paths``; write the table and plots to ``out``. Returns
    ``{"keys", "rows", "files"}``."""
    runs = load_runs(paths)
    keys, rows = aggregate(runs, by, metric)
    if not rows:
        raise KdlabError(f"no stage of the {len(runs)} run(s) has a {metric} metric")
    if out is None:
        first = Path(paths[0])
        out = (first if first.is_dir() else first.parent) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    headers, body = table(keys, rows)
    print_rich(headers, body, title=f"{len(runs)} runs, {metric} (mean ± std over seeds)")
    files = [out / "compare.csv", out / "compare.md"]
    write_csv(files[0], keys, rows, metric)
    files[1].write_text(markdown(headers, body) + "\n")
    if plots:
        from kdlab.compare_plots import plot_all

        files += plot_all(rows, out, metric)
    print("wrote " + ", ".join(str(f) for f in files))
    return {"keys": keys, "rows": rows, "files": files}


def cli(argv: Sequence[str] | None = None) -> None:
    """``kdlab-compare PATH… [--by KEY…] [--metric test/acc] [--out DIR] [--no-plots]``."""
    parser = argparse.ArgumentParser(
        prog="kdlab-compare",
        description="Aggregate kdlab runs over seeds, grouped by the config keys that differ.")
    parser.add_argument("paths", nargs="+", help="run folders, multirun folders or results.json")
    parser.add_argument("--by", nargs="+", default=None,
                        help="group by these config keys (default: those that differ)")
    parser.add_argument("--metric", default="test/acc", help="stage metric to aggregate")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <first folder>/compare)")
    parser.add_argument("--no-plots", action="store_true", help="table, CSV and Markdown only")
    args = parser.parse_args(argv)
    try:
        compare(args.paths, args.out, args.by, args.metric, plots=not args.no_plots)
    except KdlabError as e:
        print(f"kdlab-compare: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
