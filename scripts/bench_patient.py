"""Patient and consistent teaching (Beyer et al. 2022) against plain KD and cross-entropy on
Fashion-MNIST with every label: run the seeds and write the table into docs/MODES.md.

    python scripts/bench_patient.py --teacher-store outputs/teachers          # 3 seeds (~1 h)
    python scripts/bench_patient.py --report-only --workdir /work/bench_out

Conditions (one run folder per seed, ``<workdir>/patient/e40/<cond>/s<seed>``):

- ``fm``: ``experiment=patient_teaching`` — function matching, shift/flip + mixup, KD α = 1,
  live teacher, 40 epochs; its ``baseline`` stage is cross-entropy with the same shift/flip;
- ``kd``: plain KD (α = 0.9, T = 4, cached teacher), no augmentation, 40 epochs;
- ``ce``: cross-entropy alone, no augmentation, 40 epochs.
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
CONDITIONS = {
    "fm": ["experiment=patient_teaching"],
    "kd": ["data.num_labels=null", "trainer.max_epochs=40", "baseline=false"],
    "ce": ["data.num_labels=null", "trainer.max_epochs=40", "distill=none"],
}


def launch(overrides: list[str], folder: Path, seed: int, store: Path) -> None:
    if (folder / "results.json").exists():
        return
    command = ["kdlab-train", *overrides, f"seed={seed}", f"paths.teacher_store={store}",
               f"hydra.run.dir={folder}", "trainer.enable_progress_bar=false"]
    print("+", " ".join(command), flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, cwd=folder.parent, stdout=subprocess.DEVNULL, check=False)


def _acc(path: Path, stage: str) -> float | None:
    if not path.exists():
        return None
    stages = {s["stage"]: s for s in json.loads(path.read_text())["stages"]}
    entry = stages.get(stage)
    return None if entry is None else 100 * entry["metrics"]["test/acc"]


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread} (n={len(values)}; " + \
        ", ".join(f"{v:.2f}" for v in values) + ")"


def patient_table(workdir: Path, seeds: list[int]) -> str:
    rows = [("cross-entropy, no augmentation (`distill=none`)", "ce", "student"),
            ("cross-entropy, shift/flip (the `fm` run's baseline)", "fm", "baseline"),
            ("plain KD (α = 0.9, T = 4, cached teacher, no augmentation)", "kd", "student"),
            ("function matching (`experiment=patient_teaching`: shift/flip + mixup, KD α = 1, "
             "live teacher)", "fm", "student")]
    lines = ["| student (27k CNN, 40 epochs, all 55,000 labels) | test acc % (per seed) |",
             "|---|---|"]
    for label, cond, stage in rows:
        values = [v for s in seeds
                  if (v := _acc(workdir / "patient" / "e40" / cond / f"s{s}" / "results.json",
                                stage)) is not None]
        lines.append(f"| {label} | {_cell(values)} |")
    teacher = _acc(workdir / "patient" / "e40" / "kd" / f"s{seeds[0]}" / "results.json",
                   "teacher")
    if teacher is not None:
        lines.append(f"\nTeacher: the main job's stored CNN, {teacher:.2f}% test.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_patient")
    parser.add_argument("--teacher-store", type=Path, default=None)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "MODES.md")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    store = (args.teacher_store or workdir / "teachers").resolve()
    if not args.report_only:
        for seed in args.seeds:
            for cond, overrides in CONDITIONS.items():
                launch(overrides, workdir / "patient" / "e40" / cond / f"s{seed}", seed, store)
    day = time.strftime("%Y-%m-%d")
    seeds = " ".join(map(str, args.seeds))
    replace_section(args.doc, "measured-patient",
                    f"`python scripts/bench_patient.py --seeds {seeds}` ({day}):\n\n"
                    + patient_table(workdir, args.seeds))
    print(patient_table(workdir, args.seeds))


if __name__ == "__main__":
    main()
