"""kdlab against a raw PyTorch loop of the same pair on one device, in one process.

    python scripts/bench_gpu.py --json $OUT/gpu.json          # a GPU: batch 64 and 256
    python scripts/bench_gpu.py --device cpu --tiny           # the CI check: every row runs

The pair is CIFAR-100's resnet32x4 → resnet8x4 on synthetic CIFAR-100-shaped images (in
memory, on the device, random shift 4 + flip as the recipe; the speed is real, accuracies mean
nothing), KD with T = 4, SGD (momentum 0.9). Rows, for each batch size:

- raw PyTorch: the loop a user writes (teacher under ``inference_mode``, student forward,
  KD + CE, backward, step) in fp32 eager, under bf16 autocast, ``torch.compile``d, and compiled
  with ``mode="reduce-overhead"`` (CUDA graphs);
- kdlab: ``kdlab.train.run`` with ``trainer=gpu``: its default (``trainer.precision=auto``:
  float32 or bf16, measured when the run starts; ``compile: auto``: CUDA graphs where shapes are
  static; the row names what was chosen), fp32 and bf16 eager, compiled in mode default, CUDA
  graphs in fp32 and in bf16, and the default with the exact-view teacher cache
  (``teacher_cache.views=8``; every other kdlab row runs the teacher live,
  ``teacher_cache.views=0``).

Every kdlab row is followed by the raw fp32 eager loop, and its ratio is against that paired
run (the device's clocks and the host drift between rows). A kdlab row's samples/s is the median
of its epochs after the first (Lightning's loop, fetch and hooks included; validation and the
cache's build excluded). Results are written after every row (``--json``), so a run cut short
keeps what it measured. Then a packed cohort of 8 KD members (``hydra/launcher=packed``, one
teacher pass per batch): its students as one ``torch.func.vmap`` pass (``stack=auto`` on a GPU,
eager students) and one after another (``stack=false``, compiled as by default), in
member-samples/s against the kdlab default run of the same batch size; every kdlab row also
reports the device's peak allocated memory.

``--tiny`` (with ``--device cpu``): resnet14 → resnet8, 128 images, a few steps, a pack of 2
(vmap), compile rows skipped (a CPU compile takes minutes); it checks that every other row
runs, not the speed, and writes nothing to docs/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from doc_section import replace_section  # noqa: E402

from kdlab.data.augment import random_shift_flip  # noqa: E402
from kdlab.engine.speed import synchronize  # noqa: E402
from kdlab.models import create  # noqa: E402

SHAPE, CLASSES, T, ALPHA = (3, 32, 32), 100, 4.0, 0.9


def raw_loop(args: argparse.Namespace, batch: int, precision: str = "fp32",
             compile_mode: str | None = None) -> float:
    """Samples/s of the raw KD loop over ``args.steps`` steps after ``args.warmup``."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = create(args.teacher, SHAPE, CLASSES).to(device).eval().requires_grad_(False)
    student = create(args.student, SHAPE, CLASSES).to(device)
    if compile_mode is not None:
        teacher = torch.compile(teacher, mode=None if compile_mode == "default" else compile_mode)
        student = torch.compile(student, mode=None if compile_mode == "default" else compile_mode)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.samples, *SHAPE, device=device)
    y = torch.randint(0, CLASSES, (args.samples,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(j: torch.Tensor) -> None:
        xb = random_shift_flip(x.index_select(0, j), 4, 0.0, True)
        yb = y.index_select(0, j)
        with autocast:
            with torch.inference_mode():
                t = teacher(xb)
            s = student(xb)
            soft = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t.clone() / T, 1),
                            reduction="batchmean", log_target=True) * T * T
            loss = ALPHA * soft + (1 - ALPHA) * F.cross_entropy(s, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    order = torch.randperm(args.samples, device=device)
    batches = [order[i:i + batch] for i in range(0, args.samples - batch + 1, batch)]
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    synchronize(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % len(batches)])
    synchronize(device)
    return args.steps * batch / (time.perf_counter() - start)


