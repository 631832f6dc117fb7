"""kdlab-compare: grouping by the keys that differ, seed statistics, files and plots."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from kdlab.compare import cli, compare, group_keys, load_runs
from kdlab.util.errors import KdlabError


def _write_run(folder: Path, distill: str, seed: int, acc: float, temperature: float = 4.0,
               teacher_acc: float = 0.9) -> None:
    """A hand-made results.json: a teacher and a student stage, the config keys that matter."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "task_name": "kdlab",
              "paths": {"output_dir": str(folder)},
              "data": {"label_seed": seed, "num_labels": 1000},  # follows the seed
              "distill": {} if distill == "none" else {
                  distill: {"temperature": temperature,
                            "_target_": f"kdlab.strategies.{distill}.Loss"}}}
    stages = [
        {"stage": "teacher", "model": "CNN", "params": 1000, "latency_ms": 5.0,
         "metrics": {"test/acc": teacher_acc, "val/acc": teacher_acc}},
        {"stage": "student", "model": "CNN", "params": 100, "latency_ms": 1.0 + seed,
         "metrics": {"test/acc": acc, "val/acc": acc + 0.01}},
    ]
    results = {"stages": stages, "student": stages[1], "config": config}
    (folder / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path):
    accs = {("kd", 0): 0.80, ("kd", 1): 0.82, ("kd", 2): 0.84, ("none", 0): 0.70,
            ("none", 1): 0.71, ("none", 2): 0.75}
    for i, ((distill, seed), acc) in enumerate(accs.items()):
        _write_run(tmp_path / "multi" / str(i), distill, seed, acc)
    return tmp_path / "multi", accs


def test_groups_by_the_differing_key_and_aggregates_seeds(sweep, tmp_path):
    folder, accs = sweep
    runs = load_runs([folder])
    assert len(runs) == 6
    # data.label_seed differs too, but only with the seed; the members follow distill.name
    assert group_keys(runs) == ["distill.name"]
    result = compare([folder], out=tmp_path / "out", plots=False)
    assert result["keys"] == ["distill"]
    students = {row.group["distill"]: row for row in result["rows"] if row.stage == "student"}
    for name in ("kd", "none"):
        expected = [a for (d, _), a in accs.items() if d == name]
        assert students[name].n == 3
        assert statistics.fmean(students[name].test_acc) == pytest.approx(
            statistics.fmean(expected))
        assert students[name].latency_ms == 2.0  # median of 1, 2, 3
    with (tmp_path / "out" / "compare.csv").open() as f:
        lines = list(csv.DictReader(f))
    kd = next(r for r in lines if r["distill"] == "kd" and r["stage"] == "student")
    assert float(kd["test/acc mean"]) == pytest.approx(0.82)
    assert float(kd["test/acc std"]) == pytest.approx(0.02)  # sample std of .80, .82, .84
    assert kd["n"] == "3"
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| kd | student | CNN | 3 | 82.00 ± 2.00 |" in markdown
    assert "| none | teacher | CNN | 3 | 90.00 ± 0.00 |" in markdown


def test_a_hyperparameter_sweep_groups_by_that_key(tmp_path):
    for i, (temperature, seed) in enumerate([(2.0, 0), (2.0, 1), (8.0, 0), (8.0, 1)]):
        _write_run(tmp_path / str(i), "kd", seed, 0.8 + temperature / 100, temperature)
    result = compare([tmp_path], out=tmp_path / "out", plots=False)
    assert result["keys"] == ["distill.kd.temperature"]
    labels = sorted(row.label for row in result["rows"] if row.stage == "student")
    assert labels == ["distill.kd.temperature=2", "distill.kd.temperature=8"]


def test_separate_folders_and_explicit_keys(sweep, tmp_path):
    _write_run(tmp_path / "other" / "0", "kd", 0, 0.5, temperature=1.0)
    result = compare([sweep[0], tmp_path / "other"], out=tmp_path / "out", plots=False,
                     by=["distill.name"])
    kd = next(r for r in result["rows"] if r.group == {"distill": "kd"} and r.stage == "student")
    assert kd.n == 4


def test_bad_inputs_name_the_path_or_key(tmp_path, sweep, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdlabError, match="empty: no results.json below"):
        compare([tmp_path / "empty"])
    with pytest.raises(KdlabError, match=r"--by distill\.nmae: no run has this config key "
                                         r"\(did you mean distill\.name"):
        compare([sweep[0]], by=["distill.nmae"], plots=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        cli([str(tmp_path / "broken")])
    assert exit_info.value.code == 2
    assert "broken/results.json: not a readable results.json" in capsys.readouterr().err


def _non_trivial_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.stat().st_size > 10_000, path
    pixels = mpimg.imread(path)
    assert pixels.std() > 0.05, f"{path} is (nearly) one colour"


def test_compare_a_real_multirun(multirun_2x2, tmp_path):
    folder, proc = multirun_2x2
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(folder.glob("multiruns/*/*/results.json"))
    assert len(runs) == 4
    out = tmp_path / "cmp"
    cli([str(p.parent.parent) for p in runs[:1]] + ["--out", str(out)])
    rows, written = (out / "compare.csv"), sorted(p.name for p in out.iterdir())
    assert written == ["accuracy.png", "accuracy_vs_latency.png", "accuracy_vs_params.png",
                       "compare.csv", "compare.md", "learning_curves.png"]
    with rows.open() as f:
        table = list(csv.DictReader(f))
    loaded = [json.loads(p.read_text()) for p in runs]
    for name in ("none", "kd"):
        accs = [r["student"]["metrics"]["test/acc"] for r in loaded
                if r["strategy"] == name]
        row = next(r for r in table if r["distill"] == name and r["stage"] == "student")
        assert float(row["test/acc mean"]) == pytest.approx(statistics.fmean(accs))
        assert float(row["test/acc std"]) == pytest.approx(statistics.stdev(accs))
        assert row["n"] == "2"
    for png in out.glob("*.png"):
        _non_trivial_png(png)
