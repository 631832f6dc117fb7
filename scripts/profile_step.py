"""Where a training batch's time goes: kdlab's cached-KD loop against the raw student loop.

    python scripts/profile_step.py                       # 6 epochs, prints the table
    python scripts/profile_step.py --doc docs/BENCHMARKS.md

The pair, data, batch size and optimizer are those of ``scripts/bench_speed.py``. One process:
kdlab trains the student with KD from cached teacher logits (the default config, as in the
``kd_cached`` row), and after each of its epochs the raw student-only loop of bench_speed runs
one epoch, so both are timed under the same machine conditions. Both loops are instrumented with
wall-clock timers around their parts (a few hundred nanoseconds each) and every part is given
in µs per batch, the median over the epochs after the first.

kdlab's parts: ``DistillationModule.batch_loss`` (student forward, cache lookup, CE + KD),
the backward pass, ``_optimizer_step`` (fused AdamW through Lightning's optimizer), ``log``
(Lightning's ``self.log`` of the chunk's terms), the rest of ``training_step`` (finiteness
test, the chunk's loop and means) and everything outside ``training_step`` (Lightning's loop,
fetching the chunk: the index gathers, hooks, progress bar).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_speed  # noqa: E402

#: timed parts of kdlab's loop: DistillationModule methods
KDLAB_PARTS = ("training_step", "batch_loss", "_optimizer_step", "log")
#: what the rows of the table show, in order
ROWS = [
    ("batch_loss", "forward + loss (kdlab: `batch_loss`: student forward, cache lookup, CE+KD)"),
    ("backward", "backward"),
    ("step", "optimizer step (kdlab: fused AdamW through Lightning's optimizer wrapper)"),
    ("log", "logging (`self.log` of the chunk's terms, per batch)"),
    ("rest", "rest of `training_step` (finiteness test, chunk loop, term means)"),
    ("outside", "outside the step: batch gathers (raw) / Lightning's loop and fetch (kdlab)"),
    ("epoch", "**whole batch** (epoch time / batches)"),
]


class Timers:
    """Seconds per part, accumulated; ``wrap`` times a callable into a part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.batches = 0

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(part, time.perf_counter() - start)

        return timed

    def per_batch(self) -> dict[str, float]:
        return {k: v / self.batches * 1e6 for k, v in self.seconds.items()}


def instrument_kdlab(timers: Timers) -> None:
    """Time kdlab's parts (class-level wrappers; this process runs one kdlab fit)."""
    from kdlab.engine.callbacks import Throughput
    from kdlab.engine.module import DistillationModule

    for name in KDLAB_PARTS:
        setattr(DistillationModule, name, timers.wrap(name, getattr(DistillationModule, name)))
    make_backward = DistillationModule._backward

    def _backward(self: DistillationModule) -> Callable[[torch.Tensor], None]:
        return timers.wrap("backward", make_backward(self))

    DistillationModule._backward = _backward
    batch_end = Throughput.on_train_batch_end

    def count(self: Throughput, trainer: Any, module: Any, outputs: Any, batch: Any,
              index: int) -> None:
        timers.batches += len(batch) if isinstance(batch, list) else 1
        batch_end(self, trainer, module, outputs, batch, index)

    Throughput.on_train_batch_end = count


def raw_epoch(x: torch.Tensor, y: torch.Tensor, timers: Timers, seed: int) -> None:
    """bench_speed's raw student-only loop (fresh student, same seed), its parts timed."""
    import torch.nn.functional as F

    student = bench_speed.make_student()
    opt = bench_speed.optimizer(student)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    clock = time.perf_counter
    start = clock()
    for i in range(0, len(x), bench_speed.BATCH):
        a = clock()
        idx = perm[i : i + bench_speed.BATCH]
        xb, yb = x[idx], y[idx]
        b = clock()
        loss = F.cross_entropy(student(xb), yb)
        c = clock()
        opt.zero_grad()
        loss.backward()
        d = clock()
        opt.step()
        e = clock()
        timers.add("outside", b - a)
        timers.add("batch_loss", c - b)
        timers.add("backward", d - c)
        timers.add("step", e - d)
        timers.batches += 1
    timers.add("epoch", clock() - start)


_PAIRED: Any = None


def paired() -> Any:
    """The callback that times kdlab's epochs and runs the raw epochs (Hydra ``_target_``)."""
    return _PAIRED


def profile(epochs: int, threads: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per-batch µs of every part, kdlab and raw, medians over the epochs after the first."""
    import lightning as L

    torch.set_num_threads(threads)
    workdir = Path(tempfile.mkdtemp(prefix="kdlab-profile-"))
    x, y = bench_speed.fashion_mnist()
    torch.save((x, y), workdir / "data.pt")
    torch.save(bench_speed.make_teacher().state_dict(), workdir / "teacher.pt")
    kdlab_timers, raw_rows, kdlab_rows = Timers(), [], []
    instrument_kdlab(kdlab_timers)

    class Paired(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            kdlab_timers.seconds, kdlab_timers.batches = {}, 0
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            throughput = next(c for c in trainer.callbacks if type(c).__name__ == "Throughput")
            kdlab_timers.add("epoch", throughput._last - throughput._start)
            kdlab_rows.append(kdlab_timers.per_batch())
            raw = Timers()
            raw_epoch(x, y, raw, seed=len(raw_rows))
            raw_rows.append(raw.per_batch())

    global _PAIRED
    _PAIRED = Paired()
    sys.modules.setdefault("profile_step", sys.modules[__name__])  # Hydra imports it by name
    bench_speed.kdlab_epochs(workdir, workdir / "teacher.pt", epochs,
                             ["distill=kd", "+callbacks.profile._target_=profile_step.paired"])
    for row in kdlab_rows:
        row["step"] = row.pop("_optimizer_step", 0.0)
        row["rest"] = row["training_step"] - sum(row.get(k, 0.0) for k in
                                                 ("batch_loss", "backward", "step", "log"))
        row["outside"] = row["epoch"] - row.pop("training_step")

    def medians(rows: list[dict[str, float]]) -> dict[str, float]:
        rows = rows[1:] or rows
        return {key: statistics.median(r.get(key, 0.0) for r in rows) for key, _ in ROWS}

    return medians(kdlab_rows), medians(raw_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="the first is a warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=None,
                        help="replace the generated profile section of this Markdown file")
    args = parser.parse_args()
    kdlab, raw = profile(args.epochs, args.threads)
    lines = [f"`python scripts/profile_step.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + f" on {time.strftime('%Y-%m-%d')}: µs per batch (batch 128), median over "
             f"{args.epochs - 1} epochs after a warm-up, {args.threads} threads, "
             f"torch {torch.__version__}.", "",
             "| part | raw PyTorch, student only | kdlab KD, cached teacher | difference |",
             "|---|---|---|---|"]
    for key, label in ROWS:
        lines.append(f"| {label} | {raw[key]:,.0f} | {kdlab[key]:,.0f} | "
                     f"{kdlab[key] - raw[key]:+,.0f} |")
    lines += ["", f"Samples/s from these epochs: raw {1e6 * 128 / raw['epoch']:,.0f}, kdlab "
              f"{1e6 * 128 / kdlab['epoch']:,.0f} ({raw['epoch'] / kdlab['epoch']:.2f}×)."]
    print("\n".join(lines))
    if args.doc:
        from doc_section import replace_section

        replace_section(args.doc, "profile", "\n".join(lines))


if __name__ == "__main__":
    main()
