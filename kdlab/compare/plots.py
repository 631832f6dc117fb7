"""The figures of ``kdlab-compare``, each written as a PNG and a PDF beside it: accuracy per group
(horizontal bars, so that labels of any length stay readable), accuracy against size and CPU
latency, and validation learning curves read from the CSV logs.

Every figure names a group by its label (``distill=kd, max_epochs=3``, wrapped between its
parts), draws an error bar or band (± sample std over seeds) only where a row has two or more
runs, and draws each distinct teacher once. Figures are drawn on matplotlib's Agg canvas without
pyplot, so importing this module changes no global backend."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    EngFormatter,
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
)

from kdlab.compare.runs import TEACHER, Row, is_percent, mean_std

#: colours of the stages in the bar chart; other stages take the next free colours
STAGE_COLOURS = {"student": "C0", "baseline": "0.6"}
COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
TEACHER_STYLES = ("--", ":", "-.")
#: labels longer than this wrap onto several lines, between their ``key=value`` parts
WRAP = 34
FONT = 8
#: height of one bar's slot in the bar chart, in inches
SLOT = 0.24


def save(fig: Figure, path: Path) -> list[Path]:
    """Write ``fig`` as ``path`` (PNG) and the same name with ``.pdf``; returns both."""
    FigureCanvasAgg(fig)
    pdf = path.with_suffix(".pdf")
    fig.savefig(path, dpi=150)
    fig.savefig(pdf)
    return [path, pdf]


def plot_all(rows: Sequence[Row], out: Path, metric: str = "test/acc") -> list[Path]:
    """Write every figure that the rows have data for; returns the files written."""
    figures = {"accuracy": accuracy_figure(rows, metric),
               "accuracy_vs_params": tradeoff_figure(rows, "params", metric),
               "accuracy_vs_latency": tradeoff_figure(rows, "latency", metric),
               "learning_curves": curves_figure(rows)}
    files = []
    for name, fig in figures.items():
        if fig is not None:
            files += save(fig, out / f"{name}.png")
    return files


def _pct(values: Sequence[float], percent: bool = True) -> tuple[float, float | None]:
    """Mean and std in % (as they are for a metric that is not a fraction, ``percent=False``);
    std ``None`` for fewer than two values (no error bar)."""
    mean, std = mean_std(values)
    scale = 100 if percent else 1
    return scale * mean, None if std != std else scale * std


def _unit(metric: str) -> str:
    """The axis label of ``metric``: ``test/acc (%)``, or the metric's name."""
    return f"{metric} (%)" if is_percent(metric) else metric


def wrap(label: str, width: int = WRAP) -> str:
    """``label`` on lines of at most ``width`` characters, broken after ``, `` only."""
    lines: list[str] = []
    for part in label.split(", "):
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += ", " + part
        else:
            lines.append(part)
    return ",\n".join(lines)


def teachers(rows: Sequence[Row]) -> list[Row]:
    """The teacher rows, each distinct teacher once: the groups of a sweep share one teacher
    (the same stored network, :meth:`~kdlab.compare.runs.Entry.teacher_identity`)."""
    seen: dict[frozenset[str], Row] = {}
    for row in rows:
        if row.stage == TEACHER:
            seen.setdefault(frozenset(e.teacher_identity() for e in row.entries), row)
    return list(seen.values())


def _teacher_label(row: Row, several: bool, value: float) -> str:
    """``teacher CNN: 54.3``; with its group's label when the figure has several teachers."""
    where = f" ({row.label})" if several else ""
    return f"teacher {row.model}{where}: {value:.1f}" if value >= 10 else \
        f"teacher {row.model}{where}: {value:.3f}"


def palette(n: int) -> list:
    """``n`` distinguishable colours: tab10 up to 10, tab20 up to 20, then repeating."""
    colours = list(COLOURS) if n <= len(COLOURS) else list(colormaps["tab20"].colors)
    return [colours[i % len(colours)] for i in range(n)]


