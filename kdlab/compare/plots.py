"""The PNGs of ``kdlab-compare``: accuracy per group with error bars, accuracy against size and
CPU latency (the teacher marked), and validation learning curves read from the CSV logs."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from kdlab.compare.runs import Row, mean_std  # noqa: E402

TEACHER = "teacher"


def plot_all(rows: Sequence[Row], out: Path, metric: str = "test/acc") -> list[Path]:
    """Write every plot that the rows have data for; returns the files written."""
    files = [plot_accuracy(rows, out / "accuracy.png", metric)]
    for axis in ("params", "latency"):
        path = plot_tradeoff(rows, out / f"accuracy_vs_{axis}.png", axis, metric)
        if path is not None:
            files.append(path)
    path = plot_learning_curves(rows, out / "learning_curves.png")
    if path is not None:
        files.append(path)
    return files


def _pct(values: Sequence[float]) -> tuple[float, float]:
    mean, std = mean_std(values)
    return 100 * mean, 0.0 if std != std else 100 * std  # nan std (n = 1) → no error bar


def plot_accuracy(rows: Sequence[Row], path: Path, metric: str) -> Path:
    """Bars of every non-teacher stage per group (mean ± std over seeds); the teacher of each
    group as a black tick across it."""
    labels = list(dict.fromkeys(row.label for row in rows))
    stages = list(dict.fromkeys(row.stage for row in rows if row.stage != TEACHER))
    width = 0.8 / max(1, len(stages))
    lines = max(label.count(", ") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(min(24.0, max(5.0, 0.6 + 1.5 * len(labels))),
                                    3.5 + 0.18 * lines))
    lowest = 100.0
    for s, stage in enumerate(stages):
        xs, means, stds = [], [], []
        for i, label in enumerate(labels):
            row = next((r for r in rows if r.label == label and r.stage == stage), None)
            if row is None:
                continue
            mean, std = _pct(row.test_acc)
            xs.append(i - 0.4 + width * (s + 0.5))
            means.append(mean)
            stds.append(std)
            lowest = min(lowest, mean - std)
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=stage)
    teacher_drawn = False
    for i, label in enumerate(labels):
        row = next((r for r in rows if r.label == label and r.stage == TEACHER), None)
        if row is not None:
            mean, _ = _pct(row.test_acc)
            ax.hlines(mean, i - 0.45, i + 0.45, colors="black", linestyles="--",
                      label=None if teacher_drawn else TEACHER)
            teacher_drawn = True
            lowest = min(lowest, mean)
    groups = {row.label: row.group for row in rows}
    ax.set_xticks(range(len(labels)), ["\n".join(groups[label].values()) or label
                                       for label in labels], fontsize="small")
    ax.set_xlabel(" / ".join(next(iter(groups.values()))))
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(max(0.0, lowest - 5), None)
    ax.legend(fontsize="small")
    ax.set_title("accuracy per group (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tradeoff(rows: Sequence[Row], path: Path, axis: str, metric: str) -> Path | None:
    """Accuracy against parameters (log scale) or CPU latency; the teacher as a red star."""
    points = [r for r in rows
              if (r.params if axis == "params" else r.latency_ms) is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    by_stage: dict[str, list[Row]] = defaultdict(list)
    for row in points:
        by_stage[row.stage].append(row)
    for stage, members in by_stage.items():
        xs = [float(r.params if axis == "params" else r.latency_ms) for r in members]
        ys, errs = zip(*(_pct(r.test_acc) for r in members))
        if stage == TEACHER:
            ax.scatter(xs, ys, marker="*", s=220, c="red", zorder=3, label=TEACHER)
        else:
            ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3, label=stage)
        for x, y, row in zip(xs, ys, members):
            if stage != TEACHER or len(by_stage[TEACHER]) == 1:
                ax.annotate(row.short_label if stage != TEACHER else TEACHER, (x, y),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    if axis == "params":
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
    else:
        ax.set_xlabel("CPU latency (ms per batch)")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_curve(stage_dir: Path, key: str = "val/acc") -> dict[int, float]:
    """``{epoch: value}`` of ``key`` in a stage's CSV log (``<stage>/logs/**/metrics.csv``)."""
    curve: dict[int, float] = {}
    for path in sorted((stage_dir / "logs").rglob("metrics.csv")):
        with path.open() as f:
            for record in csv.DictReader(f):
                if record.get(key) and record.get("epoch") not in (None, ""):
                    curve[int(float(record["epoch"]))] = float(record[key])
    return curve


def plot_learning_curves(rows: Sequence[Row], path: Path, key: str = "val/acc") -> Path | None:
    """Validation accuracy per epoch of every non-teacher (group, stage), mean over seeds;
    ``None`` when no run has a CSV log (``logger=csv``, the default)."""
    curves = []
    for row in rows:
        if row.stage == TEACHER:
            continue
        per_epoch: dict[int, list[float]] = defaultdict(list)
        for stage_dir in row.stage_dirs:
            for epoch, value in read_curve(stage_dir, key).items():
                per_epoch[epoch].append(value)
        if per_epoch:
            epochs = sorted(per_epoch)
            curves.append((f"{row.short_label} · {row.stage}", epochs,
                           [100 * statistics.fmean(per_epoch[e]) for e in epochs]))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for label, epochs, values in curves:
        ax.plot([e + 1 for e in epochs], values, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{key} (%)")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    ax.set_title("learning curves (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
