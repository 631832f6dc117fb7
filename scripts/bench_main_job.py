"""Run the main job (`kdlab-train`, no overrides) as a user would and record it.

    python scripts/bench_main_job.py                 # fresh teacher store: teacher trained too
    python scripts/bench_main_job.py --seeds 1 2 3   # extra seeds reuse the stored teacher

Writes docs/BENCHMARKS.md: the machine, the command, the wall time of the whole process and
each run's table, plus the mean over seeds of the student's gain over the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from doc_section import replace_section  # noqa: E402

from kdlab.util.report import markdown_table  # noqa: E402


def run_job(workdir: Path, overrides: list[str]) -> tuple[dict, float, float]:
    """Run kdlab-train in ``workdir``; return its results.json, the process wall time and its
    peak resident memory in MB."""
    command = ["kdlab-train", *overrides]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"{' '.join(command)} failed:\n{err.read()[-3000:]}")
    newest = max((workdir / "outputs" / "runs").glob("*/results.json"), key=os.path.getmtime)
    return json.loads(newest.read_text()), wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="extra seeds run after the default job (teacher reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kdlab-bench-"))
    try:
        runs = [("kdlab-train", *run_job(workdir, []))]
        for seed in args.seeds:
            runs.append((f"kdlab-train seed={seed}", *run_job(workdir, [f"seed={seed}"])))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    lines = [
        f"Recorded by `python scripts/bench_main_job.py{' --seeds ' if args.seeds else ''}"
        f"{' '.join(map(str, args.seeds))}` on {time.strftime('%Y-%m-%d')}: "
        f"{os.cpu_count()} CPU cores, {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Wall time is the whole `kdlab-train` process "
        "(start-up, data loading, training, evaluation, latency); peak RSS is its peak "
        "resident memory.",
        "",
    ]
    gains = []
    for command, results, wall, rss in runs:
        teacher = results["teacher"]
        speed = results["student"].get("train_samples_per_s", {}).get("median")
        lines += [
            f"### `{command}` — {wall / 60:.1f} min wall time, peak RSS {rss:,.0f} MB "
            f"(teacher {teacher['source']['source']})",
            "",
            f"Student training: {speed:,.0f} samples/s (median over epochs)." if speed else "",
            "",
            markdown_table(results),
            "",
        ]
        gains.append(results["student"]["metrics"]["test/acc"]
                     - results["baseline"]["metrics"]["test/acc"])
    if len(runs) > 1:
        students = [r["student"]["metrics"]["test/acc"] for _, r, _, _ in runs]
        baselines = [r["baseline"]["metrics"]["test/acc"] for _, r, _, _ in runs]
        lines += [
            f"### Over {len(runs)} seeds",
            "",
            "| | mean test acc % | std | min | max |",
            "|---|---|---|---|---|",
        ]
        for name, values in (("student (KD)", students), ("baseline (CE)", baselines),
                             ("gain", gains)):
            lines.append(f"| {name} | {100 * statistics.mean(values):.2f} | "
                         f"{100 * statistics.stdev(values):.2f} | {100 * min(values):.2f} | "
                         f"{100 * max(values):.2f} |")
        lines.append("")
    replace_section(args.out, "main-job", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
