"""Run every distillation strategy on Fashion-MNIST and write docs/RESULTS.md.

    python scripts/bench_strategies.py                       # the full protocol (hours on 2 cores)
    python scripts/bench_strategies.py --strategies kd at --epochs 2 --seeds 0 1
    python scripts/bench_strategies.py --report-only         # rewrite the doc from finished runs
    python scripts/bench_strategies.py --strategies nkd wttm --section newer --title "…"
    python scripts/bench_strategies.py --epochs 12 --budget-h 1.5  # a slice; call again to go on

Protocol, per strategy:

1. **Selection** (`transfer` setting, seed 0): one Hydra multirun over a 3-point grid of the
   strategy's main hyper-parameter (`GRIDS`, centred on the published default); the point with
   the best *validation* accuracy is chosen. Test accuracy is never looked at for the choice.
2. **Seeds**: the chosen point is run with the other seeds (the seed-0 run of step 1 is reused)
   in the `transfer` setting (1,000 labels + 54,000 unlabelled images, the main job's data), and
   with all seeds in the `full` setting (55,000 labels), with the value chosen in `transfer`.
3. The CE-only student (`distill=none`) runs with every seed in both settings; all runs share one
   stored teacher. Test accuracy is read once per run, on the checkpoint with the best
   validation accuracy.

Every Hydra multirun writes into its own folder under `--workdir`; once all its runs have a
`results.json` it is added to the record (`docs/results/<section>.json`, kept in the repository
with a copy of the teacher's store entry: :mod:`bench_record`) and is not run again, keyed by its
exact overrides. So an interrupted benchmark resumes where it stopped, a later session on another
machine goes on with the same teacher, and the doc can be regenerated from the record alone
(`--report-only`).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import Record, sweep  # noqa: E402
from doc_section import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"transfer": ["data.num_labels=1000"], "full": ["data.num_labels=null"]}
# The searched key of each strategy and its grid (the published default in the middle).
GRIDS: dict[str, tuple[str, list[float]]] = {
    "kd": ("alpha", [0.5, 0.9, 1.0]),
    "dkd": ("beta", [2.0, 8.0, 16.0]),
    "dist": ("tau", [1.0, 2.0, 4.0]),
    "lskd": ("alpha", [3.0, 9.0, 27.0]),
    "pseudo": ("weight", [0.3, 1.0, 3.0]),
    "label_smoothing": ("epsilon", [0.05, 0.1, 0.2]),
    "fitnets": ("beta", [10.0, 100.0, 1000.0]),
    "at": ("beta", [100.0, 1000.0, 10000.0]),
    "nst": ("beta", [5.0, 50.0, 500.0]),
    "fsp": ("beta", [5.0, 50.0, 500.0]),
    "ft": ("beta", [20.0, 200.0, 2000.0]),
    "ab": ("beta", [0.1, 1.0, 10.0]),
    "ofd": ("beta", [1.0e-4, 1.0e-3, 1.0e-2]),
    "vid": ("beta", [0.1, 1.0, 10.0]),
    "reviewkd": ("beta", [0.1, 1.0, 10.0]),
    "kdsvd": ("beta", [0.1, 1.0, 10.0]),
    "rkd": ("beta", [0.1, 1.0, 10.0]),
    "pkt": ("beta", [3000.0, 30000.0, 300000.0]),
    "sp": ("beta", [300.0, 3000.0, 30000.0]),
    "cc": ("beta", [10.0, 100.0, 1000.0]),
    "crd": ("beta", [0.08, 0.8, 8.0]),
    "nkd": ("gamma", [1.5, 3.5, 7.0]),
    "wttm": ("beta", [1.0, 4.0, 16.0]),
    "ctkd": ("kd.alpha", [0.5, 0.9, 1.0]),
    "catkd": ("beta", [1.5, 15.0, 150.0]),
    "sdd": ("complementary", [1.0, 2.0, 4.0]),
    "simkd": ("beta", [0.1, 1.0, 10.0]),
    "mlkd": ("kd_weight", [0.5, 0.9, 1.0]),
    # DOT is an optimizer (over KD): its grid's delta=0 is plain SGD with momentum 0.9, the
    # control that separates DOT's split momenta from the change of optimizer; the published
    # 0.075 is the grid's top, as momentum + delta must stay below 1
    "dot": ("optimizer.delta", [0.0, 0.05, 0.075]),
}
#: strategies that read the final feature map and the linear classifier on it: kdlab's CNN gives
#: them that with `student.model.hidden=0 teacher.model.hidden=0` (a pair of its own, so they are
#: left out of the default list; `--strategies kd catkd sdd simkd --override ...hidden=0`)
FINAL_MAP = ("catkd", "sdd", "simkd")
#: rows that are not `distill=<name>`: their overrides (the grid key is then a full config path)
VARIANTS = {"dot": ["distill=kd", "optimizer=dot"]}
# Warm-ups given in epochs of a 240-epoch recipe (20 epochs, 8%) are scaled to the short runs.
# CTKD's 10-epoch curriculum of lambda is shortened likewise.
SHORT_RUN = {"dkd": ["distill.dkd.warmup=1"], "reviewkd": ["distill.reviewkd.warmup=1"],
             "ctkd": ["distill.ctkd.loops=1"]}


def key_path(name: str, key: str) -> str:
    """The full config path of a row's grid key."""
    return key if name in VARIANTS else f"distill.{name}.{key}"


