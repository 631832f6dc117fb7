"""scripts/bench_vit.py: finished runs are reused only under the overrides that made them, runs
of another length write their own section, and a DeiT student's heads are reported on their
own beside their average."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
_spec = importlib.util.spec_from_file_location("bench_vit", ROOT / "scripts" / "bench_vit.py")
bench_vit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_vit)


def write_run(folder: Path, seed: int, acc: float, heads: tuple[float, float] | None = None,
              baseline: float | None = None) -> None:
    run = folder / str(seed)
    run.mkdir(parents=True)
    metrics = {"val/acc": acc, "test/acc": acc}
    if heads is not None:
        metrics.update({"test/acc_cls": heads[0], "test/acc_dist": heads[1]})
    result = {"config": {"seed": seed}, "student": {"metrics": metrics, "params": 1000},
              "teacher": {"metrics": {"test/acc": 0.9}, "params": 50,
                          "source": {"key": "cnn-abc"}}}
    if baseline is not None:
        result["baseline"] = {"metrics": {"test/acc": baseline}}
    (run / "results.json").write_text(json.dumps(result))


def test_a_folder_of_other_overrides_is_refused_not_reused(tmp_path: Path) -> None:
    folder = tmp_path / "kd"
    bench_vit.check_sweep(folder, ["distill=kd", "trainer.max_epochs=3"])
    bench_vit.check_sweep(folder, ["distill=kd", "trainer.max_epochs=3"])  # same: reused
    with pytest.raises(SystemExit, match="trainer.max_epochs=3"):
        bench_vit.check_sweep(folder, ["distill=kd", "trainer.max_epochs=12"])


def test_report_gives_each_deit_head_and_a_section_per_length(tmp_path: Path) -> None:
    work = tmp_path / "work" / "e12"
    for seed, (acc, base) in enumerate([(0.84, 0.75), (0.86, 0.77)]):
        write_run(work / "kd", seed, acc, baseline=base)
    for seed, (acc, cls, dist) in enumerate([(0.80, 0.70, 0.82), (0.82, 0.72, 0.84)]):
        write_run(work / "deit", seed, acc, heads=(cls, dist))
    doc = tmp_path / "RESULTS.md"
    doc.write_text("<!-- vit:start -->\nthe 3-epoch table\n<!-- vit:end -->\n")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_vit.py"), "--epochs", "12",
                    "--report-only", "--workdir", str(tmp_path / "work"), "--doc", str(doc),
                    "--record", str(tmp_path / "record.json")],
                   check=True, capture_output=True, text=True)
    assert not (work / "kd" / "sweep.json").exists()  # a report writes nothing but the doc
    text = doc.read_text()
    assert "the 3-epoch table" in text  # the 3-epoch section is left alone
    section = text.split("<!-- vit-e12:start -->")[1].split("<!-- vit-e12:end -->")[0]
    assert "ViT students (issue 20, item 4): 12 epochs" in section
    deit = next(line for line in section.splitlines() if "`distill=deit`, hard" in line)
    assert "| 81.00 ± 1.41 (n=2) | +5.00 | 71.00 / 83.00 |" in deit
    kd = next(line for line in section.splitlines() if "`distill=kd`" in line)
    assert "| 85.00 ± 1.41 (n=2) | +9.00 | — |" in kd


def test_without_the_kd_sweep_no_delta_is_made_up(tmp_path: Path) -> None:
    """The ViT alone is the KD sweep's baseline: before that sweep has run, Δ is a dash."""
    for seed, (acc, cls, dist) in enumerate([(0.80, 0.70, 0.82), (0.82, 0.72, 0.84)]):
        write_run(tmp_path / "work" / "e12" / "deit", seed, acc, heads=(cls, dist))
    doc = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_vit.py"), "--epochs", "12",
                    "--report-only", "--workdir", str(tmp_path / "work"), "--doc", str(doc),
                    "--record", str(tmp_path / "record.json")],
                   check=True, capture_output=True, text=True)
    deit = next(line for line in doc.read_text().splitlines() if "`distill=deit`, hard" in line)
    assert "| 81.00 ± 1.41 (n=2) | — | 71.00 / 83.00 |" in deit


def test_a_whole_sweep_is_recorded_and_read_back_in_a_later_session(tmp_path: Path) -> None:
    """A session's outputs/ do not survive it: a whole sweep goes into the record (with its
    teacher beside it), and a later session with an empty work folder reads it from there,
    under the same overrides only."""
    store = tmp_path / "store"
    (store / "cnn-abc").mkdir(parents=True)
    (store / "cnn-abc" / "teacher.pt").write_bytes(b"weights")
    (store / "cnn-abc" / "teacher.json").write_text(json.dumps({"sha256": "ab12"}))
    overrides = ["distill=deit", "seed=0,1", f"paths.teacher_store={store}"]
    folder = tmp_path / "work" / "e12" / "deit"
    for seed, (acc, cls, dist) in enumerate([(0.80, 0.70, 0.82), (0.82, 0.72, 0.84)]):
        write_run(folder, seed, acc, heads=(cls, dist))
    (folder / "wall_s.txt").write_text("600.0\n")
    record = bench_vit.Record(tmp_path / "docs" / "vit-e12.json", ROOT)
    runs, wall, _ = bench_vit.run_sweep(record, "deit", folder, overrides, 2, store, start=False)
    assert wall == 600.0 and [r["student"]["metrics"]["test/acc_dist"] for r in runs] == [0.82,
                                                                                          0.84]
    assert (tmp_path / "docs" / "vit-e12-teacher" / "teacher.pt").read_bytes() == b"weights"
    later = bench_vit.Record(tmp_path / "docs" / "vit-e12.json", ROOT)
    empty = tmp_path / "new-session" / "e12" / "deit"
    moved = [*overrides[:-1], "paths.teacher_store=/elsewhere"]  # a place, not part of the key
    again, wall, day = bench_vit.run_sweep(later, "deit", empty, moved, 2, store, start=False)
    assert again == runs and wall == 600.0 and day
    with pytest.raises(SystemExit, match="recorded with other overrides"):
        bench_vit.run_sweep(later, "deit", empty, ["distill=deit", "seed=0,1,2"], 3, store,
                            start=False)
