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
    assert group_keys(load_runs([tmp_path])) == ["distill.kd.temperature"]
    assert result["keys"] == ["temperature"]  # the short name: no other key ends with it
    labels = sorted(row.label for row in result["rows"] if row.stage == "student")
    assert labels == ["temperature=2", "temperature=8"]


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
    figures = ["accuracy", "accuracy_vs_latency", "accuracy_vs_params", "learning_curves"]
    assert written == sorted([*(f"{f}.{e}" for f in figures for e in ("pdf", "png")),
                              "compare.csv", "compare.md", "compare_seeds.csv"])
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


# -- what researchers read: labels, lengths, per-seed values and gains, one baseline ---------


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` written over ``base``, nested mappings merged."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            value = _merge(dict(base[key]), value)
        base[key] = value
    return base


def _job(folder: Path, distill: str = "kd", seed: int = 0, acc: float = 0.8,
         baseline: float | None = None, key: str | None = None, epochs: int = 2,
         config: dict | None = None, curve: bool = False, **extra) -> Path:
    """The results.json of one kdlab-train job as the offline mode writes it: the stored
    teacher, the student and (``baseline``: its test/acc) the baseline, each trained stage with
    its ``epochs`` and checkpoints; ``key``: the baseline's store key; ``config`` overrides the
    smoke-like config; ``curve``: a CSV log of val/acc per epoch for each trained stage."""
    folder.mkdir(parents=True)
    cfg = _merge({
        "seed": seed, "task_name": "kdlab", "baseline": baseline is not None,
        "paths": {"output_dir": str(folder)},
        "logger": {"csv": {"save_dir": str(folder)}},
        "data": {"label_seed": seed, "shuffle_seed": seed, "num_labels": 1000},
        "teacher": {"train": {"max_epochs": 1}},
        "distill": {distill: {"_target_": f"kdlab.strategies.{distill}", "temperature": 4.0}},
        "compress": {"prune": None, "quantize": None},
        "optimizer": {"lr": 0.003},
        "trainer": {"max_epochs": 2, "max_steps": -1, "limit_train_batches": 10}},
        config or {})
    teacher = {"stage": "teacher", "model": "CNN", "params": 1000, "latency_ms": 5.0,
               "source": {"source": "store", "key": "cnn-0123456789ab"},
               "metrics": {"test/acc": 0.9, "val/acc": 0.91}}
    stages = [teacher, {"stage": "student", "model": "CNN", "params": 100, "latency_ms": 1.0,
                        "best_ckpt": str(folder / "checkpoints" / "best.ckpt"),
                        "metrics": {"test/acc": acc, "val/acc": acc + 0.01,
                                    "epochs": epochs}}]
    if baseline is not None:
        stages.append({"stage": "baseline", "model": "CNN", "params": 100, "latency_ms": 1.0,
                       "best_ckpt": str(folder / "baseline" / "checkpoints" / "best.ckpt"),
                       "metrics": {"test/acc": baseline, "val/acc": baseline + 0.01,
                                   "epochs": epochs},
                       **({"key": key} if key else {}), **extra})
    if curve:
        for stage in stages[1:]:
            logs = Path(stage["best_ckpt"]).parent.parent / "logs"
            logs.mkdir(parents=True)
            final = stage["metrics"]["val/acc"]
            lines = [f"{e},{final - 0.02 * (epochs - 1 - e)}" for e in range(epochs)]
            (logs / "metrics.csv").write_text("epoch,val/acc\n" + "\n".join(lines) + "\n")
    results = {"mode": "offline", "strategy": distill, "stages": stages,
               "student": stages[1], "config": cfg}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


PRUNED = {"trainer": {"max_epochs": 3},
          "compress": {"prune": {"amount": 0.9, "start_epoch": 0, "end_epoch": 2},
                       "quantize": "dynamic_int8"}}


def test_groups_are_labelled_by_every_key_that_differs(tmp_path):
    # a pruned 3-epoch run without a baseline beside a plain 2-epoch sweep: the labels name
    # both the compression and the length, not one of them (nor baseline=False)
    _job(tmp_path / "sweep" / "0", seed=0, baseline=0.7)
    _job(tmp_path / "sweep" / "1", seed=1, baseline=0.7)
    _job(tmp_path / "pruned", seed=0, epochs=3, config=PRUNED)
    runs = load_runs([tmp_path])
    # compress.prune.* and compress.quantize only change with the choice compress.name;
    # baseline, paths, the logger's folder and the seed's followers never label a group
    assert group_keys(runs) == ["compress.name", "trainer.max_epochs"]
    result = compare([tmp_path], out=tmp_path / "out", plots=False)
    assert result["keys"] == ["compress", "max_epochs"]
    labels = {row.label for row in result["rows"]}
    assert labels == {"compress=none, max_epochs=2", "compress=prune+quantize, max_epochs=3"}
    header = (tmp_path / "out" / "compare.md").read_text().splitlines()[0]
    assert header.startswith("| compress | max_epochs | stage |")


def test_short_key_names_only_where_unambiguous(tmp_path):
    # trainer.max_epochs and teacher.train.max_epochs both differ: both shown in full
    _job(tmp_path / "0", seed=0)
    _job(tmp_path / "1", seed=0, epochs=3, config={"trainer": {"max_epochs": 3},
                                                    "teacher": {"train": {"max_epochs": 5}}})
    result = compare([tmp_path], out=tmp_path / "out", plots=False)
    assert result["keys"] == ["trainer.max_epochs", "teacher.train.max_epochs"]
    assert {row.label for row in result["rows"]} == {
        "trainer.max_epochs=2, teacher.train.max_epochs=1",
        "trainer.max_epochs=3, teacher.train.max_epochs=5"}


def test_a_strategy_option_is_shown_where_it_varies_within_the_strategy(tmp_path):
    for i, (temperature, seed) in enumerate([(2.0, 0), (2.0, 1), (8.0, 0), (8.0, 1)]):
        _job(tmp_path / f"kd{i}", seed=seed, acc=0.8 + temperature / 100,
             config={"distill": {"kd": {"temperature": temperature}}})
    _job(tmp_path / "dkd", distill="dkd", seed=0)
    result = compare([tmp_path], out=tmp_path / "out", plots=False)
    students = sorted(row.label for row in result["rows"] if row.stage == "student")
    # distill.dkd.temperature and the _target_ keys come with the choice: not in the labels
    assert students == ["distill=dkd", "distill=kd, temperature=2",
                        "distill=kd, temperature=8"]


def test_runs_of_different_length_are_flagged(tmp_path, capsys):
    _job(tmp_path / "kd0", "kd", seed=0)
    _job(tmp_path / "kd1", "kd", seed=1)
    _job(tmp_path / "at0", "at", seed=0)
    _job(tmp_path / "at1", "at", seed=1)
    _job(tmp_path / "dkd0", "dkd", seed=0, epochs=3, config={"trainer": {"max_epochs": 3}})
    _job(tmp_path / "ft0", "ft", seed=0)
    _job(tmp_path / "ft1", "ft", seed=1, epochs=1)  # the same budget, one epoch trained
    result = compare([tmp_path], out=tmp_path / "out", plots=False)
    flagged = {row.group["distill"] for row in result["rows"] if row.length_differs}
    assert flagged == {"dkd", "ft"}
    out = capsys.readouterr().out
    markdown = (tmp_path / "out" / "compare.md").read_text()
    for text in (out, markdown):
        assert "student rows of different length side by side: 2 epochs (distill=at, " \
               "max_epochs=2; distill=ft, max_epochs=2; distill=kd, max_epochs=2) vs 3 epochs " \
               "(distill=dkd, max_epochs=3) vs 1 epoch of max_epochs=2 (distill=ft, " \
               "max_epochs=2)" in " ".join(text.split())
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")
             for line in markdown.splitlines() if "| student |" in line}
    column = markdown.splitlines()[0].split(" | ").index("epochs")
    assert {name: cells[name][column] for name in cells} == {
        "kd": "2", "at": "2", "dkd": "3 ≠", "ft": "1–2 ≠"}
    table = {r["distill"]: r for r in _csv(tmp_path / "out" / "compare.csv")
             if r["stage"] == "student"}
    assert {name: table[name]["length differs"] for name in table} == {
        "kd": "False", "at": "False", "dkd": "True", "ft": "True"}
    assert table["dkd"]["epochs"] == "3"
    assert table["ft"]["epochs"] == "1 2"


def test_same_length_is_not_flagged(sweep, tmp_path):
    result = compare([sweep[0]], out=tmp_path / "out", plots=False)
    assert not any(row.length_differs for row in result["rows"])
    assert "different length" not in (tmp_path / "out" / "compare.md").read_text()


def test_csv_has_per_seed_values_and_the_gain_over_the_baseline(tmp_path):
    accs = {0: (0.80, 0.70), 1: (0.82, 0.71), 2: (0.84, 0.75)}
    for seed, (acc, base) in accs.items():
        _job(tmp_path / f"kd{seed}", "kd", seed=seed, acc=acc, baseline=base)
    # baseline=false: paired with the baseline of the kd run of its seed (same config but the
    # strategy); seed 5 has none
    _job(tmp_path / "dkd0", "dkd", seed=0, acc=0.90)
    _job(tmp_path / "dkd5", "dkd", seed=5, acc=0.60)
    compare([tmp_path], out=tmp_path / "out", plots=False)
    summary = {(r["distill"], r["stage"]): r for r in _csv(tmp_path / "out" / "compare.csv")}
    kd = summary["kd", "student"]
    gains = [acc - base for acc, base in accs.values()]
    assert float(kd["test/acc gain mean"]) == pytest.approx(statistics.fmean(gains))
    assert float(kd["test/acc gain std"]) == pytest.approx(statistics.stdev(gains))
    assert kd["gain n"] == "3" and kd["seeds"] == "0 1 2"
    dkd = summary["dkd", "student"]
    assert dkd["n"] == "2" and dkd["gain n"] == "1"
    assert float(dkd["test/acc gain mean"]) == pytest.approx(0.90 - 0.70)
    assert dkd["test/acc gain std"] == ""
    assert summary["kd", "baseline"]["test/acc gain mean"] == ""

    seeds = _csv(tmp_path / "out" / "compare_seeds.csv")
    students = {(r["distill"], r["seed"]): r for r in seeds if r["stage"] == "student"}
    assert len(seeds) == 3 * 3 + 2 * 2  # teacher, student (and baseline) of every run
    for seed, (acc, base) in accs.items():
        line = students["kd", str(seed)]
        assert float(line["test/acc"]) == acc and float(line["baseline test/acc"]) == base
        assert float(line["test/acc gain"]) == pytest.approx(acc - base)
        assert float(line["val/acc"]) == pytest.approx(acc + 0.01)
        assert line["epochs"] == "2" and line["run"] == str((tmp_path / f"kd{seed}").resolve())
    assert students["dkd", "5"]["test/acc gain"] == ""
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| kd | student | CNN | 3 | 82.00 ± 2.00 | +10.00 ± 1.00 |" in markdown
    assert "| dkd | student | CNN | 2 | 75.00 ± 21.21 | +20.00 (n=1) |" in markdown


def test_a_baseline_shared_by_strategies_is_shown_once(tmp_path):
    keys = {0: "a" * 16, 1: "b" * 16}
    for distill in ("kd", "dkd"):
        for seed in (0, 1):
            _job(tmp_path / f"{distill}{seed}", distill, seed=seed, baseline=0.7 + seed / 100,
                 key=keys[seed], **({"reused": True} if distill == "dkd" else {}))
    for seed in (0, 1):  # another baseline (other keys): its own row
        _job(tmp_path / f"at{seed}", "at", seed=seed, baseline=0.7 + seed / 100,
             key=f"{seed}" * 16)
    result = compare([tmp_path], out=tmp_path / "out", plots=False)
    baselines = [row for row in result["rows"] if row.stage == "baseline"]
    # runs in folder order (at, dkd, kd): the shared row is where dkd's baseline was
    assert [row.group["distill"] for row in baselines] == ["at", "dkd|kd"]
    assert [row.n for row in baselines] == [2, 2]
    assert baselines[1].shared_by == [{"distill": "dkd"}, {"distill": "kd"}]
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert markdown.count("| baseline |") == 2
    assert "| dkd\\|kd | baseline | CNN | 2 |" in markdown  # the | escaped in a cell
    assert "distill=dkd|kd: one baseline shared by 2 groups, shown once" in markdown
    lines = _csv(tmp_path / "out" / "compare_seeds.csv")
    assert sum(r["stage"] == "baseline" for r in lines) == 4  # 2 seeds × 2 baselines


def test_baselines_without_a_key_are_one_when_config_and_metrics_are_equal(tmp_path):
    for seed in (0, 1):
        for distill in ("kd", "dkd"):  # equal: one row
            _job(tmp_path / f"{distill}{seed}", distill, seed=seed, baseline=0.7 + seed / 100)
        # other metrics (seed 1 differs): its own row
        _job(tmp_path / f"at{seed}", "at", seed=seed, baseline=0.7 + seed / 50)
        # the same metrics but another config: its own row
        _job(tmp_path / f"ft{seed}", "ft", seed=seed, baseline=0.7 + seed / 100,
             config={"optimizer": {"lr": 0.01}})
    result = compare([tmp_path], out=tmp_path / "out", plots=False)
    baselines = sorted(row.label for row in result["rows"] if row.stage == "baseline")
    assert baselines == ["distill=at, lr=0.003", "distill=dkd|kd, lr=0.003",
                         "distill=ft, lr=0.01"]


def test_a_metric_that_is_not_a_fraction_is_shown_in_its_own_units(tmp_path):
    """Text runs compare bits per token (lower is better): no % and no ×100."""
    bits = {0: (2.041, 2.134), 1: (2.050, 2.140), 2: (2.032, 2.128)}
    for seed, (student, base) in bits.items():
        folder = _job(tmp_path / f"kd{seed}", "kd", seed=seed, acc=0.6, baseline=0.55)
        results = json.loads((folder / "results.json").read_text())
        for stage, value in zip(results["stages"], (1.9, student, base)):
            stage["metrics"]["test/bits_per_token"] = value
        (folder / "results.json").write_text(json.dumps(results))
    compare([tmp_path], out=tmp_path / "out", metric="test/bits_per_token")
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| test/bits_per_token | gain vs baseline |" in markdown
    mean = statistics.fmean(v for v, _ in bits.values())
    gain = statistics.fmean(v - b for v, b in bits.values())
    assert f"| {mean:.4f} ± " in markdown and f"| {gain:+.4f} ± " in markdown
    assert "test/bits_per_token (in its units" in markdown
    assert (tmp_path / "out" / "accuracy.png").exists()
