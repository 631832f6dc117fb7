"""Run a table of the KD literature (teachers included, via the teacher store) over seeds and
write docs/REPRODUCTION.md: the published numbers next to ours.

    python scripts/reproduce.py --table cifar100_same --methods vanilla kd dkd crd --seeds 0 1 2
    python scripts/reproduce.py --table all --smoke            # synthetic data, minutes on a CPU
    python scripts/reproduce.py --table cifar100_same --report-only

Each (row, method) is one Hydra multirun ``kdlab-train -m experiment=<recipe> …
seed=0,1,2`` into ``<workdir>/<table>/<teacher>-<student>/<method>/s<seed>``; a multirun whose
runs all finished is not run again, and a killed one continues (kdlab_run.json). Our columns give
the student's test accuracy (mean ± std over seeds) read on the checkpoint of best *validation*
accuracy (5,000 training images held out; never the test set) and on the last epoch's weights.
The published columns are as printed in their sources, whose code selects the best epoch on the
test set (best-on-test), which favours them by a few tenths.

``--smoke`` runs every row on synthetic images of the same shapes (``data=synthetic_cifar100`` /
``synthetic_imagenet`` at 64 px) for a few batches: it proves each row runs end to end (models,
recipe, strategy, teacher store, report) but its accuracies mean nothing, and the report says
so. Without ``--smoke`` the real datasets must be under ``paths.data_dir`` (``--data-dir``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_section import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CRD = "CRD (Tian, Krishnan & Isola, ICLR 2020), Tables 1-2"
DKD = "DKD (Zhao et al., CVPR 2022), as listed in the mdistiller README"
PAPERS = ("each method's own paper (DIST NeurIPS 2022, LSKD CVPR 2024 (KD+LS, Table 2), NKD "
          "ICCV 2023, WTTM ICLR 2024, CTKD AAAI 2023 and DOT ICCV 2023 on KD, CAT-KD CVPR 2023, "
          "SDD CVPR 2024 (SD-KD with M = {1, 2}, Tables 6-7), MLKD CVPR 2023, SimKD CVPR 2022)")


@dataclass
class Row:
    teacher: str
    student: str
    published: dict[str, float]  #: method (or "teacher") → top-1 %
    overrides: list[str] = field(default_factory=list)


#: students trained with LR 0.01 in the CIFAR-100 recipe (CRD, mdistiller)
LIGHT_LR = ["optimizer.lr=${scaled_lr:0.01,64}"]

TABLES: dict[str, dict] = {
    "cifar100_same": {
        "title": "CIFAR-100, teacher and student of the same family",
        "experiment": "cifar100",
        "sources": {"teacher": CRD, "vanilla": CRD, "kd": DKD, "dkd": DKD, "crd": CRD,
                    "dist, lskd, nkd, wttm, ctkd, dot, catkd, sdd, mlkd, simkd": PAPERS},
        "rows": [
            Row("wrn_40_2", "wrn_16_2", {"teacher": 75.61, "vanilla": 73.26, "kd": 74.92,
                                         "dkd": 76.23, "crd": 75.48}),
            Row("wrn_40_2", "wrn_40_1", {"teacher": 75.61, "vanilla": 71.98, "kd": 73.54,
                                         "dkd": 74.81, "crd": 74.14}),
            Row("resnet56", "resnet20", {"teacher": 72.34, "vanilla": 69.06, "kd": 70.66,
                                         "dkd": 71.97, "crd": 71.16}),
            Row("resnet110", "resnet32", {"teacher": 74.31, "vanilla": 71.14, "kd": 73.08,
                                          "dkd": 74.11, "crd": 73.48}),
            Row("resnet32x4", "resnet8x4", {"teacher": 79.42, "vanilla": 72.50, "kd": 73.33,
                                            "dkd": 76.32, "crd": 75.51, "dist": 76.31,
                                            "nkd": 76.35, "wttm": 76.06, "ctkd": 73.39,
                                            "dot": 75.12, "catkd": 76.91, "mlkd": 77.08,
                                            "simkd": 78.08, "lskd": 76.62, "sdd": 76.63}),
            Row("vgg13", "vgg8", {"teacher": 74.64, "vanilla": 70.36, "kd": 72.98,
                                  "dkd": 74.68, "crd": 73.94}),
        ],
    },
    "cifar100_cross": {
        "title": "CIFAR-100, teacher and student of different families",
        "experiment": "cifar100",
        "sources": {"teacher": CRD, "vanilla": CRD, "kd": DKD, "dkd": DKD, "crd": CRD},
        "rows": [
            Row("resnet32x4", "shufflenetv1", {"teacher": 79.42, "vanilla": 70.50, "kd": 74.07,
                                               "dkd": 76.45, "crd": 75.11}, LIGHT_LR),
            Row("wrn_40_2", "shufflenetv1", {"teacher": 75.61, "vanilla": 70.50, "kd": 74.83,
                                             "dkd": 76.70, "crd": 76.05}, LIGHT_LR),
            Row("vgg13", "mobilenetv2", {"teacher": 74.64, "vanilla": 64.60, "kd": 67.37,
                                         "dkd": 69.71, "crd": 69.73}, LIGHT_LR),
            Row("resnet50_cifar", "mobilenetv2", {"teacher": 79.34, "vanilla": 64.60,
                                                  "kd": 67.35, "dkd": 70.35, "crd": 69.11},
                LIGHT_LR),
            Row("resnet32x4", "shufflenetv2", {"teacher": 79.42, "vanilla": 71.82, "kd": 74.45,
                                               "dkd": 77.07, "crd": 75.65}, LIGHT_LR),
        ],
    },
    "imagenet": {
        "title": "ImageNet, ResNet-34 → ResNet-18 (top-1)",
        "experiment": "imagenet",
        "sources": {"teacher": "torchvision's IMAGENET1K_V1 weights", "vanilla": CRD,
                    "kd": DKD, "dkd": DKD, "crd": CRD},
        "rows": [
            Row("resnet34", "resnet18", {"teacher": 73.31, "vanilla": 69.76, "kd": 71.03,
                                         "dkd": 71.70, "crd": 71.17}),
        ],
        "method_overrides": {"kd": ["distill.kd.temperature=1.0", "distill.kd.alpha=0.5"],
                             "dkd": ["distill.dkd.temperature=1.0", "distill.dkd.beta=0.5"]},
    },
}

#: method → the distill option (``vanilla``: the student alone, no teacher)
METHODS = {"vanilla": "none", "kd": "kd", "dkd": "dkd", "crd": "crd", "fitnets": "fitnets",
           "at": "at", "rkd": "rkd", "pkt": "pkt", "sp": "sp", "vid": "vid",
           "reviewkd": "reviewkd", "ofd": "ofd", "dist": "dist", "lskd": "lskd", "nkd": "nkd",
           "wttm": "wttm", "ctkd": "ctkd", "catkd": "catkd", "sdd": "sdd", "dot": "kd",
           "mlkd": "mlkd", "simkd": "simkd"}
#: what a method sets besides its distill option (DOT is KD trained with optimizer=dot; MLKD's
#: authors train this pair with LR 0.025 at batch 64)
METHOD_OPTIONS = {"dot": ["optimizer=dot"], "mlkd": ["optimizer.lr=${scaled_lr:0.025,64}"]}

#: a few batches on synthetic images of the real shapes: every piece runs, nothing is measured
SMOKE = {
    "cifar100": ["data=synthetic_cifar100", "data.train_size=320", "data.val_size=64",
                 "data.test_size=128", "data.batch_size=32", "data.eval_batch_size=64",
                 "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                 "scheduler.milestones=[1]", "teacher.train.max_epochs=2",
                 "latency.repeats=2", "latency.batch_size=8"],
    "imagenet": ["data=synthetic_imagenet", "data.input_shape=[3,64,64]",
                 "data.num_classes=100",
                 "data.train_size=160", "data.val_size=32", "data.test_size=64",
                 "data.shift=4", "data.batch_size=16", "data.eval_batch_size=32",
                 "teacher.model.weights=null", "teacher.ckpt=null", "trainer.max_epochs=2",
                 "trainer.limit_train_batches=3", "scheduler.milestones=[1]",
                 "latency.repeats=2", "latency.batch_size=8"],
}


def run_cell(folder: Path, experiment: str, row: Row, method: str, seeds: list[int],
             store: Path, smoke: bool, data_dir: Path | None,
             method_overrides: list[str] = ()) -> bool:
    """One multirun over ``seeds``; True if every seed has a results.json."""
    if len(list(folder.glob("s*/results.json"))) >= len(seeds):
        return True
    command = ["kdlab-train", "-m", f"experiment={experiment}",
               f"teacher.model.name={row.teacher}", f"student.model.name={row.student}",
               f"distill={METHODS[method]}", *METHOD_OPTIONS.get(method, []),
               *method_overrides, *row.overrides,
               *(SMOKE[experiment] if smoke else []),
               f"seed={','.join(map(str, seeds))}", f"paths.teacher_store={store}",
               f"hydra.sweep.dir={folder}", "hydra.sweep.subdir=s${seed}",
               "trainer.enable_progress_bar=false"]
    if data_dir is not None:
        command.append(f"paths.data_dir={data_dir}")
    print("+", " ".join(command), flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(folder / "run.log", "a") as log:
        proc = subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    (folder / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    if proc.returncode != 0:
        print(f"  failed ({proc.returncode}); see {folder / 'run.log'}", flush=True)
        return False
    return True


def _stat(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _published(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def read_cell(folder: Path) -> dict[str, list[float]]:
    """Accuracies (%) over the finished seeds of one cell."""
    out: dict[str, list[float]] = {"best_val": [], "last": [], "teacher": []}
    for path in sorted(folder.glob("s*/results.json")):
        result = json.loads(path.read_text())
        metrics = result["student"]["metrics"]
        out["best_val"].append(100 * metrics["test/acc"])
        if "last/test/acc" in metrics:
            out["last"].append(100 * metrics["last/test/acc"])
        teacher = result.get("teacher", {}).get("metrics", {}).get("test/acc")
        if teacher is not None:
            out["teacher"].append(100 * teacher)
    return out


def report(table: str, workdir: Path, methods: list[str], smoke: bool,
           rows: list[str] | None = None) -> str:
    """The table's section: every row (or only ``rows``, as teacher-student) × ``methods``."""
    spec = TABLES[table]
    lines = ["Columns: the published number; ours on the best-validation checkpoint; ours on "
             "the last epoch's weights — test top-1 %, mean ± std over the seeds run (n).", "",
             "| teacher → student | method | published | ours (val-selected) | ours (last "
             "epoch) | n |", "|---|---|---|---|---|---|"]
    for row in spec["rows"]:
        pair = f"{row.teacher}-{row.student}"
        if rows and pair not in rows:
            continue
        teacher_acc: list[float] = []
        cells = []
        for method in methods:
            cell = read_cell(workdir / table / pair / method)
            teacher_acc = teacher_acc or cell["teacher"]
            published = row.published.get(method)
            cells.append((method, published, cell))
        name = f"{row.teacher} → {row.student}"
        published_teacher = row.published.get("teacher")
        lines.append(f"| {name} | teacher | {_published(published_teacher)} | "
                     f"{_stat(teacher_acc)} | — | {len(teacher_acc)} |")
        for method, published, cell in cells:
            lines.append(f"| {name} | {method} | {_published(published)} | "
                         f"{_stat(cell['best_val'])} | {_stat(cell['last'])} | "
                         f"{len(cell['best_val'])} |")
    sources = "; ".join(f"{k}: {v}" for k, v in spec["sources"].items())
    status = ("**Smoke run on synthetic images** (`--smoke`: a few batches of random "
              "class-patterned images of the real shapes): every row ran end to end, but these "
              "accuracies say nothing about the method — no row of this table is reproduced "
              "yet." if smoke else "**Real data**, the full recipe.")
    title = spec["title"] + (": " + ", ".join(r.replace("-", " → ") for r in rows)
                             if rows else "")
    return (f"### {title}\n\n{status} Published numbers: {sources}.\n\n"
            + "\n".join(lines))