def _legend_height(texts: Sequence[str], ncol: int) -> float:
    """Inches that a legend of ``texts`` in ``ncol`` columns (filled column by column) takes."""
    lines = [text.count("\n") + 1 for text in texts]
    per_column = -(-len(lines) // ncol) if lines else 0
    columns = [lines[i:i + per_column] for i in range(0, len(lines), per_column or 1)]
    return 0.2 + 0.14 * max((sum(c) + 0.4 * len(c) for c in columns), default=0)


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.tick_params(labelsize=FONT)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def _styles(rows: Sequence[Row], table: Sequence[str], fixed: dict[str, str] | None = None
            ) -> dict[str, str]:
    """A style (colour, marker, line style) from ``table`` per non-teacher stage, in order;
    ``fixed`` ones first."""
    fixed = fixed or {}
    free = iter([s for s in table if s not in fixed.values()] * 4)
    stages = dict.fromkeys(row.stage for row in rows if row.stage != TEACHER)
    return {stage: fixed.get(stage) or next(free) for stage in stages}


def _bar_layout(labels: Sequence[str], counts: Sequence[int]) -> tuple[list[float], float]:
    """The y of the first bar of each label (in bar slots; a label wrapped on several lines
    gets room for them) and the total height in slots."""
    starts, y = [], 0.0
    for label, count in zip(labels, counts):
        span = max(count, 0.6 * (wrap(label).count("\n") + 1) + 0.2)
        starts.append(y + (span - count) / 2)
        y += span + 0.5
    return starts, y - 0.5


def accuracy_figure(rows: Sequence[Row], metric: str = "test/acc") -> Figure:
    """Horizontal bars, one per (group, stage) but the teacher, the group's bars together under
    its label (tick labels wrapped between their parts): the mean over seeds, an error bar
    (± std) where n ≥ 2, the value and n written beside it; each distinct teacher once as a
    dashed line; the legend under the axes."""
    percent = is_percent(metric)
    bars = [row for row in rows if row.stage != TEACHER]
    labels = list(dict.fromkeys(row.label for row in bars))
    members = {label: [row for row in bars if row.label == label] for label in labels}
    starts, total = _bar_layout(labels, [len(members[label]) for label in labels])
    colours = _styles(bars, COLOURS, STAGE_COLOURS)
    fig, ax = _figure(6.4, 1.3 + SLOT * total)
    ax.grid(axis="y", visible=False)
    ends, drawn = [], set()
    for label, start in zip(labels, starts):
        for j, row in enumerate(members[label]):
            mean, std = _pct(row.test_acc, percent)
            ax.barh(start + j, mean, 0.8, color=colours[row.stage],
                    label=None if row.stage in drawn else row.stage)
            drawn.add(row.stage)
            if std is not None:
                ax.errorbar(mean, start + j, xerr=std, fmt="none", ecolor="black",
                            capsize=2.5, elinewidth=0.9)
            ends.append((mean, mean + (std or 0.0)))
            digits = 1 if percent else 3
            text = (f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")
                    + f"  n={row.n}")
            ax.annotate(text, (mean + (std or 0.0), start + j), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=FONT - 1,
                        bbox={"fc": "white", "ec": "none", "pad": 0.3, "alpha": 0.8})
    marks = teachers(rows)
    for k, row in enumerate(marks):
        mean, _ = _pct(row.test_acc, percent)
        ax.axvline(mean, color="black", linestyle=TEACHER_STYLES[k % 3], linewidth=1,
                   zorder=1, label=_teacher_label(row, len(marks) > 1, mean))
        ends.append((mean, mean))
    low = min((m for m, _ in ends), default=0.0)
    high = max((e for _, e in ends), default=100.0)
    left = max(0.0, 5 * ((low - 5) // 5)) if percent else 0.0
    ax.set_xlim(left, high + 0.3 * (high - left) + (2 if percent else 0))
    ax.set_yticks([start + (len(members[label]) - 1) / 2 for label, start in zip(labels, starts)],
                  [wrap(label) for label in labels], fontsize=FONT)
    ax.set_ylim(total - 0.4, -0.6)  # the first group on top
    ax.set_xlabel(f"{_unit(metric)}: mean over seeds, error bar ± std where n ≥ 2", fontsize=FONT)
    fig.legend(loc="outside lower center", ncol=min(3, len(drawn) + len(marks)),
               fontsize=FONT - 1, frameon=False)
    return fig


def _x(row: Row, axis: str) -> float | None:
    value = row.params if axis == "params" else row.latency_ms
    return None if value is None else float(value)


def _x_axis(ax: Axes, values: Sequence[float], axis: str) -> None:
    """A log x axis when the values span more than 10×, ticked at 1, 2 and 5 × 10^k with
    plain labels (``5``, ``20``), no minor labels; parameters ticked at the models' own sizes
    (``26.7k``) when there are a few."""
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if axis == "params":
        sizes = sorted(set(values))
        if len(sizes) <= 6:
            ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_major_formatter(EngFormatter(places=1, sep=""))


def tradeoff_figure(rows: Sequence[Row], axis: str, metric: str = "test/acc") -> Figure | None:
    """Accuracy against parameters or CPU latency (log scale when they span more than 10×):
    colour by group, marker by stage, error bars where n ≥ 2, each distinct teacher once as a
    star; ``None`` when no row has that number."""
    percent = is_percent(metric)
    points = [row for row in rows if row.stage != TEACHER and _x(row, axis) is not None]
    stars = [row for row in teachers(rows) if _x(row, axis) is not None]
    if not points and not stars:
        return None
    labels = list(dict.fromkeys(row.label for row in points))
    colours = dict(zip(labels, palette(len(labels))))
    markers = _styles(points, MARKERS)
    legend = [wrap(label) for label in labels]
    fig, ax = _figure(6.4, 3.2 + _legend_height(_padded(legend, len(markers) + len(stars)), 2))
    for row in points:
        mean, std = _pct(row.test_acc, percent)
        ax.errorbar(_x(row, axis), mean, yerr=std, fmt=markers[row.stage],
                    color=colours[row.label], capsize=2.5, markersize=6, elinewidth=0.9,
                    markeredgecolor="white", markeredgewidth=0.6)
    for row in stars:
        ax.plot(_x(row, axis), _pct(row.test_acc, percent)[0], marker="*", markersize=13,
                color="black", linestyle="")
    _x_axis(ax, [v for row in (*points, *stars) if (v := _x(row, axis)) is not None], axis)
    ax.set_xlabel("parameters" if axis == "params" else "CPU latency (ms per batch)",
                  fontsize=FONT)
    ax.set_ylabel(_unit(metric), fontsize=FONT)
    groups = [Line2D([], [], color=colours[label], marker="o", linestyle="",
                     label=wrap(label)) for label in labels]
    keys = [Line2D([], [], color="0.35", marker=marker, linestyle="", label=stage)
            for stage, marker in markers.items()] if len(markers) > 1 else []
    keys += [Line2D([], [], color="black", marker="*", markersize=10, linestyle="",
                    label=_teacher_label(row, len(stars) > 1, _pct(row.test_acc, percent)[0]))
             for row in stars]
    fig.legend(handles=_two_columns(groups, keys), loc="outside lower center", ncol=2,
               fontsize=FONT - 1, frameon=False)
    return fig


def _two_columns(left: list[Line2D], right: list[Line2D]) -> list[Line2D]:
    """Legend handles that a two-column legend (filled column by column) shows as ``left``
    in the first column and ``right`` in the second, blank entries padding the shorter."""
    rows = max(len(left), len(right))
    blank = Line2D([], [], linestyle="", label=" ")
    return [*left, *[blank] * (rows - len(left)), *right, *[blank] * (rows - len(right))]


def _padded(left: list[str], right: int) -> list[str]:
    """The texts of a :func:`_two_columns` legend with ``left`` and ``right`` one-line
    entries, for :func:`_legend_height`."""
    rows = max(len(left), right)
    return [*left, *[" "] * (rows - len(left)), *[" "] * rows]


def read_curve(stage_dir: Path, key: str = "val/acc") -> dict[int, float]:
    """``{epoch: value}`` of ``key`` in a stage's CSV log (``<stage>/logs/**/metrics.csv``)."""
    curve: dict[int, float] = {}
    for path in sorted((stage_dir / "logs").rglob("metrics.csv")):
        with path.open() as f:
            for record in csv.DictReader(f):
                if record.get(key) and record.get("epoch") not in (None, ""):
                    curve[int(float(record["epoch"]))] = float(record[key])
    return curve


def _curve(row: Row, key: str) -> tuple[list[int], list[float], list[float | None]]:
    """Epochs (1-based), mean and std (``None`` under two runs) over the row's runs, in %."""
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for stage_dir in row.stage_dirs:
        for epoch, value in read_curve(stage_dir, key).items():
            per_epoch[epoch].append(value)
    epochs = sorted(per_epoch)
    stats = [_pct(per_epoch[e]) for e in epochs]
    return [e + 1 for e in epochs], [m for m, _ in stats], [s for _, s in stats]


def curves_figure(rows: Sequence[Row], key: str = "val/acc") -> Figure | None:
    """``key`` per epoch of every non-teacher (group, stage) with a CSV log, mean over seeds
    with a ± std band where n ≥ 2; a colour per curve, a line style per stage; integer
    epochs; each distinct teacher's ``key`` once as a black line. ``None`` when no run has a
    CSV log (``logger=csv``, the default)."""
    curves = [(row, *_curve(row, key)) for row in rows if row.stage != TEACHER]
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    styles = _styles([c[0] for c in curves], LINESTYLES)
    marks = [row for row in teachers(rows) if row.val_acc and key == "val/acc"]
    legend = [wrap(f"{c[0].label} · {c[0].stage}") for c in curves] + ["teacher"] * len(marks)
    fig, ax = _figure(6.4, 3.2 + _legend_height(legend, 2))
    for (row, epochs, means, stds), colour, text in zip(curves, palette(len(curves)), legend):
        ax.plot(epochs, means, marker="o", markersize=3, color=colour,
                linestyle=styles[row.stage], label=text)
        band = [(e, m, s) for e, m, s in zip(epochs, means, stds) if s is not None]
        if band:
            e, m, s = zip(*band)
            ax.fill_between(e, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                            color=colour, alpha=0.15, linewidth=0)
    for k, row in enumerate(marks):
        mean = 100 * statistics.fmean(row.val_acc)
        ax.axhline(mean, color="black", linestyle=TEACHER_STYLES[k % 3], linewidth=1,
                   label=_teacher_label(row, len(marks) > 1, mean))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch", fontsize=FONT)
    ax.set_ylabel(f"{key} (%)", fontsize=FONT)
    ax.set_title("mean over seeds, band ± std where n ≥ 2", fontsize=FONT)
    fig.legend(loc="outside lower center", ncol=2, fontsize=FONT - 1, frameon=False)
    return fig