def kdlab_cfg(args: argparse.Namespace, store: Path, folder: Path, batch: int,
              overrides: list[str]):
    """The composed config of one kdlab run of the pair in ``folder``."""
    from hydra import compose, initialize_config_dir

    from kdlab.util.config import CONF_DIR

    trainer = ["trainer=gpu"] if args.device != "cpu" else ["trainer=cpu"]
    base = ["experiment=cifar100", "data=synthetic_cifar100", f"data.train_size={args.samples}",
            "data.val_size=64", "data.test_size=64", f"data.batch_size={batch}",
            f"teacher.model.name={args.teacher}", f"student.model.name={args.student}",
            "teacher.train.max_epochs=1", f"trainer.max_epochs={args.epochs}",
            "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "test_last=false", "baseline=false",
            "logger=none", "latency.repeats=1", "scheduler=none", "teacher_cache.views=0",
            *trainer]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", [f"paths.output_dir={folder}", f"paths.log_dir={folder}",
                                 f"paths.teacher_store={store}", *base, *overrides])


def median_speed(results: dict) -> float:
    """Median samples/s over a run's epochs after the first."""
    speeds = results["student"]["train_samples_per_s"]["per_epoch"]
    return statistics.median(speeds[1:] or speeds)


def kdlab_run(args: argparse.Namespace, store: Path, batch: int, overrides: list[str]
              ) -> tuple[float, dict]:
    """Median samples/s over a kdlab run's epochs after the first, and its results."""
    from kdlab.train import run

    folder = Path(tempfile.mkdtemp(dir=store.parent))
    result = run(kdlab_cfg(args, store, folder, batch, overrides))
    return median_speed(result), result


def kdlab_pack(args: argparse.Namespace, store: Path, batch: int, members: int,
               stack: bool | str) -> float:
    """Member-samples/s of a packed cohort of ``members`` KD runs (T = 1, 2, …): ``members ×``
    the pack's median samples/s over its epochs after the first."""
    from kdlab.packed import execute_pack

    root = Path(tempfile.mkdtemp(dir=store.parent))
    eager = ["compile.student=false", "compile.teacher=false"] if stack is not False else []
    cfgs = [kdlab_cfg(args, store, root / str(k), batch,
                      ["distill=kd", f"distill.kd.temperature={k + 1}", *eager])
            for k in range(members)]
    outcome = execute_pack(cfgs, root / "pack", stack)
    for result in outcome:
        if isinstance(result, Exception):
            raise result
    return members * median_speed(outcome[0])