def published_methods(spec: dict) -> list[str]:
    """The student alone, then every method with a published number in some row of the
    table, in :data:`METHODS` order."""
    published = set().union(*(row.published for row in spec["rows"]))
    return ["vanilla", *(m for m in METHODS if m != "vanilla" and m in published)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", nargs="*", default=["cifar100_same"],
                        choices=[*TABLES, "all"])
    parser.add_argument("--methods", nargs="*", default=None, choices=list(METHODS),
                        help="default: the student alone and every method with a published "
                             "number in the table")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="*", default=None,
                        help="only these rows, as teacher-student (e.g. resnet32x4-resnet8x4)")
    parser.add_argument("--smoke", action="store_true",
                        help="synthetic data and a few batches (no real data needed)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="default: outputs/reproduce (outputs/reproduce_smoke with --smoke)")
    parser.add_argument("--data-dir", type=Path, default=None, help="paths.data_dir")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "REPRODUCTION.md")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    tables = list(TABLES) if "all" in args.table else args.table
    workdir = (args.workdir or ROOT / "outputs" / ("reproduce_smoke" if args.smoke
                                                  else "reproduce")).resolve()
    store = workdir / "teachers"
    pairs = {t: {f"{r.teacher}-{r.student}" for r in TABLES[t]["rows"]} for t in tables}
    unknown = sorted(set(args.rows or []) - set().union(*pairs.values()))
    if unknown:
        parser.error(f"--rows {' '.join(unknown)}: no such row in --table "
                     f"{' '.join(tables)} (rows are teacher-student, e.g. "
                     f"resnet32x4-resnet8x4)")
    failed = 0
    start = time.perf_counter()
    for table in tables:
        if args.rows and not pairs[table] & set(args.rows):
            continue  # none of the rows asked for is in this table
        spec = TABLES[table]
        methods = args.methods or published_methods(spec)
        for row in spec["rows"]:
            pair = f"{row.teacher}-{row.student}"
            if args.rows and pair not in args.rows:
                continue
            for method in methods:
                if args.report_only:
                    continue
                if method not in row.published and method != "vanilla":
                    print(f"  {pair}: no published {method} number, running it anyway",
                          flush=True)
                ok = run_cell(workdir / table / pair / method, spec["experiment"], row, method,
                              args.seeds, store, args.smoke, args.data_dir,
                              spec.get("method_overrides", {}).get(method, []))
                failed += not ok
        text = report(table, workdir, methods, args.smoke, args.rows)
        mode = "smoke" if args.smoke else "full"
        rows = f" --rows {' '.join(args.rows)}" if args.rows else ""
        command = (f"`python scripts/reproduce.py --table {table}{rows} --methods "
                   f"{' '.join(methods)} --seeds {' '.join(map(str, args.seeds))}"
                   f"{' --smoke' if args.smoke else ''}` ({time.strftime('%Y-%m-%d')})")
        # a run of some rows writes its own section: it never replaces the whole table's
        key = f"reproduce-{table}-{mode}" + ("-" + "-".join(args.rows) if args.rows else "")
        replace_section(args.doc, key, f"{command}\n\n{text}")
        print(text, flush=True)
    if not args.report_only:
        print(f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
