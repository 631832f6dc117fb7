"""kdlab-compare's figures, ready for a paper: a PDF beside every PNG, tick labels that are the
group labels and do not overlap, no error bar where n = 1, readable legends, integer epochs, the
teacher drawn once."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kdlab.compare import aggregate, compare, load_runs
from kdlab.compare.plots import accuracy_figure, curves_figure, tradeoff_figure
from tests.test_compare import PRUNED, _job


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A kd / dkd sweep over two seeds (one baseline for both), an at run with one seed and a
    pruned 3-epoch run: groups with n = 2 and n = 1, labels of one and of three keys; every
    trained stage with a CSV log."""
    keys = {0: "a" * 16, 1: "b" * 16}
    for distill in ("kd", "dkd"):
        for seed in (0, 1):
            _job(tmp_path / "runs" / f"{distill}{seed}", distill, seed=seed,
                 acc=0.8 + seed / 50 + (distill == "dkd") / 20, baseline=0.7 + seed / 100,
                 key=keys[seed], curve=True)
    _job(tmp_path / "runs" / "at0", "at", seed=0, acc=0.78, baseline=0.7, key=keys[0],
         curve=True)
    _job(tmp_path / "runs" / "pruned", "kd", seed=0, acc=0.76, epochs=3, config=PRUNED,
         curve=True)
    return tmp_path / "runs"


def _rows(folder: Path) -> list:
    return aggregate(load_runs([folder]))[1]


def _drawn(fig: Figure) -> Figure:
    FigureCanvasAgg(fig).draw()
    return fig


def test_a_pdf_beside_every_png(mixed, tmp_path):
    files = compare([mixed], out=tmp_path / "out")["files"]
    pngs = [f for f in files if f.suffix == ".png"]
    assert sorted(p.stem for p in pngs) == ["accuracy", "accuracy_vs_latency",
                                             "accuracy_vs_params", "learning_curves"]
    for png in pngs:
        pdf = png.with_suffix(".pdf")
        assert pdf in files and pdf.read_bytes().startswith(b"%PDF"), pdf
        assert png.read_bytes().startswith(b"\x89PNG")


def test_bars_have_no_error_bar_where_n_is_one(mixed):
    rows = _rows(mixed)
    ax = accuracy_figure(rows).axes[0]
    bars = [row for row in rows if row.stage != "teacher"]
    errorbars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(errorbars) == sum(row.n > 1 for row in bars) == 3  # kd, dkd, their baseline
    for container in errorbars:
        (segments,) = container.lines[2]
        assert len(segments.get_segments()) == 1
    # the same in the trade-off figure: no vertical bar on a one-run point
    ax = tradeoff_figure(rows, "params").axes[0]
    with_bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
    assert len(with_bars) == 3


def test_tick_labels_are_the_group_labels_and_do_not_overlap(mixed):
    rows = _rows(mixed)
    fig = _drawn(accuracy_figure(rows))
    ticks = fig.axes[0].get_yticklabels()
    labels = list(dict.fromkeys(row.label for row in rows if row.stage != "teacher"))
    assert [t.get_text().replace(",\n", ", ") for t in ticks] == labels
    assert "distill=kd, compress=prune+quantize, max_epochs=3" in labels
    boxes = [t.get_window_extent() for t in ticks]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "tick labels overprint each other"


def test_many_groups_with_long_labels_stay_readable(tmp_path):
    for i in range(12):
        _job(tmp_path / f"{i:02d}", "kd", seed=0, acc=0.5 + i / 50,
             config={"distill": {"kd": {"temperature": 1.0 + i}},
                     "optimizer": {"lr": 0.001 * (i + 1)}, "data": {"num_labels": 100 * i}})
    fig = _drawn(accuracy_figure(_rows(tmp_path)))
    boxes = [t.get_window_extent() for t in fig.axes[0].get_yticklabels()]
    assert len(boxes) == 12
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _legend(fig: Figure) -> list[str]:
    return [t.get_text().replace(",\n", ", ") for legend in fig.legends
            for t in legend.get_texts() if t.get_text().strip()]


def test_legends_use_the_readable_labels(mixed):
    rows = _rows(mixed)
    labels = list(dict.fromkeys(row.label for row in rows if row.stage != "teacher"))
    texts = _legend(tradeoff_figure(rows, "latency"))
    assert texts == [*labels, "student", "baseline", "teacher CNN: 90.0"]
    texts = _legend(curves_figure(rows))
    assert texts == [f"{row.label} · {row.stage}" for row in rows if row.stage != "teacher"] \
        + ["teacher CNN: 91.0"]
    assert not any("/" in text for text in texts)  # no kdlab/kd/False


def test_learning_curves_have_integer_epochs(mixed):
    fig = _drawn(curves_figure(_rows(mixed)))
    ax = fig.axes[0]
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == [1, 2, 3]


def test_the_teacher_is_drawn_once(mixed):
    rows = _rows(mixed)
    assert sum(row.stage == "teacher" for row in rows) == 4  # one per group in the table
    ax = accuracy_figure(rows).axes[0]
    assert len([line for line in ax.get_lines() if line.get_label().startswith("teacher")]) == 1
    ax = tradeoff_figure(rows, "params").axes[0]
    assert len([line for line in ax.get_lines() if line.get_marker() == "*"]) == 1
    fig = curves_figure(rows)
    assert len([line for line in fig.axes[0].get_lines()
                if line.get_label().startswith("teacher")]) == 1
