"""Does the exact-view teacher cache cost accuracy? KD with K stored views per sample against KD
with a live teacher on fresh random views every step, same seeds, same teacher.

    python scripts/bench_views_accuracy.py --setting fashion --seeds 0 1 2 --views 2 8
    python scripts/bench_views_accuracy.py --setting cifar --seeds 0 1 2 --views 2 8

``fashion`` is the main job (Fashion-MNIST, 1,000 labels + the transfer set, CNN → CNN, 12
epochs) with random shift/flip augmentation; ``cifar`` is synthetic CIFAR-100-shaped data
(shift 4 + flip, CNN → CNN, 12 epochs; numbers on synthetic data say nothing about CIFAR). The
teacher is trained once into a shared store; every run is a ``kdlab-train`` process. Writes the
per-seed test accuracies, their means and the differences to the live teacher (per seed,
paired) into docs/BENCHMARKS.md (section ``views-accuracy-<setting>``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from doc_section import replace_section  # noqa: E402

SETTINGS = {
    "fashion": ["data.augment=true"],
    # noise 0.7 (default 0.3): the default images are separable to 100% by every student,
    # which would hide any difference
    "cifar": ["data=synthetic_cifar100", "data.noise=0.7", "data.augment=true", "data.shift=4",
              "teacher.train.max_epochs=6"],
}
LABELS = {"fashion": "the main job (Fashion-MNIST, real data) with `data.augment=true` "
                     "(shift 2 + flip)",
          "cifar": "synthetic CIFAR-100-shaped data (5,000 training images, `data.noise=0.7`; "
                   "accuracies on it say nothing about CIFAR) with shift 4 + flip, CNN → CNN, "
                   "12 epochs"}
COMMON = ["baseline=false", "trainer.enable_progress_bar=false", "latency.repeats=1",
          "logger=csv"]


def kdlab_train(work: Path, store: Path, overrides: list[str]) -> dict:
    folder = Path(tempfile.mkdtemp(dir=work))
    proc = subprocess.run(["kdlab-train", *overrides, f"paths.log_dir={folder}",
                           f"paths.teacher_store={store}"], cwd=work, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"kdlab-train {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    newest = max(folder.rglob("results.json"), key=os.path.getmtime)
    return json.loads(newest.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="fashion")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    variants = {"live teacher (fresh views)": ["teacher_cache.views=0"]}
    for k in args.views:
        variants[f"exact-view cache, K={k}"] = [f"teacher_cache.views={k}"]
    acc: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work, store = Path(tmp), Path(tmp) / "teachers"
        for seed in args.seeds:
            for name, extra in variants.items():
                start = time.perf_counter()
                results = kdlab_train(work, store, [*SETTINGS[args.setting], *COMMON,
                                                    f"seed={seed}", *extra])
                wall[name].append(time.perf_counter() - start)
                acc[name].append(100 * results["student"]["metrics"]["test/acc"])
                print(f"seed {seed} {name}: {acc[name][-1]:.2f} % "
                      f"({wall[name][-1]:.0f} s)", flush=True)
    names = list(variants)
    live = acc[names[0]]
    seeds = " ".join(map(str, args.seeds))
    command = (f"python scripts/bench_views_accuracy.py --setting {args.setting} --seeds "
               f"{seeds} --views {' '.join(map(str, args.views))}")
    minutes = (time.perf_counter() - started) / 60
    lines = [f"`{command}` on {time.strftime('%Y-%m-%d')} ({minutes:.0f} min): "
             f"{LABELS[args.setting]}; student test accuracy %, seeds {seeds}. "
             "The first seed's runs include training the teacher (live) and building each bank "
             "(cache runs); the later seeds reuse them from the store.", "",
             "| student trained with | " + " | ".join(f"seed {s}" for s in args.seeds)
             + " | mean | std | Δ vs live (paired mean ± std) |",
             "|---|" + "---|" * (len(args.seeds) + 3)]
    for name in names:
        values = acc[name]
        diffs = [a - b for a, b in zip(values, live)]
        delta = "—" if name == names[0] else (
            f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}"
            if len(diffs) > 1 else f"{diffs[0]:+.2f}")
        std = f"{statistics.stdev(values):.2f}" if len(values) > 1 else "—"
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {statistics.mean(values):.2f} | {std} | {delta} |")
    text = "\n".join(lines)
    print(text)
    replace_section(args.out, f"views-accuracy-{args.setting}", text)


if __name__ == "__main__":
    main()