def peak_memory_mb(device: torch.device) -> float | None:
    """The device's peak allocated memory since the last reset (CUDA), in MB."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    if args.tiny:
        args.teacher, args.student, args.samples, args.epochs = "resnet14", "resnet8", 128, 2
        args.steps, args.warmup, args.batches, args.members = 4, 1, [32], 2
    else:
        args.teacher, args.student, args.samples, args.epochs = ("resnet32x4", "resnet8x4",
                                                                 20480, 4)
        args.steps, args.warmup, args.members = 200, 30, 8
    compiled = not args.tiny
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    import lightning

    header = {"device": name, "torch": torch.__version__, "lightning": lightning.__version__,
              "date": time.strftime("%Y-%m-%d"), "pair": f"{args.teacher} -> {args.student}",
              "rows": []}
    rows: list[dict] = header["rows"]

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(header, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "teachers"
        kdlab_run(args, store, args.batches[0], ["distill=none", "trainer.max_epochs=1"])
        for batch in args.batches:
            raw = [("raw fp32 eager", {}), ("raw bf16 autocast", {"precision": "bf16"})]
            if compiled:
                raw += [("raw compile", {"compile_mode": "default"}),
                        ("raw CUDA graphs (reduce-overhead)",
                         {"compile_mode": "reduce-overhead"})]
            for label, options in raw:
                record({"batch": batch, "loop": label,
                        "samples_per_s": raw_loop(args, batch, **options)})
            eager = ["compile.student=false", "compile.teacher=false"]
            kd = [("kdlab fp32 eager", ["trainer.precision=32-true", *eager]),
                  ("kdlab default (trainer=gpu)" if device.type == "cuda" else "kdlab default",
                   []),
                  ("kdlab exact-view cache (K=8)", ["teacher_cache.views=8"])]
            if compiled:
                kd += [("kdlab bf16 eager", ["trainer.precision=bf16-mixed", *eager]),
                       ("kdlab compile (mode default), fp32",
                        ["compile.student=true", "compile.teacher=true", "compile.mode=default",
                         "trainer.precision=32-true"]),
                       ("kdlab CUDA graphs, fp32", ["compile.student=true",
                        "compile.teacher=true", "compile.mode=reduce-overhead",
                        "trainer.precision=32-true"]),
                       ("kdlab CUDA graphs, bf16", ["compile.student=true",
                        "compile.teacher=true", "compile.mode=reduce-overhead",
                        "trainer.precision=bf16-mixed"])]
            single = None
            for label, overrides in kd:
                peak_memory_mb(device)
                speed, result = kdlab_run(args, store, batch, ["distill=kd", *overrides])
                memory = peak_memory_mb(device)
                if not overrides:  # the default run: what a pack is compared with
                    single = speed
                    label += f" ({result['config']['trainer']['precision']})"
                paired = raw_loop(args, batch)
                record({"batch": batch, "loop": label, "samples_per_s": speed,
                        "paired_raw_fp32": paired, "ratio": speed / paired,
                        "peak_gpu_mb": memory, "precision": result.get("precision")})
            # a packed cohort: member-samples/s against one kdlab default run (row above); the
            # vmap pass needs eager students (a compiled student runs its own graph)
            for stack in ([True] if args.tiny else ["auto", False]):
                how = {"auto": "vmap, eager students", True: "vmap",
                       False: "one after another, the default compile"}[stack]
                peak_memory_mb(device)
                speed = kdlab_pack(args, store, batch, args.members, stack)
                memory = peak_memory_mb(device)
                record({"batch": batch, "samples_per_s": speed, "peak_gpu_mb": memory,
                        "loop": f"kdlab packed cohort of {args.members} (students {how})",
                        "vs_one_run": speed / single if single else None})
    lines = [f"`python scripts/bench_gpu.py` on {header['date']}: {name}, torch "
             f"{header['torch']}, lightning {header['lightning']}; {header['pair']} on synthetic "
             f"CIFAR-100-shaped data ({args.samples:,} images in memory, shift 4 + flip), KD "
             f"T = 4. Raw rows: {args.steps} steps after {args.warmup}; kdlab rows: median "
             "epoch after the first; a kdlab row's ratio is against the raw fp32 eager loop run "
             "right after it. A packed cohort's samples/s counts every member's samples "
             f"({args.members} KD members, T = 1 … {args.members}); its ratio is against the "
             "kdlab default row of its batch size.", "",
             "| batch | loop | samples/s | paired raw fp32 | ratio | peak GPU MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        paired = f"{r['paired_raw_fp32']:,.0f}" if "paired_raw_fp32" in r else ""
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else (
            f"{r['vs_one_run']:.2f}× one run" if r.get("vs_one_run") else "")
        memory = f"{r['peak_gpu_mb']:,.0f}" if r.get("peak_gpu_mb") else ""
        lines.append(f"| {r['batch']} | {r['loop']} | {r['samples_per_s']:,.0f} | {paired} | "
                     f"{ratio} | {memory} |")
    text = "\n".join(lines)
    print(text)
    if not args.tiny:
        replace_section(args.doc, "gpu", text)


if __name__ == "__main__":
    main()
