"""scripts/reproduce.py's report: ours next to the published number, read from the runs that
finished, and a run of some rows reports those rows in a section of its own."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
sys.modules["reproduce"] = reproduce  # its dataclasses look their module up
_spec.loader.exec_module(reproduce)


def write_result(folder: Path, seed: int, best: float, last: float, teacher: float) -> None:
    run = folder / f"s{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "student": {"metrics": {"test/acc": best, "last/test/acc": last}},
        "teacher": {"metrics": {"test/acc": teacher}}}))


def test_report_gives_mean_and_std_over_seeds_next_to_the_published_number(tmp_path):
    cell = tmp_path / "cifar100_same" / "resnet32x4-resnet8x4" / "kd"
    write_result(cell, 0, 0.70, 0.69, 0.79)
    write_result(cell, 1, 0.72, 0.71, 0.79)
    text = reproduce.report("cifar100_same", tmp_path, ["kd"], smoke=False,
                            rows=["resnet32x4-resnet8x4"])
    assert "| resnet32x4 → resnet8x4 | kd | 73.33 | 71.00 ± 1.41 | 70.00 ± 1.41 | 2 |" in text
    assert "| resnet32x4 → resnet8x4 | teacher | 79.42 | 79.00 ± 0.00 | — | 2 |" in text
    # only the rows asked for, named in the heading: no empty lines for the table's other pairs
    assert "wrn_40_2" not in text
    assert text.startswith("### CIFAR-100, teacher and student of the same family: "
                           "resnet32x4 → resnet8x4\n")


def test_report_of_the_whole_table_marks_a_cell_without_runs(tmp_path):
    text = reproduce.report("cifar100_same", tmp_path, ["vanilla"], smoke=True)
    assert "| wrn_40_2 → wrn_16_2 | vanilla | 73.26 | — | — | 0 |" in text
    assert "Smoke run on synthetic images" in text
    assert text.count("| vanilla |") == len(reproduce.TABLES["cifar100_same"]["rows"])


def test_an_unknown_row_fails_naming_it():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--table",
                           "cifar100_same", "--rows", "resnet32x4-resnet9x4", "--report-only"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--rows resnet32x4-resnet9x4: no such row" in proc.stderr
