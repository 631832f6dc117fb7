"""``kdlab-compare PATH…``: compare finished runs without W&B.

Reads the ``results.json`` of runs (a run folder, a multirun folder, or any folder above them),
groups the runs by every config key whose value differs between them (seeds, bookkeeping and
the options of a differing choice aside: :mod:`kdlab.compare.labels`), aggregates the seeds of
each group (mean ± sample std, n) for every stage of the runs (student, baseline, teacher,
generations …) with the gain over the baseline of the same runs, shows a baseline shared by
several groups once and flags rows of one stage trained for different lengths
(:mod:`kdlab.compare.runs`). It prints the table and writes, in the output folder:

* ``compare.csv``: one line per (group, stage), unrounded: mean, std and n of the metric and
  of ``val/acc``, mean, std and n of the per-seed gain over the baseline, the epochs, the
  length and whether it differs from the stage's other rows, parameters, CPU latency, runs;
* ``compare_seeds.csv``: the long format, one line per (run, stage): the group's keys, the
  seed, the metric, ``val/acc``, the paired baseline's metric and the gain, the epochs, the
  run folder (``pandas.read_csv`` then ``pivot_table(index=..., columns="seed")``);
* ``compare.md``: the table and its notes;
* the PNG and PDF figures of :mod:`kdlab.compare.plots`.

``--by KEY…`` fixes the grouping keys by hand.
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
from kdlab.compare.runs import (
    BASELINE,
    TEACHER,
    Row,
    aggregate,
    is_percent,
    length_notes,
    length_text,
    load_runs,
    mean_std,
)
from kdlab.util.errors import KdlabError
from kdlab.util.report import markdown

#: marks the epochs of a row whose length differs from the other rows of its stage
DIFFERS = "≠"


def _pm(values: Sequence[float], sign: bool = False, percent: bool = True) -> str:
    """``mean ± std`` in % (2 decimals), or as they are (4 significant decimals) for a metric
    that is not a fraction."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    scale, digits = (100, 2) if percent else (1, 4)
    text = f"{scale * mean:+.{digits}f}" if sign else f"{scale * mean:.{digits}f}"
    return text + ("" if math.isnan(std) else f" ± {scale * std:.{digits}f}")


def _epochs(row: Row) -> str:
    epochs = row.epochs
    text = "—" if not epochs else str(epochs[0]) if len(epochs) == 1 \
        else f"{epochs[0]}–{epochs[-1]}"
    return f"{text} {DIFFERS}" if row.length_differs else text


def headers(keys: Sequence[str], metric: str) -> list[str]:
    """The columns of the comparison table."""
    name = ("test acc %" if metric == "test/acc" else f"{metric} %" if is_percent(metric)
            else metric)
    return [*keys, "stage", "model", "n", name, "gain vs baseline", "val acc %", "epochs",
            "params", "CPU ms/batch"]


#: columns aligned right in the terminal
NUMERIC = ("n", "gain vs baseline", "val acc %", "epochs", "params", "CPU ms/batch")


def table(keys: Sequence[str], rows: Sequence[Row], metric: str = "test/acc"
          ) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of the comparison table."""
    body = []
    for row in rows:
        percent = is_percent(metric)
        gain = ("—" if row.stage in (TEACHER, BASELINE)
                else _pm(row.gains, sign=True, percent=percent))
        if row.gains and len(row.gains) < row.n:
            gain += f" (n={len(row.gains)})"
        body.append([*(row.group.get(k, "—") for k in keys), row.stage, row.model, str(row.n),
                     _pm(row.test_acc, percent=percent), gain, _pm(row.val_acc), _epochs(row),
                     "—" if row.params is None else f"{row.params:,}",
                     "—" if row.latency_ms is None else f"{row.latency_ms:.2f}"])
    return headers(keys, metric), body


def notes(rows: Sequence[Row], metric: str = "test/acc") -> list[str]:
    """The lines under the table: rows of different length, baselines shown once."""
    lines = [f"{DIFFERS} {note}" for note in length_notes(rows)]
    lines += [f"{row.label}: one baseline shared by {len(row.shared_by)} groups, shown once"
              for row in rows if row.shared_by]
    gains = [row for row in rows if row.stage not in (TEACHER, BASELINE)]
    if any(row.gains for row in gains):
        units = ("percentage points" if is_percent(metric)
                 else f"{metric} (in its units; lower is better for losses, bits and KL)")
        lines.append(f"gain vs baseline: {units} over the baseline of the same seed "
                     "(the run's own, else that of a run alike but for the strategy), "
                     "mean ± std over the runs that have one (n where fewer than the row's)")
    return lines


def _num(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else repr(value)


def write_csv(path: Path, keys: Sequence[str], rows: Sequence[Row], metric: str) -> None:
    """One line per (group, stage) with the numbers unrounded."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "stage", "model", "n", "seeds", f"{metric} mean",
                         f"{metric} std", "val/acc mean", "val/acc std", f"{metric} gain mean",
                         f"{metric} gain std", "gain n", "epochs", "length", "length differs",
                         "params", "latency_ms", "runs"])
        for row in rows:
            stats = (*mean_std(row.test_acc), *mean_std(row.val_acc), *mean_std(row.gains))
            writer.writerow([
                *(row.group.get(k, "") for k in keys), row.stage, row.model, row.n,
                " ".join(str(s) for s in row.seeds), *(_num(v) for v in stats),
                len(row.gains), " ".join(str(e) for e in row.epochs),
                "; ".join(length_text(length) for length in dict.fromkeys(row.lengths)),
                row.length_differs, "" if row.params is None else row.params,
                _num(row.latency_ms), " ".join(str(p) for p in row.runs)])


