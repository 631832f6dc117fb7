"""The exact-view teacher cache's speed under augmentation, paired in one process.

Three kdlab runs of the same pair with random shift/flip augmentation, in rounds, one after
another in this process (the machine's speed drifts; a round's ratios compare runs a few
seconds apart):

- ``student only``: ``distill=none`` (the speed a cache can at best reach),
- ``KD, live teacher``: ``teacher_cache.views=0``, the teacher runs on every augmented batch,
- ``KD, exact-view cache``: ``teacher_cache.views=K``, the teacher's outputs on K stored views
  per sample computed once (in the first round; later rounds reuse the stored bank).

Each run trains ``--epochs`` epochs; its speed is the median samples/s of its epochs after the
first. Reports per-round ratios and their medians, and the bank's build time and size, into
docs/BENCHMARKS.md (section ``views-speed-<pair>``).

    python scripts/bench_views.py --pair fashion --rounds 3     # CNN 422k -> MLP, Fashion-MNIST
    python scripts/bench_views.py --pair cifar --rounds 3       # resnet32x4 -> resnet8x4, synthetic
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from doc_section import replace_section  # noqa: E402

PAIRS = {
    # the pair of scripts/bench_speed.py: the main job's CNN teacher, a 784-128-10 MLP student
    "fashion": ["student=mlp", "data.augment=true", "data.num_labels=null",
                "teacher.train.max_epochs=1", "scheduler=none"],
    # CIFAR-100's shapes (synthetic images: the speed is real, accuracies mean nothing)
    "cifar": ["experiment=cifar100", "data=synthetic_cifar100", "data.train_size=2000",
              "data.val_size=200", "teacher.train.max_epochs=1", "scheduler=none",
              "test_last=false"],
}
LABELS = {"fashion": "Fashion-MNIST (real data), CNN teacher (422k) → MLP 784-128-10 student, "
                     "batch 128, shift 2 + flip",
          "cifar": "synthetic CIFAR-100-shaped data (2,000 training images), resnet32x4 → "
                   "resnet8x4, batch 64, shift 4 + flip"}
COMMON = ["baseline=false", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
          "trainer.limit_test_batches=1", "latency.repeats=1", "logger=none"]


class _BuildLog(logging.Handler):
    """Collects the cache's 'computed ... in X s' lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def one_run(tmp: Path, overrides: list[str]) -> float:
    """Median samples/s over a run's epochs after the first."""
    from hydra import compose, initialize_config_dir

    from kdlab.train import run
    from kdlab.util.config import CONF_DIR

    folder = Path(tempfile.mkdtemp(dir=tmp))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", [f"paths.output_dir={folder}", f"paths.log_dir={folder}",
                                f"paths.teacher_store={tmp}/teachers", *overrides])
    results = run(cfg)
    speeds = results["student"]["train_samples_per_s"]["per_epoch"]
    return statistics.median(speeds[1:] or speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="fashion")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    handler = _BuildLog()
    logging.getLogger("kdlab.engine.cache").addHandler(handler)
    logging.getLogger("kdlab.engine.cache").setLevel(logging.INFO)

    base = [*PAIRS[args.pair], *COMMON, f"trainer.max_epochs={args.epochs}"]
    runs = {"student only": ["distill=none"],
            "KD, live teacher": ["distill=kd", "teacher_cache.views=0"],
            f"KD, exact-view cache (K={args.views})": ["distill=kd",
                                                       f"teacher_cache.views={args.views}"]}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        one_run(Path(tmp), [*base, "distill=none", "trainer.max_epochs=1"])  # the teacher
        for r in range(args.rounds):
            for name, extra in runs.items():
                speeds[name].append(one_run(Path(tmp), [*base, *extra]))
                print(f"round {r + 1} {name}: {speeds[name][-1]:,.0f} samples/s", flush=True)
    built = [line for line in handler.lines if "augmented views" in line]
    build = re.search(r"([\d.]+) MB .*\) in ([\d.]+) s", built[0]) if built else None

    names = list(runs)
    live, cached, student = (speeds[n] for n in (names[1], names[2], names[0]))
    vs_live = [c / x for c, x in zip(cached, live)]
    vs_student = [c / s for c, s in zip(cached, student)]
    command = (f"python scripts/bench_views.py --pair {args.pair} --rounds {args.rounds} "
               f"--epochs {args.epochs} --views {args.views}")
    lines = [f"`{command}` on {time.strftime('%Y-%m-%d')}: {LABELS[args.pair]}. CPU "
             f"({platform.machine()}, {torch.get_num_threads()} threads), torch "
             f"{torch.__version__}. Each run trains {args.epochs} epochs; its speed is the "
             "median samples/s of the epochs after the first; rounds run the three one after "
             "another in one process.", "",
             "| run | samples/s per round | median |", "|---|---|---|"]
    for name in names:
        per_round = ", ".join(f"{v:,.0f}" for v in speeds[name])
        lines.append(f"| {name} | {per_round} | {statistics.median(speeds[name]):,.0f} |")
    lines += ["", "| ratio | per round | median |", "|---|---|---|",
              f"| exact-view cache / live teacher | {', '.join(f'{v:.2f}×' for v in vs_live)} "
              f"| **{statistics.median(vs_live):.2f}×** |",
              f"| exact-view cache / student only | "
              f"{', '.join(f'{v:.2f}×' for v in vs_student)} | "
              f"**{statistics.median(vs_student):.2f}×** |"]
    if build:
        lines += ["", f"The bank (K={args.views} views of every training sample, float16 "
                      f"logits: {build.group(1)} MB) was computed once, in "
                      f"{float(build.group(2)):.1f} s, in the first round; the later rounds' "
                      "runs reused it from the store."]
    text = "\n".join(lines)
    print(text)
    replace_section(args.out, f"views-speed-{args.pair}", text)


if __name__ == "__main__":
    main()
