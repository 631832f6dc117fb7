"""ViT students on Fashion-MNIST: alone, with KD, with DeiT's distillation token; over seeds.

    python scripts/bench_vit.py                       # 3 seeds, 3 epochs (about an hour, 2 cores)
    python scripts/bench_vit.py --seeds 0 --epochs 1  # a quick look
    python scripts/bench_vit.py --report-only         # rewrite the doc from finished runs
    python scripts/bench_vit.py --epochs 12 --teacher-record docs/results/protocol-e12.json
                                                      # the main job's length (section vit-e12)

The main job's data and teacher (``conf/train.yaml``: 1,000 labelled Fashion-MNIST images plus
54,000 the CNN teacher labels softly; the teacher is trained once into the store and shared by
every run), with the student replaced by the zoo's ``vit_nano`` (DeiT-style, patch 4):

* **alone**: the ViT trained on the 1,000 labels only, for the same number of steps (the
  ``baseline`` run of each KD job);
* **kd**: Hinton KD (``distill=kd``, T=4, alpha=0.9) on all 55,000 images;
* **deit**: ``vit_nano_distilled`` with ``distill=deit`` (hard distillation through the
  distillation token, alpha=0.5), tested as the paper does, on the average of its two heads;
* **deit_soft**: the same with ``distill.deit.kind=soft`` (the paper's soft variant: KL to the
  teacher's softmax at T=1 on the distillation head), with the authors' reduction (KL summed over
  classes and divided by N x classes) and with the per-sample KL (``kl_reduction=batchmean``,
  10x larger with 10 classes).

Each configuration is one Hydra multirun over the seeds, in its own folder
``<workdir>/e<EPOCHS>/<configuration>``; a multirun whose runs all have ``results.json`` is not
run again (resumable), and a folder whose ``sweep.json`` names other overrides is refused rather
than reused. Every whole sweep also goes into a record kept in the repository
(``docs/results/<section>.json``, :mod:`bench_record`, with the teacher beside it), so a later
session, whose ``outputs/`` are new, reuses it and trains against the same teacher. Test
accuracy is read on the checkpoint of best validation accuracy; a DeiT student's two heads are
also given on their own. The table goes into docs/RESULTS.md between ``<!-- vit:start -->`` and
``<!-- vit:end -->`` at 3 epochs, ``vit-e<EPOCHS>`` otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import Record, sweep  # noqa: E402
from doc_section import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: configuration → (overrides, which result of each run to read)
CONFIGS = {
    "kd": (["distill=kd", "student=zoo", "student.model.name=vit_nano", "baseline=true"],
           "student"),
    "deit": (["distill=deit", "student=zoo", "student.model.name=vit_nano_distilled",
              "baseline=false"], "student"),
    "deit_soft": (["distill=deit", "distill.deit.kind=soft", "student=zoo",
                   "student.model.name=vit_nano_distilled", "baseline=false"], "student"),
    "deit_soft_sample": (["distill=deit", "distill.deit.kind=soft",
                          "distill.deit.kl_reduction=batchmean", "student=zoo",
                          "student.model.name=vit_nano_distilled", "baseline=false"], "student"),
}
LABELS = {"alone": "ViT alone (1,000 labels; `baseline` of the KD runs)",
          "kd": "ViT + KD (`distill=kd`)",
          "deit": "ViT + DeiT token (`distill=deit`, hard, `vit_nano_distilled`)",
          "deit_soft": "ViT + DeiT token, soft (`distill.deit.kind=soft`)",
          "deit_soft_sample": "ViT + DeiT token, soft, per-sample KL (`kl_reduction=batchmean`)"}


def check_sweep(folder: Path, overrides: list[str], write: bool = True) -> None:
    """Refuse a ``folder`` whose runs were started with other overrides (``sweep.json``, written
    before the first run unless ``write`` is false): finished runs are reused only under the
    command that made them."""
    record = folder / "sweep.json"
    if record.exists():
        earlier = json.loads(record.read_text())["overrides"]
        if earlier != overrides:
            sys.exit(f"{folder} holds runs of other overrides:\n  {shlex.join(earlier)}\nnot\n"
                     f"  {shlex.join(overrides)}\nuse another --workdir (or remove the folder)")
        return
    if not write:
        return
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"overrides": overrides}, indent=1) + "\n")


def run_sweep(record: Record, name: str, folder: Path, overrides: list[str], expected: int,
              store: Path, start: bool) -> tuple[list[dict], float, str]:
    """Sweep ``name`` (:func:`bench_record.sweep`), after checking that ``folder`` holds no runs
    of other overrides. Returns its compact runs, wall time (s; 0 when not whole) and date."""
    check_sweep(folder, overrides, write=start)
    runs, wall = sweep(record, name, folder, overrides, expected, store, start=start, cwd=ROOT)
    entry = record.data["sweeps"].get(name)
    return runs, wall or 0.0, entry["date"] if wall is not None and entry else ""


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} (n={len(values)})"


def report(rows: dict[str, list[float]], teacher: float | None, params: dict[str, int],
           command: str, walls: dict[str, tuple[float, str]], epochs: int,
           heads: dict[str, dict[str, list[float]]]) -> str:
    """The doc section: one row per configuration, with each head's accuracy where the student
    averages two (DeiT), its sweep's wall time and date."""
    alone = statistics.mean(rows["alone"]) if rows.get("alone") else None
    lines = [
        f"### ViT students (issue 20, item 4): {epochs} epochs", "",
        f"Command: `{command}` (resumable: a sweep whose runs have finished is read, not run "
        "again; each row's sweep gives its wall time on 2 CPU cores and its date, the KD "
        "sweep's time includes its `baseline` runs). The main job's data and CNN teacher "
        f"({teacher:.2f}% test), the student replaced by the zoo's `vit_nano` "
        f"({params.get('kd', 0):,} parameters; `vit_nano_distilled`: "
        f"{params.get('deit', params.get('deit_soft', 0)):,}). Test accuracy (%) on the "
        "best-validation checkpoint, mean ± std over seeds; Δ against the ViT alone. A DeiT "
        "student answers with the average of its two heads; the cls and distillation heads' "
        "own test accuracies (`test/acc_cls`, `test/acc_dist`, as DeiT's Table 5) are given "
        "beside it.", "",
        "| student | test acc | Δ | cls head / dist head | sweep wall, date |",
        "|---|---|---|---|---|"]
    for name in ("alone", *CONFIGS):
        if not rows.get(name):
            continue
        delta = (f"{statistics.mean(rows[name]) - alone:+.2f}" if alone is not None
                 else "—")  # the ViT alone comes from the KD sweep's baselines
        wall, day = walls.get(name, (0.0, ""))
        when = (f"{wall / 60:.0f} min, {day}" if wall else
                "(in the KD sweep)" if name == "alone" else "unfinished sweep")
        split = heads.get(name, {})
        each = (" / ".join(f"{statistics.mean(split[h]):.2f}" for h in ("cls", "dist"))
                if all(len(split.get(h, [])) == len(rows[name]) for h in ("cls", "dist"))
                else "—")
        lines.append(f"| {LABELS[name]} | {mean_std(rows[name])} | {delta} | {each} "
                     f"| {when} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_vit")
    parser.add_argument("--teacher-store", type=Path, default=None,
                        help="paths.teacher_store (default: the workdir's teachers/)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--section", default=None,
                        help="the doc section to rewrite (default: vit at 3 epochs, else "
                             "vit-e<EPOCHS>)")
    parser.add_argument("--record", type=Path, default=None,
                        help="the record of finished sweeps kept in the repository (default: "
                             "docs/results/<section>.json, its teacher beside it); recorded "
                             "sweeps are not run again")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS),
                        help="the configurations to run (the report shows every one recorded "
                             "or finished)")
    parser.add_argument("--teacher-record", type=Path, default=None,
                        help="another benchmark's record (e.g. docs/results/protocol-e12.json) "
                             "whose teacher is put into the store first, so these runs read "
                             "that table's teacher")
    parser.add_argument("--report-only", action="store_true",
                        help="write the doc from the record and finished runs, start none")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    root = args.workdir.resolve()
    workdir = root / f"e{args.epochs}"  # runs of different lengths never share a folder
    store = (args.teacher_store or root / "teachers").resolve()
    section = args.section or ("vit" if args.epochs == 3 else f"vit-e{args.epochs}")
    record = Record((args.record or ROOT / "docs" / "results" / f"{section}.json").resolve(),
                    ROOT)
    if not args.report_only:
        if args.teacher_record is not None:
            Record(args.teacher_record.resolve(), ROOT).seed_store(store)
        record.seed_store(store)
    base = [f"trainer.max_epochs={args.epochs}", f"seed={','.join(map(str, args.seeds))}",
            f"paths.teacher_store={store}", "trainer.enable_progress_bar=false", *args.override]
    rows: dict[str, list[float]] = {}
    params: dict[str, int] = {}
    teacher = None
    walls: dict[str, tuple[float, str]] = {}
    heads: dict[str, dict[str, list[float]]] = {}
    for name, (overrides, _) in CONFIGS.items():
        start = not args.report_only and name in args.configs
        results, wall, day = run_sweep(record, name, workdir / name, [*overrides, *base],
                                       len(args.seeds), store, start=start)
        walls[name] = (wall, day)
        for result in results:
            metrics = result["student"]["metrics"]
            rows.setdefault(name, []).append(100 * metrics["test/acc"])
            for head in ("cls", "dist"):
                if f"test/acc_{head}" in metrics:
                    heads.setdefault(name, {}).setdefault(head, []).append(
                        100 * metrics[f"test/acc_{head}"])
            params[name] = result["student"]["params"]
            teacher = 100 * result["teacher"]["metrics"]["test/acc"]
            if "baseline" in result:
                rows.setdefault("alone", []).append(
                    100 * result["baseline"]["metrics"]["test/acc"])
    if not rows:
        sys.exit("no finished runs under " + str(workdir))
    command = "python scripts/bench_vit.py " + shlex.join(
        a for a in sys.argv[1:] if a != "--report-only")
    text = report(rows, teacher, params, command, walls, args.epochs, heads)
    replace_section(args.doc, section, text)
    print(text)


if __name__ == "__main__":
    main()
