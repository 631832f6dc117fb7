"""Packed cohorts against the same jobs run one after another, paired in one process.

A sweep of N live-teacher KD students (``distill.kd.temperature`` = 1, 2, 4, … — one value per
member, the teacher running on every batch: ``teacher_cache.enabled=false``) is trained

- **sequentially**: N runs alone, one after another (what ``kdlab-train -m`` does with the basic
  launcher), and
- **packed**: one pack of the same N jobs (``hydra/launcher=packed``,
  :func:`kdlab.packed.execute_pack`),

in rounds, in this process. A run's speed is the median training samples/s of its epochs after
the first (validation and checkpoints left out). The sweep's speed is the samples its members
train per second of training: packed ``N × s_pack``; sequential ``N / Σ 1/s_i``.

``--scaling N1 N2 …`` instead runs one pack per size in a fresh subprocess each and reports its
member-samples/s and the process's peak resident memory above its start.

    python scripts/bench_pack.py --members 4 --rounds 3              # docs/BENCHMARKS.md
    python scripts/bench_pack.py --student cnn --members 4 --rounds 1
    python scripts/bench_pack.py --members 4 --rounds 3 --compare-stack   # loop against vmap
    python scripts/bench_pack.py --scaling 1 2 4 8                   # docs/SCALING.md
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from doc_section import replace_section  # noqa: E402

#: the students: the pair the issue measured (the main job's CNN teacher → a 784-128-10 MLP),
#: and the main job's own CNN student
STUDENTS = {"mlp": ["student=mlp"], "cnn": ["student=cnn"]}
STUDENT_LABELS = {"mlp": "MLP 784-128-10 student (102k)", "cnn": "CNN student (27k)"}
#: Fashion-MNIST with the main job's transfer set, live teacher
BASE = ["distill=kd", "teacher_cache.enabled=false", "baseline=false", "scheduler=none",
        "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.limit_train_batches=200", "latency.repeats=1",
        "logger=none"]
LABEL = ("Fashion-MNIST (real data), the main job's CNN teacher (422k parameters) → {student}, "
         "batch 128, live teacher on every batch (teacher_cache.enabled=false), 200 batches per "
         "epoch")


def compose(folder: Path, tmp: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kdlab.util.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", [f"paths.output_dir={folder}", f"paths.log_dir={folder}",
                                       f"paths.teacher_store={tmp}/teachers", *overrides])


#: the student of this invocation (``--student``)
STUDENT = ["mlp"]


def member_overrides(n: int, epochs: int) -> list[list[str]]:
    return [[*BASE, *STUDENTS[STUDENT[0]], f"trainer.max_epochs={epochs}",
             f"distill.kd.temperature={2 ** k}"] for k in range(n)]


def speed(results: dict) -> float:
    values = results["student"]["train_samples_per_s"]["per_epoch"]
    return statistics.median(values[1:] or values)


def run_pack(tmp: Path, n: int, epochs: int, stack: bool | str = "auto") -> float:
    """Member-samples/s of one pack of ``n`` (``n ×`` its batch stream's samples/s)."""
    from kdlab.packed import execute_pack

    root = Path(tempfile.mkdtemp(dir=tmp))
    cfgs = [compose(root / str(k), tmp, o) for k, o in enumerate(member_overrides(n, epochs))]
    outcome = execute_pack(cfgs, root / "pack", stack)
    errors = [o for o in outcome if isinstance(o, Exception)]
    if errors:
        raise errors[0]
    return n * speed(outcome[0])


def run_sequential(tmp: Path, n: int, epochs: int) -> float:
    """Member-samples/s of the same ``n`` jobs run alone one after another."""
    from kdlab.train import execute

    speeds = [speed(execute(compose(Path(tempfile.mkdtemp(dir=tmp)), tmp, o)))
              for o in member_overrides(n, epochs)]
    return n / sum(1 / s for s in speeds)


def header(command: str) -> str:
    label = LABEL.format(student=STUDENT_LABELS[STUDENT[0]])
    return (f"`{command}` on {time.strftime('%Y-%m-%d')}: {label}. CPU ({platform.machine()}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}.")


def rounds(args: argparse.Namespace, first: tuple[str, Any], second: tuple[str, Any]
           ) -> tuple[list[float], list[float]]:
    """``args.rounds`` rounds of two measurements, ``(name, () -> member-samples/s)`` each, in
    this process, after the teacher is trained into a temporary store once."""
    a: list[float] = []
    b: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        run_sequential(Path(tmp), 1, 1)
        for r in range(args.rounds):
            a.append(first[1](Path(tmp)))
            b.append(second[1](Path(tmp)))
            print(f"round {r + 1}: {first[0]} {a[-1]:,.0f}, {second[0]} {b[-1]:,.0f} "
                  "member-samples/s", flush=True)
    return a, b


def write_table(args: argparse.Namespace, section: str, intro: str, column: str,
                rows: list[tuple[str, list[float]]], ratio: str) -> None:
    """The two rows' speeds per round and median, and the second over the first."""
    (_, a), (_, b) = rows
    ratios = [y / x for x, y in zip(a, b)]
    lines = [intro, "", f"| {column} | member-samples/s per round | median |", "|---|---|---|"]
    for name, values in rows:
        lines.append(f"| {name} | {', '.join(f'{v:,.0f}' for v in values)} | "
                     f"{statistics.median(values):,.0f} |")
    lines.append(f"| **{ratio}** | {', '.join(f'{v:.2f}×' for v in ratios)} | "
                 f"**{statistics.median(ratios):.2f}×** |")
    text = "\n".join(lines)
    print(text)
    replace_section(args.out, section, text)


def paired(args: argparse.Namespace) -> None:
    """The same sweep run one job after another, then as one pack."""
    n = args.members
    sequential, packed = rounds(args, ("sequential", lambda t: run_sequential(t, n, args.epochs)),
                                ("packed", lambda t: run_pack(t, n, args.epochs)))
    command = (f"python scripts/bench_pack.py --student {STUDENT[0]} --members {n} "
               f"--rounds {args.rounds} --epochs {args.epochs}")
    intro = (header(command) + f" {n} KD members (T = {', '.join(str(2 ** k) for k in range(n))}"
             f"); each run trains {args.epochs} epochs, its speed is the median samples/s of "
             "the epochs after the first; each round runs the sequential sweep, then the pack.")
    write_table(args, f"pack-speed-{STUDENT[0]}-{n}", intro, "sweep of the same jobs",
                [(f"{n} runs one after another", sequential), (f"one pack of {n}", packed)],
                "packed / sequential")


def compare_stack(args: argparse.Namespace) -> None:
    """The same pack with its students one after another and as one vectorised pass."""
    n = args.members
    loop, stacked = rounds(args, ("loop", lambda t: run_pack(t, n, args.epochs, stack=False)),
                           ("stacked", lambda t: run_pack(t, n, args.epochs, stack=True)))
    command = (f"python scripts/bench_pack.py --student {STUDENT[0]} --members {n} "
               f"--rounds {args.rounds} --epochs {args.epochs} --compare-stack")
    intro = (header(command) + f" One pack of {n} KD members, its students one after another "
             "(`hydra.launcher.stack=false`) or as one `torch.func.vmap` pass (`stack=true`); "
             "each round runs both.")
    write_table(args, f"pack-stack-{STUDENT[0]}-{n}", intro, "pack of the same jobs",
                [("students one after another", loop), ("students as one vmap pass", stacked)],
                "vmap / loop")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (``VmHWM``: reset by ``exec``, unlike
    ``ru_maxrss``, which a child inherits from the process that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One pack in this fresh process: its speed and peak memory above the start, as JSON."""
    before = peak_rss_mb()
    with tempfile.TemporaryDirectory(dir=args.store.parent) as tmp:
        Path(tmp, "teachers").symlink_to(args.store)
        start = time.perf_counter()
        rate = run_pack(Path(tmp), args.child, args.epochs) if args.child > 1 else \
            run_sequential(Path(tmp), 1, args.epochs)
        wall = time.perf_counter() - start
    print(json.dumps({"members": args.child, "rate": rate, "wall_s": wall,
                      "peak_extra_mb": peak_rss_mb() - before}))


def scaling(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "teachers"
        store.mkdir()
        with tempfile.TemporaryDirectory(dir=tmp) as warm:  # the teacher, trained once
            Path(warm, "teachers").symlink_to(store)
            run_sequential(Path(warm), 1, 1)
        for n in args.scaling:
            out = subprocess.run([sys.executable, __file__, "--student", STUDENT[0],
                                  "--child", str(n), "--store",
                                  str(store), "--epochs", str(args.epochs)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    one = rows[0]["rate"]
    command = (f"python scripts/bench_pack.py --student {STUDENT[0]} --scaling "
               f"{' '.join(map(str, args.scaling))} --epochs {args.epochs}")
    lines = [header(command) + " One fresh process per size (N = 1 is a run alone); "
             "member-samples/s is N × the pack's samples/s (median of the epochs after the "
             "first); peak memory is the process's peak resident set above its start.", "",
             "| members N | member-samples/s | × one run | wall s (incl. build, val, test) | "
             "peak RSS above start MB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['members']} | {r['rate']:,.0f} | {r['rate'] / one:.2f}× | "
                     f"{r['wall_s']:.0f} | {r['peak_extra_mb']:,.0f} |")
    text = "\n".join(lines)
    print(text)
    replace_section(args.scaling_out, "pack-scaling", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", choices=sorted(STUDENTS), default="mlp")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--scaling", type=int, nargs="*")
    parser.add_argument("--compare-stack", action="store_true",
                        help="the pack's students one after another against one vmap pass")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--scaling-out", type=Path, default=ROOT / "docs" / "SCALING.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    STUDENT[0] = args.student
    if args.child:
        child(args)
    elif args.scaling:
        scaling(args)
    elif args.compare_stack:
        compare_stack(args)
    else:
        paired(args)


if __name__ == "__main__":
    main()
