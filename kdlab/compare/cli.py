"""``kdlab-compare PATH…``: compare finished runs without W&B.

Reads the ``results.json`` of runs (a run folder, a multirun folder, or any folder above them),
groups the runs by the config keys whose values differ between them (the seed aside), aggregates
the seeds of each group (mean ± sample std, n) for every stage of the runs (student, baseline,
teacher, generations …), prints the table, writes ``compare.csv`` and ``compare.md`` and plots
the PNGs of :mod:`kdlab.compare.plots`.

The grouping keys are chosen to be few and readable: among the keys that differ, a key is kept
only if it splits the runs further than the keys kept before it, trying ``<group>.name`` keys
first (shown as ``distill=kd``), then shallower keys. ``--by KEY`` fixes them by hand.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdlab.compare.plots import plot_all
from kdlab.compare.runs import Row, aggregate, load_runs, mean_std
from kdlab.util.errors import KdlabError
from kdlab.util.report import markdown


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