def config_value(result: dict, path: str) -> float:
    """The value at a dotted ``path`` of a run's resolved config."""
    value = result["config"]
    for part in path.split("."):
        value = value[part]
    return value


#: wall-clock time (time.monotonic) after which no new sweep starts (``--budget-h``)
DEADLINE = float("inf")
#: the record of finished sweeps (``--record``), the work folder and the teacher store (main)
RECORD: Record
WORKDIR: Path
TEACHER_STORE: Path


def run_sweep(folder: Path, overrides: list[str], expected: int, keep: list[str] = ()
              ) -> list[dict]:
    """One Hydra multirun into `folder`, skipped when the record holds it (same overrides) or
    when ``--budget-h`` has run out (then only what has finished is returned). Returns each
    run's compact result (:func:`bench_record.compact`, with the config values at `keep`)."""
    runs, _ = sweep(RECORD, folder.relative_to(WORKDIR).as_posix(), folder, overrides,
                    expected, TEACHER_STORE, list(keep), start=time.monotonic() <= DEADLINE,
                    cwd=folder.parents[2])
    return runs


def accuracy(result: dict, split: str) -> float:
    return 100 * result["student"]["metrics"][f"{split}/acc"]


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def benchmark(args: argparse.Namespace) -> dict:
    """Run (or read from the record) every sweep; returns the numbers the doc is written from."""
    base = [f"trainer.max_epochs={args.epochs}", "baseline=false",
            f"paths.teacher_store={args.teacher_store}", *args.override]
    seeds = ",".join(map(str, args.seeds))
    rest = ",".join(map(str, args.seeds[1:]))
    report: dict = {"teacher": None, "rows": {}, "wall_s": 0.0}
    used: list[str] = []

    def sweep(folder: Path, overrides: list[str], expected: int, keep: list[str] = ()
              ) -> list[dict]:
        used.append(folder.relative_to(WORKDIR).as_posix())
        return run_sweep(folder, overrides, expected, keep)

    for setting in args.settings:
        folder = args.workdir / setting / "none" / "seeds"
        runs = sweep(folder, ["distill=none", f"seed={seeds}", *SETTINGS[setting], *base],
                     len(args.seeds))
        report["rows"].setdefault("none", {})[setting] = {"runs": runs}
    for name in args.strategies:
        key, grid = GRIDS[name]
        path = key_path(name, key)
        extra = [*VARIANTS.get(name, [f"distill={name}"]), *SHORT_RUN.get(name, []), *base]
        folder = args.workdir / "transfer" / name / "grid"
        grid_runs = sweep(folder, [*extra, f"{path}={','.join(map(str, grid))}",
                                   f"seed={args.seeds[0]}", *SETTINGS["transfer"]],
                          len(grid), [path])
        if len(grid_runs) < len(grid):  # a choice from part of the grid would not be the protocol's
            continue
        best = max(grid_runs, key=lambda r: accuracy(r, "val"))
        value = config_value(best, path)
        row = report["rows"].setdefault(name, {})
        row["key"], row["value"] = key, value
        row["grid"] = {config_value(r, path): accuracy(r, "val") for r in grid_runs}
        for setting in args.settings:
            chosen = [f"{path}={value}", *SETTINGS[setting]]
            folder = args.workdir / setting / name / "seeds"
            if setting == "transfer":
                more = (sweep(folder, [*extra, *chosen, f"seed={rest}"], len(args.seeds) - 1,
                              [path]) if len(args.seeds) > 1 else [])
                runs = [best, *more]
            else:
                runs = sweep(folder, [*extra, *chosen, f"seed={seeds}"], len(args.seeds), [path])
            row[setting] = {"runs": runs}
        if any(len(row[s]["runs"]) < len(args.seeds) for s in args.settings):
            del report["rows"][name]  # half a row (the budget ran out): the next call ends it
    teacher = RECORD.data.get("teacher")
    if teacher:
        report["teacher"] = 100 * teacher["test_acc"]
        report["teacher_params"] = teacher["params"]
    none_runs = [r for setting in report["rows"]["none"].values() for r in setting["runs"]]
    if none_runs:  # every setting trains the same student network
        report["student_params"] = none_runs[0]["student"].get("params")
    entries = RECORD.sweeps(used)
    report["wall_s"] = sum(e["wall_s"] for e in entries)
    days = sorted({e["date"] for e in entries})
    report["dates"] = (days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}") if days else "-"
    report["commits"] = sorted({e["commit"] for e in entries})
    report["cpus"] = sorted({e["cpu"] for e in entries})
    return report


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _thousands(count: int | None) -> str:
    return f"{round(count / 1000)}k" if count else "?"


