"""scripts/bench_gpu.py's CPU mode (what CI runs): every row it can run on a CPU runs, and each
kdlab row is paired with a raw run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_every_row_in_its_tiny_cpu_mode(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--device",
                           "cpu", "--tiny", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    loops = [r["loop"] for r in result["rows"]]
    assert loops == ["raw fp32 eager", "raw bf16 autocast", "kdlab fp32 eager",
                     "kdlab default (32-true)",
                     "kdlab exact-view cache (K=8)",
                     "kdlab packed cohort of 2 (students vmap)"]
    assert all(r["samples_per_s"] > 0 for r in result["rows"])
    assert all(r["ratio"] > 0 for r in result["rows"][2:-1])
    assert result["rows"][-1]["vs_one_run"] > 0  # against the kdlab default row
    assert "| 32 | kdlab exact-view cache (K=8) |" in proc.stdout
    assert "| 32 | kdlab packed cohort of 2 (students vmap) |" in proc.stdout
