"""Training throughput of distillation loops, kdlab against raw PyTorch and torchdistill.

    python scripts/bench_speed.py                       # 6 epochs per loop, CPU, 2 threads
    python scripts/bench_speed.py --epochs 8 --json docs/bench_speed.json

One process, one run: every loop trains the same student (a 784-128-10 MLP, the same initial
weights) on the same data (Fashion-MNIST's 55,000-image training split, already in memory as
tensors) with the same batch size (128) and optimizer (AdamW, lr 3e-3, weight decay 1e-4, no LR
schedule), distilling from the same 422k-parameter CNN teacher (KD, T = 4, alpha = 0.9). Each
loop runs ``--epochs`` epochs; samples/s is the median over the epochs after the first (warm-up),
counting training steps only (no validation).

Rows:
- raw student-only / raw KD: the plain loops a user would write (fp32, default memory format,
  teacher in eval mode under ``torch.inference_mode``), glibc's default allocator settings.
- torchdistill KD: torchdistill's own DistillationBox and epoch loop (``pip install
  torchdistill``; the row is skipped when it is missing).
- kdlab rows: ``kdlab.train.run`` with the config a user gets (progress bar, CSV logger,
  checkpoints every epoch), after the allocator settings ``kdlab-train`` applies at start-up.
  ``none`` is the student alone; ``KD live`` runs the teacher every step; ``KD cached`` reads the
  teacher's logits from the teacher-output cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

BATCH, LR, WD, T, ALPHA = 128, 3e-3, 1e-4, 4.0, 0.9


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    from kdlab.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(root=str(ROOT / "data"), num_labels=None)
    data.setup()
    return data.x_train, data.y_train


def make_teacher() -> nn.Module:
    from kdlab.models import CNN

    torch.manual_seed(0)
    return CNN([1, 28, 28], 10, channels=[32, 64], hidden=128, dropout=0.25)


def make_student() -> nn.Module:
    from kdlab.models import MLP

    torch.manual_seed(1)
    return MLP([1, 28, 28], 10, hidden=[128])


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    soft = F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1),
                    reduction="batchmean", log_target=True)
    return ALPHA * T * T * soft + (1 - ALPHA) * F.cross_entropy(student, y)


def raw_epochs(x: torch.Tensor, y: torch.Tensor, epochs: int,
               teacher: nn.Module | None) -> list[float]:
    """The loop a user writes: shuffled index batches of in-memory tensors."""
    student = make_student()
    opt = optimizer(student)
    if teacher is not None:
        teacher.eval()
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            xb, yb = x[idx], y[idx]
            out = student(xb)
            if teacher is None:
                loss = F.cross_entropy(out, yb)
            else:
                with torch.inference_mode():
                    t = teacher(xb)
                loss = kd_loss(out, t, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rates.append(len(x) / (time.perf_counter() - start))
    return rates


def torchdistill_epochs(x: torch.Tensor, y: torch.Tensor, epochs: int,
                        teacher: nn.Module) -> list[float] | None:
    try:
        from bench_torchdistill import torchdistill_kd_runner
    except ImportError as e:
        print(f"torchdistill row skipped: {e}", file=sys.stderr)
        return None
    epoch = torchdistill_kd_runner(teacher, make_student(), x, y, batch_size=BATCH, lr=LR,
                                   temperature=T, alpha=ALPHA, seed=0)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        samples = epoch()
        rates.append(samples / (time.perf_counter() - start))
    return rates


def kdlab_epochs(workdir: Path, teacher_ckpt: Path, epochs: int,
                 overrides: list[str]) -> list[float]:
    from hydra import compose, initialize_config_dir

    from kdlab.cli import CONF_DIR
    from kdlab.train import run

    out = workdir / f"run-{len(list(workdir.glob('run-*')))}"
    base = [
        f"paths.output_dir={out}", f"paths.teacher_store={workdir}/teachers",
        f"paths.log_dir={workdir}/logs", f"teacher.ckpt={teacher_ckpt}", "teacher=cnn",
        "student=mlp", "data.num_labels=null", f"data.root={ROOT / 'data'}", "scheduler=null",
        "baseline=false", f"trainer.max_epochs={epochs}", "latency.repeats=2",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*base, *overrides])
    results = run(cfg)
    return results["student"]["train_samples_per_s"]["per_epoch"]


def median_after_warmup(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


ROWS: list[tuple[str, str]] = [
    ("raw_student", "raw PyTorch, student only"),
    ("raw_kd", "raw PyTorch, KD (teacher live)"),
    ("torchdistill_kd", "torchdistill KD"),
    ("kdlab_none", "kdlab `distill=none`"),
    ("kdlab_kd_live", "kdlab KD, teacher live (`teacher_cache.enabled=false`)"),
    ("kdlab_kd_cached", "kdlab KD, cached teacher logits (default)"),
]
RATIOS: dict[str, tuple[str, str]] = {
    "kd_live_vs_raw_kd": ("kdlab_kd_live", "raw_kd"),
    "kd_cached_vs_raw_student": ("kdlab_kd_cached", "raw_student"),
    "none_vs_raw_student": ("kdlab_none", "raw_student"),
    "kd_live_vs_torchdistill": ("kdlab_kd_live", "torchdistill_kd"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per loop (first = warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write rates and ratios here")
    parser.add_argument("--rows", nargs="*", default=[k for k, _ in ROWS],
                        choices=[k for k, _ in ROWS])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = fashion_mnist()
    teacher = make_teacher()
    workdir = Path(tempfile.mkdtemp(prefix="kdlab-bench-speed-"))
    teacher_ckpt = workdir / "teacher.pt"
    torch.save(teacher.state_dict(), teacher_ckpt)

    runners: dict[str, Callable[[], list[float] | None]] = {
        "raw_student": lambda: raw_epochs(x, y, args.epochs, None),
        "raw_kd": lambda: raw_epochs(x, y, args.epochs, teacher),
        "torchdistill_kd": lambda: torchdistill_epochs(x, y, args.epochs, teacher),
        "kdlab_none": lambda: kdlab_epochs(workdir, teacher_ckpt, args.epochs, ["distill=none"]),
        "kdlab_kd_live": lambda: kdlab_epochs(workdir, teacher_ckpt, args.epochs,
                                              ["distill=kd", "teacher_cache.enabled=false"]),
        "kdlab_kd_cached": lambda: kdlab_epochs(workdir, teacher_ckpt, args.epochs,
                                                ["distill=kd"]),
    }
    rates: dict[str, list[float]] = {}
    for key in args.rows:
        if key.startswith("kdlab"):
            from kdlab.launch import tune_allocator

            tune_allocator()  # what kdlab-train does at start-up; after the raw and peer rows
        print(f"== {key}", file=sys.stderr, flush=True)
        result = runners[key]()
        if result is not None:
            rates[key] = result
    medians = {k: median_after_warmup(v) for k, v in rates.items()}
    ratios = {name: medians[a] / medians[b] for name, (a, b) in RATIOS.items()
              if a in medians and b in medians}

    lines = [f"Device: CPU ({platform.processor() or platform.machine()}), "
             f"{args.threads} threads, torch {torch.__version__}; {args.epochs} epochs per loop, "
             "median samples/s over epochs 2+.", "",
             "| loop | samples/s (median) | per-epoch samples/s |", "|---|---|---|"]
    for key, label in ROWS:
        if key in rates:
            per_epoch = ", ".join(f"{r:,.0f}" for r in rates[key])
            lines.append(f"| {label} | {medians[key]:,.0f} | {per_epoch} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| `{name}` | {value:.2f}× |" for name, value in ratios.items()]
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rates": rates, "medians": medians, **ratios,
                                         "epochs": args.epochs, "threads": args.threads},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
