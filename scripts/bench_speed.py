"""Training throughput of distillation loops, kdlab against raw PyTorch and torchdistill.

    python scripts/bench_speed.py                        # 5 rounds, CPU, 2 threads
    python scripts/bench_speed.py --rounds 7 --json docs/bench_speed.json

One run: every loop trains the same student (a 784-128-10 MLP, the same initial
weights) on the same data (Fashion-MNIST's 55,000-image training split, already in memory as
tensors) with the same batch size (128) and optimizer (AdamW, lr 3e-3, weight decay 1e-4, no LR
schedule), distilling from the same 422k-parameter CNN teacher (KD, T = 4, alpha = 0.9).

Measurement: ``--rounds`` rounds; in each round every loop runs ``--epochs`` epochs (the first a
warm-up) in a fresh child process, loops interleaved. A loop's samples/s is the median over its
measured epochs (training steps only, no validation). One child per loop, because glibc's
allocator settings (which kdlab-train changes at start-up) and Lightning's
``PYTORCH_NVML_BASED_CUDA_CHECK`` are per process and cannot be undone: the raw and torchdistill
rows run as a user's plain script would (default allocator, no Lightning import).

Ratios against a raw loop are **paired**: this machine's speed drifts by ±25% within seconds,
more than the differences measured, so two loops timed in different processes a minute apart
cannot be compared. Every kdlab child therefore also runs the raw loop it is compared with
(student-only for ``none`` and the cached rows, raw KD for the live row) in the same process,
interleaved at the finest grain Lightning allows: after each kdlab training step (a chunk of
``steps_per_call`` batches) the raw loop trains on as many batches. Each is timed on its own,
and a kdlab row's samples/s are its own time only (Lightning's loop, fetch and hooks included).
A ratio is the median over the measured epochs of kdlab's rate over the raw rate of the same
epoch. The raw loop runs under kdlab's process settings there (tuned allocator, no NVML retry),
which can only make it faster than in its own process: the paired ratios are conservative.
Ratios between two separate rows (torchdistill, raw KD) are the median over rounds of the ratio
within the round.

Rows:
- raw student-only / raw KD: the plain loops a user would write (fp32, default memory format,
  teacher in eval mode under ``torch.inference_mode``), glibc's default allocator settings.
- torchdistill KD: torchdistill's own DistillationBox and epoch loop (``pip install
  torchdistill``; the row is skipped when it is missing).
- kdlab rows: ``kdlab.train.run`` with the config a user gets (progress bar, CSV logger,
  checkpoints every epoch, the start-up settings of ``kdlab-train``). ``none`` is the student
  alone; ``KD live`` runs the teacher every step; ``KD cached`` reads the teacher's logits from
  the teacher-output cache. Two more rows take one default away each, to show what it is worth:
  ``optimizer.fused=false`` and ``steps_per_call=1``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

BATCH, LR, WD, T, ALPHA = 128, 3e-3, 1e-4, 4.0, 0.9


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    from kdlab.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(num_labels=None)
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


class RawLoop:
    """The loop a user writes: shuffled index batches of in-memory tensors, the teacher (if
    any) in eval mode under ``inference_mode``. :meth:`steps` trains on the next ``n`` batches,
    drawing a new permutation at each pass over the data."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, teacher: nn.Module | None) -> None:
        self.x, self.y, self.teacher = x, y, teacher
        self.student = make_student()
        self.opt = optimizer(self.student)
        if teacher is not None:
            teacher.eval()
        self.generator = torch.Generator().manual_seed(0)
        self.perm, self.pos = torch.empty(0, dtype=torch.long), 0

    def steps(self, n: int) -> int:
        """Train on ``n`` batches; returns their samples."""
        x, y, student, teacher, opt = self.x, self.y, self.student, self.teacher, self.opt
        samples = 0
        for _ in range(n):
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(len(x), generator=self.generator), 0
            idx = self.perm[self.pos : self.pos + BATCH]
            self.pos += BATCH
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
            samples += len(idx)
        return samples


