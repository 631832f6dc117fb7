"""Run every distillation strategy on Fashion-MNIST and write docs/RESULTS.md.

    python scripts/bench_strategies.py                    # all strategies, 2 settings, 3 seeds
    python scripts/bench_strategies.py --strategies kd at --seeds 0 --max-epochs 2

Two settings: `transfer` (the main job's: 1,000 labels + 54,000 unlabelled images) and `full`
(all 55,000 labels). Each is one Hydra multirun over strategies × seeds sharing one stored
teacher, next to the CE-only student (`distill=none`). Test accuracy is reported as mean ± std
over seeds, for each strategy with its published default hyper-parameters (listed in
docs/STRATEGIES.md); the test split is read once per run, after training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"transfer": ["data.num_labels=1000"], "full": ["data.num_labels=null"]}
NOT_STRATEGIES = {"none", "combo"}


def all_strategies() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "distill").glob("*.yaml")
                  if p.stem not in NOT_STRATEGIES)


def multirun(workdir: Path, setting: str, strategies: list[str], seeds: list[int],
             extra: list[str]) -> tuple[list[dict], float]:
    sweep_dir = workdir / f"sweep-{setting}"
    command = ["kdlab-train", "-m", f"distill={','.join(['none', *strategies])}",
               f"seed={','.join(map(str, seeds))}", "baseline=false", *SETTINGS[setting],
               f"hydra.sweep.dir={sweep_dir}", *extra]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=workdir, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed")
    wall = time.perf_counter() - start
    return [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")], wall


def summarise(results: list[dict]) -> tuple[dict[str, list[float]], float | None]:
    by_strategy: dict[str, list[float]] = defaultdict(list)
    teacher = None
    for r in results:
        by_strategy[r["config"]["distill"].get("name", "none")].append(
            r["student"]["metrics"]["test/acc"])
        if "teacher" in r:
            teacher = r["teacher"]["metrics"]["test/acc"]
    return by_strategy, teacher


def fmt(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="*", default=all_strategies())
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_strategies")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args()
    extra = [f"trainer.max_epochs={args.max_epochs}"] if args.max_epochs else []
    args.workdir.mkdir(parents=True, exist_ok=True)

    lines = ["# Results: every strategy on Fashion-MNIST", "",
             f"`python scripts/bench_strategies.py {' '.join(sys.argv[1:])}` on "
             f"{time.strftime('%Y-%m-%d')}. Student: CNN 27k params; teacher: CNN 422k params "
             "(one stored teacher for all runs). Published default hyper-parameters "
             "(docs/STRATEGIES.md); test accuracy %, mean ± std over seeds.", ""]
    table: dict[str, dict[str, str]] = defaultdict(dict)
    for setting in args.settings:
        results, wall = multirun(args.workdir, setting, args.strategies, args.seeds, extra)
        by_strategy, teacher = summarise(results)
        for name, values in by_strategy.items():
            table[name][setting] = fmt(values)
        if teacher is not None:
            table["(teacher)"][setting] = f"{100 * teacher:.2f}"
        lines.append(f"- `{setting}`: {len(results)} runs in {wall / 60:.1f} min")
    lines += ["", "| strategy | " + " | ".join(args.settings) + " |",
              "|---|" + "---|" * len(args.settings)]
    order = ["(teacher)", "none"] + sorted(k for k in table if k not in ("(teacher)", "none"))
    for name in order:
        if name in table:
            label = "CE only (none)" if name == "none" else name
            lines.append(f"| {label} | " + " | ".join(table[name].get(s, "—")
                                                      for s in args.settings) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
