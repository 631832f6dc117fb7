"""The main job as a user runs it: `kdlab-train` with no overrides (slow: ~9 minutes).

    python -m pytest -m slow
"""

import json
import subprocess

import pytest


@pytest.mark.slow
def test_main_job_distills_a_better_student_than_the_baseline(tmp_path):
    proc = subprocess.run(["kdlab-train"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_path,) = tmp_path.glob("outputs/runs/*/results.json")
    results = json.loads(results_path.read_text())
    teacher, student, baseline = (results[r]["metrics"]["test/acc"]
                                  for r in ("teacher", "student", "baseline"))
    assert teacher >= 0.92
    assert student >= baseline + 0.03  # measured ≈ +8 points (docs/BENCHMARKS.md)
    assert results["student"]["params"] < results["teacher"]["params"] / 10
    assert "teacher" in proc.stdout and "baseline" in proc.stdout  # the printed table