def write_doc(report: dict, args: argparse.Namespace) -> str:
    rows = report["rows"]
    command = [a for a in sys.argv[1:] if a != "--report-only"]
    default_title = f"Full protocol at {args.epochs} epochs — {len(args.strategies)} strategies"
    none = {s: [accuracy(r, "test") for r in rows.get("none", {}).get(s, {}).get("runs", [])]
            for s in args.settings}
    lines = [
        f"### {args.title or default_title}", "",
        f"Command: `python scripts/bench_strategies.py {shlex.join(command)}` "
        f"({report['dates']}, 2 CPU cores ({', '.join(report['cpus']) or '?'}), "
        f"{report['wall_s'] / 3600:.1f} h of runs, commit{'s' * (len(report['commits']) > 1)} "
        f"{', '.join(report['commits']) or '-'}; every run is in "
        f"`{shown(RECORD.path)}`). "
        f"Student: CNN, {_thousands(report.get('student_params'))} parameters; teacher: CNN, "
        f"{_thousands(report.get('teacher_params'))} parameters, "
        f"{report['teacher'] or float('nan'):.2f}% test accuracy, one stored teacher for all "
        f"runs. Each student trains {args.epochs} epochs (the main job: 12)"
        + (f"; every run adds `{' '.join(args.override)}`" if args.override else "") + ".", "",
        "Protocol: for each strategy, a 3-point grid of its main hyper-parameter (published "
        "default in the middle) runs in the `transfer` setting with seed "
        f"{args.seeds[0]}; the point with the best **validation** accuracy is kept and run with "
        f"seeds {', '.join(map(str, args.seeds))} in both settings (the `full` setting reuses "
        "the value chosen in `transfer`). Test accuracy (%) is read once per run, on the "
        "checkpoint with the best validation accuracy; mean ± std over seeds (n in brackets). "
        "Δ is against the CE-only student of the same setting."
        + (" DKD's and ReviewKD's 20-epoch warm-ups (8% of their 240-epoch recipe) are "
           "shortened to 1 epoch" if {"dkd", "reviewkd"} & set(args.strategies) else "")
        + (", and so is CTKD's 10-epoch curriculum" if "ctkd" in args.strategies else "")
        + (". `dot` is `distill=kd optimizer=dot`: its grid's delta=0 is plain SGD with "
           "momentum, the control for the change of optimizer (the others train with AdamW)"
           if "dot" in args.strategies else "")
        + ("." if {"dkd", "reviewkd", "ctkd", "dot"} & set(args.strategies) else ""), "",
        "- `transfer`: 1,000 labelled training images (100 per class) + 54,000 unlabelled ones "
        "the teacher labels softly — the main job's data.",
        "- `full`: all 55,000 training labels.", "",
        "| strategy | chosen (grid: val acc %) | transfer | Δ | full | Δ |",
        "|---|---|---|---|---|---|",
    ]
    if report["teacher"] is not None:
        lines.append(f"| teacher | — | {report['teacher']:.2f} | | {report['teacher']:.2f} | |")

    def cells(name: str) -> list[str]:
        out = []
        for setting in ("transfer", "full"):
            tests = [accuracy(r, "test") for r in rows.get(name, {}).get(setting, {})
                     .get("runs", [])]
            if not tests or setting not in args.settings:
                out += ["—", ""]
                continue
            out.append(f"{mean_std(tests)} (n={len(tests)})")
            base = none.get(setting) or []
            out.append(f"{statistics.mean(tests) - statistics.mean(base):+.2f}" if base else "")
        return out

    lines.append("| CE only (`none`) | — | " + " | ".join(cells("none")) + " |")

    def sort_key(name: str) -> float:
        tests = [accuracy(r, "test") for r in rows[name].get("transfer", {}).get("runs", [])]
        return -statistics.mean(tests) if tests else 0.0

    for name in sorted((n for n in rows if n != "none"), key=sort_key):
        row = rows[name]
        grid = ", ".join(f"{v:g}: {acc:.1f}" for v, acc in sorted(row["grid"].items()))
        lines.append(f"| `{name}` | {row['key']}={row['value']:g} ({grid}) | "
                     + " | ".join(cells(name)) + " |")
    missing = [n for n in args.strategies if n not in rows]
    lines += ["", f"Strategies with results: {len(rows) - 1} of {len(args.strategies)}"
              + (f" (missing: {', '.join(missing)})" if missing else "") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="*", choices=list(GRIDS),
                        default=[n for n in GRIDS if n not in FINAL_MAP])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_strategies")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--teacher-store", type=Path,
                        default=ROOT / "outputs" / "bench_strategies" / "outputs" / "teachers")
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra Hydra overrides for every run (e.g. for a smoke test)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the doc from finished runs without starting any")
    parser.add_argument("--section", default=None,
                        help="the generated section of --out to rewrite (<!-- NAME:start -->); "
                             "default: protocol (3 epochs) or protocol-e<EPOCHS>")
    parser.add_argument("--title", default=None, help="the section's heading")
    parser.add_argument("--record", type=Path, default=None,
                        help="the record of finished sweeps, kept in the repository (default: "
                             "docs/results/<section>.json, its teacher beside it); recorded "
                             "sweeps are not run again")
    parser.add_argument("--budget-h", type=float, default=None,
                        help="start no new sweep after this many hours; the doc is written "
                             "from what has finished and a later call resumes")
    args = parser.parse_args()
    global DEADLINE, RECORD, WORKDIR, TEACHER_STORE
    if args.budget_h is not None:
        DEADLINE = time.monotonic() + 3600 * args.budget_h
    if args.report_only:
        DEADLINE = float("-inf")
    if "transfer" not in args.settings:
        parser.error("hyper-parameters are chosen in the `transfer` setting: include it")
    if args.section is None:
        args.section = "protocol" if args.epochs == 3 else f"protocol-e{args.epochs}"
    args.workdir = WORKDIR = args.workdir.resolve() / f"e{args.epochs}"
    args.teacher_store = TEACHER_STORE = args.teacher_store.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    RECORD = Record((args.record or ROOT / "docs" / "results" / f"{args.section}.json").resolve(),
                    ROOT)
    if not args.report_only:
        RECORD.seed_store(args.teacher_store)
    doc = write_doc(benchmark(args), args)
    replace_section(args.out, args.section, doc)
    print(doc)


if __name__ == "__main__":
    main()