def write_seeds_csv(path: Path, keys: Sequence[str], rows: Sequence[Row], metric: str) -> None:
    """The long format: one line per (run, stage) of every row, unrounded."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "stage", "model", "seed", metric, "val/acc",
                         f"baseline {metric}", f"{metric} gain", "epochs", "length differs",
                         "params", "latency_ms", "run"])
        for row in rows:
            for entry in row.entries:
                length = entry.length
                writer.writerow([
                    *(row.group.get(k, "") for k in keys), row.stage, row.model,
                    "" if entry.run.seed is None else entry.run.seed, repr(entry.value),
                    _num(entry.metrics.get("val/acc")), _num(entry.baseline), _num(entry.gain),
                    "" if length is None else length[0], row.length_differs,
                    "" if entry.info.get("params") is None else entry.info["params"],
                    _num(entry.info.get("latency_ms")), str(entry.run.path)])


def print_rich(headers: Sequence[str], body: Sequence[Sequence[str]], title: str,
               lines: Sequence[str] = ()) -> None:
    """The table in the terminal, and its notes under it."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    out = Table(title=title)
    for i, header in enumerate(headers):
        numeric = header in NUMERIC or i == headers.index("n") + 1
        out.add_column(header, justify="right" if numeric else "left")
    for cells in body:
        out.add_row(*cells)
    console.print(out)
    for line in lines:
        console.print(line, markup=False, highlight=False)


def compare(paths: Sequence[str | Path], out: Path | None = None, by: Sequence[str] | None = None,
            metric: str = "test/acc", plots: bool = True) -> dict[str, Any]:
    """Compare the runs under ``paths``; write the tables and plots to ``out``. Returns
    ``{"keys", "rows", "notes", "files"}``."""
    runs = load_runs(paths)
    keys, rows = aggregate(runs, by, metric)
    if not rows:
        raise KdlabError(f"no stage of the {len(runs)} run(s) has a {metric} metric")
    if out is None:
        first = Path(paths[0])
        out = (first if first.is_dir() else first.parent) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    head, body = table(keys, rows, metric)
    lines = notes(rows, metric)
    print_rich(head, body, f"{len(runs)} runs, {metric} (mean ± std over seeds)", lines)
    files = [out / "compare.csv", out / "compare_seeds.csv", out / "compare.md"]
    write_csv(files[0], keys, rows, metric)
    write_seeds_csv(files[1], keys, rows, metric)
    cells = [[cell.replace("|", "\\|") for cell in cells] for cells in body]  # kd|dkd
    files[2].write_text(markdown(head, cells) + "\n" + "".join(f"\n{line}\n" for line in lines))
    if plots:
        files += plot_all(rows, out, metric)
    print("wrote " + ", ".join(str(f) for f in files))
    return {"keys": keys, "rows": rows, "notes": lines, "files": files}


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
    parser.add_argument("--no-plots", action="store_true", help="tables only (CSV, Markdown)")
    args = parser.parse_args(argv)
    try:
        compare(args.paths, args.out, args.by, args.metric, plots=not args.no_plots)
    except KdlabError as e:
        print(f"kdlab-compare: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
