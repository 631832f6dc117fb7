"""What the baseline store saves in a sweep over strategies, measured: the same
``kdlab-train -m distill=kd,dkd,lskd`` sweep with ``baseline_store=false`` (each job trains its
own no-teacher baseline) and ``baseline_store=true`` (the first job trains it, the others reuse
it), run alternately ``--rounds`` times, each into a fresh folder and a fresh baseline store,
with the teacher trained once beforehand in a shared store. Writes the medians, their ratio and
the number of baselines trained into docs/BENCHMARKS.md (section ``baseline-store``).

    python scripts/bench_baseline_store.py --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_section import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = "kd,dkd,lskd"
#: a small but real Fashion-MNIST sweep: MLP teacher, the 27k CNN student, 2 epochs
ARGS = ["teacher=mlp", "teacher.model.hidden=[64]", "teacher.train.max_epochs=1",
        "trainer.max_epochs=2", "trainer.limit_train_batches=256", "steps_per_call=32",
        "trainer.enable_progress_bar=false", "data.num_labels=1000", "latency.repeats=2",
        "logger=csv"]


def sweep(work: Path, store: Path, baseline_store: bool) -> tuple[float, int]:
    """Wall seconds of one sweep and the number of baselines it trained."""
    log_dir = Path(tempfile.mkdtemp(dir=work))
    shutil.rmtree(store / "baselines", ignore_errors=True)  # every sweep starts without one
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdlab.train", "-m", f"distill={STRATEGIES}", *ARGS,
                    f"paths.log_dir={log_dir}", f"paths.teacher_store={store}",
                    f"baseline_store={str(baseline_store).lower()}"], check=True,
                   capture_output=True, cwd=work)
    seconds = time.perf_counter() - start
    trained = sum(1 for p in log_dir.rglob("baseline/checkpoints") if p.is_dir())
    return seconds, trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work, store = Path(tmp), Path(tmp) / "teachers"
        subprocess.run([sys.executable, "-m", "kdlab.train", "distill=none", "baseline=false",
                        *ARGS, f"paths.log_dir={work}/warm", f"paths.teacher_store={store}"],
                       check=True, capture_output=True, cwd=work)  # not part of the timing
        times: dict[bool, list[float]] = {False: [], True: []}
        trained: dict[bool, int] = {}
        for _ in range(args.rounds):
            for flag in (False, True):
                seconds, trained[flag] = sweep(work, store, flag)
                times[flag].append(seconds)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    lines = [
        f"`python scripts/bench_baseline_store.py --rounds {args.rounds}` (2 CPU cores; "
        f"`kdlab-train -m distill={STRATEGIES}` on Fashion-MNIST, stored MLP teacher, 2-epoch "
        "CNN student, 256 batches per epoch, 1,000 labels; median of the rounds, run "
        "alternately):", "",
        "| sweep | baselines trained | wall time (s) |", "|---|---|---|",
        f"| `baseline_store=false` | {trained[False]} | {off:.1f} |",
        f"| `baseline_store=true` | {trained[True]} | {on:.1f} |", "",
        f"Ratio: {on / off:.2f}× the wall time (every round: "
        f"{', '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(times[True], times[False]))} s).",
    ]
    replace_section(args.out, "baseline-store", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
