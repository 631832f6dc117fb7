"""Measure every knowledge-transfer mode on Fashion-MNIST and write the tables of docs/MODES.md.

    python scripts/bench_modes.py                         # every experiment, 3 seeds (hours)
    python scripts/bench_modes.py --only takd born_again --seeds 0 1
    python scripts/bench_modes.py --report-only           # rewrite the tables from finished runs

Each experiment is one Hydra multirun over the seeds (``kdlab-train -m … seed=0,1,2``) into
``<workdir>/<experiment>``; all runs share one teacher store, so each teacher is trained once. A
multirun whose runs all have a ``results.json`` is not run again (the benchmark resumes). The
table of an experiment gives, for every stage of its ``results.json``, the test accuracy (%)
as mean ± std over seeds, read on each stage's best-validation checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_section import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: experiment → (what it measures, overrides)
EXPERIMENTS: dict[str, tuple[str, list[str]]] = {
    "born_again": ("Born-again networks, 2 distilled generations of the 27k CNN, all 55,000 "
                   "labels (gen0 is the no-teacher baseline)",
                   ["mode=born_again", "data.num_labels=null"]),
    "takd": ("TAKD: teacher (422k) → assistant CNN 16-32-64 (~105k) → student (27k), on the "
             "main job's transfer set; `direct` is the student distilled from the teacher",
             ["mode=takd"]),
    "multi_teacher": ("Three teachers (CNN seed 0, CNN seed 1, MLP 1.3M) averaged at T=4 on the "
                      "main job's transfer set",
                      ["mode=multi_teacher", "baseline=false"]),
    "transfer": ("Pretrain on classes 0-4, fine-tune on classes 5-9 with 50 labels per class, "
                 "distil with the other target images as transfer set, fine-tune the student",
                 ["mode=transfer"]),
    "init_match": ("Student CNN 32-16-32 (its first stage shaped like the teacher's) "
                   "initialised from the teacher, KD on the main job's transfer set",
                   ["student.model.channels=[32,16]", "student.init_from_teacher=match",
                    "baseline=false"]),
    "init_random": ("The same student from a random initialisation",
                    ["student.model.channels=[32,16]", "baseline=false"]),
    "logistic_regression": ("Logistic regression (7,850 parameters) on soft targets only "
                            "(no label) vs on the 55,000 hard labels",
                            ["experiment=logistic_regression"]),
}


def run_experiment(folder: Path, overrides: list[str], seeds: list[int], store: Path) -> None:
    done = list(folder.glob("*/results.json"))
    if len(done) >= len(seeds):
        return
    command = ["kdlab-train", "-m", *overrides, f"seed={','.join(map(str, seeds))}",
               f"paths.teacher_store={store}", f"hydra.sweep.dir={folder}",
               "trainer.enable_progress_bar=false"]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=folder.parent, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        print(f"failed ({proc.returncode}): {' '.join(command)}", flush=True)
        return
    (folder / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")


def table(folder: Path) -> tuple[str, int]:
    """The stage table of one experiment, and the number of finished seeds."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*/results.json"))]
    if not runs:
        return "", 0
    stages: dict[str, dict] = {}
    for result in runs:
        for entry in result.get("stages", []):
            row = stages.setdefault(entry["stage"], {"model": entry.get("model"), "acc": [],
                                                     "params": entry.get("params")})
            acc = entry.get("metrics", {}).get("test/acc")
            if acc is not None:
                row["acc"].append(100 * acc)
        if "ensemble" in result:
            row = stages.setdefault("ensemble of all generations",
                                    {"model": "—", "acc": [], "params": None})
            row["acc"].append(100 * result["ensemble"]["test/acc"])
    lines = ["| stage | model | params | test acc % (mean ± std) |", "|---|---|---|---|"]
    for name, row in stages.items():
        acc = row["acc"]
        cell = (f"{statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f} (n={len(acc)})"
                if len(acc) > 1 else f"{acc[0]:.2f} (n=1)" if acc else "—")
        params = f"{row['params']:,}" if row["params"] else "—"
        lines.append(f"| {name} | {row['model']} | {params} | {cell} |")
    wall = folder / "wall_s.txt"
    if wall.exists():
        lines.append(f"\nWall time: {float(wall.read_text()) / 60:.1f} min for {len(runs)} "
                     "seeds on 2 CPU cores (shared with other jobs).")
    return "\n".join(lines), len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_modes")
    parser.add_argument("--teacher-store", type=Path, default=None,
                        help="shared teacher store (default: <workdir>/teachers)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "MODES.md")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    store = (args.teacher_store or workdir / "teachers").resolve()
    for name in args.only:
        folder = workdir / name
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not args.report_only:
            run_experiment(folder, EXPERIMENTS[name][1], args.seeds, store)
        body, n = table(folder)
        if n:
            what, overrides = EXPERIMENTS[name]
            text = (f"{what}. `kdlab-train -m {' '.join(overrides)} seed=0,1,2` "
                    f"({time.strftime('%Y-%m-%d')}):\n\n{body}")
            replace_section(args.doc, f"measured-{name}", text)
            print(text, flush=True)


if __name__ == "__main__":
    main()