def raw_epochs(x: torch.Tensor, y: torch.Tensor, epochs: int,
               teacher: nn.Module | None) -> list[float]:
    """Samples/s of each of ``epochs`` epochs of the raw loop (:class:`RawLoop`)."""
    loop = RawLoop(x, y, teacher)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        samples = loop.steps(-(-len(x) // BATCH))
        rates.append(samples / (time.perf_counter() - start))
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


#: per epoch of this process's kdlab run: (kdlab samples/s, paired raw samples/s)
PAIRED: list[tuple[float, float]] = []


def paired_raw_chunks(kind: str, workdir: str) -> Any:
    """A Lightning callback that, after each training step of the kdlab run it is added to (a
    chunk of ``steps_per_call`` batches), trains the raw ``student`` or ``kd`` loop on as many
    batches. Each epoch it appends to :data:`PAIRED` the kdlab rate (time from the end of one
    raw chunk to the end of the next kdlab step: Lightning's loop, fetch and hooks included)
    and the raw rate, so both are timed in the same seconds of this drifting machine."""
    import lightning as L

    from kdlab.engine.callbacks import batch_size

    x, y = torch.load(Path(workdir) / "data.pt", weights_only=True)
    teacher = None
    if kind == "kd":
        teacher = make_teacher()
        teacher.load_state_dict(torch.load(Path(workdir) / "teacher.pt", weights_only=True))
    raw = RawLoop(x, y, teacher)

    class PairedRawChunks(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.seconds, self.samples = [0.0, 0.0], [0, 0]
            self.mark = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule,
                               outputs: Any, batch: Any, batch_idx: int) -> None:
            now = time.perf_counter()
            self.seconds[0] += now - self.mark
            self.samples[0] += batch_size(batch)
            self.samples[1] += raw.steps(len(batch) if isinstance(batch, list) else 1)
            self.mark = time.perf_counter()
            self.seconds[1] += self.mark - now

        def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            PAIRED.append((self.samples[0] / self.seconds[0], self.samples[1] / self.seconds[1]))

    return PairedRawChunks()


def kdlab_epochs(workdir: Path, teacher_ckpt: Path, epochs: int,
                 overrides: list[str], paired: str | None = None) -> list[float]:
    from hydra import compose, initialize_config_dir

    from kdlab.train import run
    from kdlab.util.config import CONF_DIR

    out = workdir / f"run-{len(list(workdir.glob('run-*')))}"
    base = [
        f"paths.output_dir={out}", f"paths.teacher_store={workdir}/teachers",
        f"paths.log_dir={workdir}/logs", f"teacher.ckpt={teacher_ckpt}", "teacher=cnn",
        "student=mlp", "data.num_labels=null", "scheduler=none",
        "baseline=false", f"trainer.max_epochs={epochs}", "latency.repeats=2",
    ]
    if paired:
        base += ["+callbacks.paired._target_=bench_speed.paired_raw_chunks",
                 f"+callbacks.paired.kind={paired}", f"+callbacks.paired.workdir={workdir}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*base, *overrides])
    results = run(cfg)
    return results["student"]["train_samples_per_s"]["per_epoch"]


ROWS: list[tuple[str, str]] = [
    ("raw_student", "raw PyTorch, student only"),
    ("raw_kd", "raw PyTorch, KD (teacher live)"),
    ("torchdistill_kd", "torchdistill KD"),
    ("kdlab_none", "kdlab `distill=none`"),
    ("kdlab_kd_live", "kdlab KD, teacher live (`teacher_cache.enabled=false`)"),
    ("kdlab_kd_cached", "kdlab KD, cached teacher logits (default)"),
    ("kdlab_kd_cached_unfused", "kdlab KD cached, `optimizer.fused=false`"),
    ("kdlab_kd_cached_k1", "kdlab KD cached, `steps_per_call=1`"),
]
KDLAB_ROWS: dict[str, list[str]] = {
    "kdlab_none": ["distill=none"],
    "kdlab_kd_live": ["distill=kd", "teacher_cache.enabled=false"],
    "kdlab_kd_cached": ["distill=kd"],
    "kdlab_kd_cached_unfused": ["distill=kd", "optimizer.fused=false"],
    "kdlab_kd_cached_k1": ["distill=kd", "steps_per_call=1"],
}
#: the raw loop each kdlab row is paired with, epoch for epoch, in its own process
PAIRED_WITH: dict[str, str] = {"kdlab_none": "student", "kdlab_kd_live": "kd",
                               "kdlab_kd_cached": "student", "kdlab_kd_cached_unfused": "student",
                               "kdlab_kd_cached_k1": "student"}
#: ratios of a kdlab row to its paired raw epochs (median over measured epochs)
PAIRED_RATIOS: dict[str, str] = {
    "kd_live_vs_raw_kd": "kdlab_kd_live",
    "kd_cached_vs_raw_student": "kdlab_kd_cached",
    "none_vs_raw_student": "kdlab_none",
    "kd_cached_unfused_vs_raw_student": "kdlab_kd_cached_unfused",
    "kd_cached_k1_vs_raw_student": "kdlab_kd_cached_k1",
}
#: ratios between two rows run in separate processes (median over rounds)
RATIOS: dict[str, tuple[str, str]] = {
    "kd_live_vs_torchdistill": ("kdlab_kd_live", "torchdistill_kd"),
    "kd_cached_vs_raw_kd": ("kdlab_kd_cached", "raw_kd"),
}


def child(row: str, workdir: Path, epochs: int, threads: int,
          extra: list[str]) -> dict[str, list[float]]:
    """Run one loop in this (fresh) process; returns its per-epoch samples/s (``rates``) and,
    for a kdlab row, those of the raw epochs paired with them (``paired``)."""
    torch.set_num_threads(threads)
    if row in KDLAB_ROWS:
        import bench_speed  # the module Hydra imports the paired callback from

        kdlab_epochs(workdir, workdir / "teacher.pt", epochs, [*KDLAB_ROWS[row], *extra],
                     paired=PAIRED_WITH[row])
        return {"rates": [kdlab for kdlab, _ in bench_speed.PAIRED],
                "paired": [raw for _, raw in bench_speed.PAIRED]}
    x, y = torch.load(workdir / "data.pt", weights_only=True)
    teacher = make_teacher()
    teacher.load_state_dict(torch.load(workdir / "teacher.pt", weights_only=True))
    if row == "raw_student":
        return {"rates": raw_epochs(x, y, epochs, None)}
    if row == "raw_kd":
        return {"rates": raw_epochs(x, y, epochs, teacher)}
    return {"rates": torchdistill_epochs(x, y, epochs, teacher) or []}


def spawn(row: str, workdir: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    command = [sys.executable, __file__, "--child", row, "--workdir", str(workdir),
               "--epochs", str(args.epochs), "--threads", str(args.threads),
               "--kdlab", *args.kdlab]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        sys.exit(f"{row} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs per loop and round (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kdlab", nargs="*", default=[],
                        help="extra overrides for every kdlab row, e.g. steps_per_call=16")
    parser.add_argument("--json", type=Path, default=None, help="write rates and ratios here")
    parser.add_argument("--doc", type=Path, default=None,
                        help="replace the generated speed section of this Markdown file "
                             "(docs/BENCHMARKS.md)")
    parser.add_argument("--rows", nargs="*", default=[k for k, _ in ROWS],
                        choices=[k for k, _ in ROWS])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.epochs, args.threads, args.kdlab)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="kdlab-bench-speed-"))
    torch.save(fashion_mnist(), workdir / "data.pt")
    torch.save(make_teacher().state_dict(), workdir / "teacher.pt")
    if "torchdistill_kd" in args.rows and importlib.util.find_spec("torchdistill") is None:
        print("torchdistill is not installed (pip install torchdistill): row skipped",
              file=sys.stderr)
        args.rows.remove("torchdistill_kd")
    rates: dict[str, list[float]] = {row: [] for row in args.rows}
    paired: dict[str, list[float]] = {row: [] for row in args.rows}
    per_round: list[dict[str, float]] = []
    for r in range(args.rounds):
        this_round = {}
        for row in args.rows:
            out = spawn(row, workdir, args)
            measured = out["rates"][1:]
            rates[row] += measured
            paired[row] += out.get("paired", [])[1:]
            if measured:
                this_round[row] = statistics.median(measured)
            print(f"round {r + 1}/{args.rounds} {row}: "
                  + ", ".join(f"{v:,.0f}" for v in measured) + " samples/s"
                  + (" (paired raw: " + ", ".join(f"{v:,.0f}" for v in out["paired"][1:]) + ")"
                     if out.get("paired") else ""), file=sys.stderr, flush=True)
        per_round.append(this_round)
    medians = {k: statistics.median(v) for k, v in rates.items() if v}
    ratios, per_epoch = {}, {}
    for name, row in PAIRED_RATIOS.items():
        if rates.get(row) and len(paired[row]) == len(rates[row]):
            per_epoch[name] = [a / b for a, b in zip(rates[row], paired[row])]
            ratios[name] = statistics.median(per_epoch[name])
    for name, (a, b) in RATIOS.items():
        values = [rnd[a] / rnd[b] for rnd in per_round if a in rnd and b in rnd]
        if values:
            ratios[name] = statistics.median(values)

    lines = [f"Device: CPU ({platform.machine()}, {os.cpu_count()} cores), {args.threads} "
             f"threads, torch {torch.__version__}; {args.rounds} rounds × {args.epochs} epochs "
             "per loop (first epoch of each a warm-up).", "",
             "| loop | samples/s (median) | measured epochs | paired raw epochs (median) |",
             "|---|---|---|---|"]
    for key, label in ROWS:
        if key in medians:
            twin = f"{PAIRED_WITH[key]}: {statistics.median(paired[key]):,.0f}" \
                if paired.get(key) else ""
            lines.append(f"| {label} | {medians[key]:,.0f} | "
                         + ", ".join(f"{r:,.0f}" for r in rates[key]) + f" | {twin} |")
    lines += ["", "| ratio | value | how |", "|---|---|---|"]
    for name, value in ratios.items():
        if name in per_epoch:
            values = sorted(per_epoch[name])
            how = (f"paired, median of {len(values)} epochs (range {values[0]:.2f}–"
                   f"{values[-1]:.2f})")
        else:
            how = "separate processes, median over rounds"
        lines.append(f"| `{name}` | {value:.2f}× | {how} |")
    print("\n".join(lines))
    if args.doc:
        from doc_section import replace_section

        command = "python scripts/bench_speed.py " + " ".join(sys.argv[1:])
        replace_section(args.doc, "speed", "\n".join(
            [f"`{command.strip()}` on {time.strftime('%Y-%m-%d')}. {lines[0]}", *lines[1:]]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**ratios, "medians": medians, "rates": rates,
                                         "paired_rates": {k: v for k, v in paired.items() if v},
                                         "paired_ratios": per_epoch,
                                         "rounds": args.rounds, "epochs": args.epochs,
                                         "threads": args.threads}, indent=2) + "\n")


if __name__ == "__main__":
    main()
