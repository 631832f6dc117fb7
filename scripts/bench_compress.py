"""Summarise compress=prune runs: mean ± std over seeds of each model's test accuracy, non-zero
parameters, sizes and CPU latency, plus a latency re-measurement of the saved students timed
round-robin (dense, pruned, int8 in turn, so a busy machine slows them alike).

    kdlab-train compress=prune compress.prune.amount=0.9 seed=0 baseline=false \
        hydra.run.dir=OUT/s0_p0.9              # and p0.5, p0.8 with dense_reference=false
    python scripts/bench_compress.py OUT --repeats 200 > table.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kdlab.engine.compression import quantize_dynamic_int8  # noqa: E402
from kdlab.engine.teachers import load_weights  # noqa: E402
from kdlab.util.measure import side_by_side_latency_ms  # noqa: E402


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _student(results: dict, ckpt: str) -> torch.nn.Module:
    cfg = OmegaConf.create(results["config"])
    model = instantiate(cfg.student.model, input_shape=[1, 28, 28], num_classes=10)
    model.load_state_dict(load_weights(ckpt))
    return model.eval()


def round_robin_ms(models: dict[str, torch.nn.Module], repeats: int) -> dict[str, float]:
    """Median ms per batch of 128 of each model, timed side by side ``repeats`` times."""
    return side_by_side_latency_ms(models, (1, 28, 28), 128, repeats, warmup=5,
                                   channels_last=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repeats", type=int, default=0, help="round-robin latency repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(args.folder.glob("*/results.json")):
        results = json.loads(path.read_text())
        report = results["compress"]
        amount = (report["prune"] or {}).get("amount")
        models = {}
        for name, m in report["models"].items():
            if name.startswith("dense"):
                key = "dense + int8" if name.endswith("int8") else "dense fp32"
            else:
                key = f"{amount:.0%} pruned" + (" + int8" if name.endswith("int8") else " fp32")
            for field in ("test_acc", "nonzero_params", "bytes", "zipped_bytes", "latency_ms"):
                rows[key][field].append(m[field])
            rows[key]["sparse_bytes"].append(m.get("sparse_bytes", m["bytes"]))
        if args.repeats:
            stages = {s["stage"]: s for s in results["stages"]}
            if amount is not None:
                pruned = _student(results, stages["student"]["best_ckpt"])
                models[f"{amount:.0%} pruned fp32"] = pruned
                models[f"{amount:.0%} pruned + int8"] = quantize_dynamic_int8(pruned)[0]
            dense_stage = stages.get("student_dense", stages["student"] if amount is None else None)
            if dense_stage is not None:
                dense = _student(results, dense_stage["best_ckpt"])
                models["dense fp32"] = dense
                models["dense + int8"] = quantize_dynamic_int8(dense)[0]
            for name, ms in round_robin_ms(models, args.repeats).items():
                rows[name]["rr_ms"].append(ms)
    header = ["model", "test acc %", "non-zero params", "state_dict KB", "zipped KB",
              "bitmask+values KB", "CPU ms/batch (run)", "CPU ms/batch (round-robin)"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    order = sorted(rows, key=lambda k: (not k.startswith("dense"), k.split()[0], "int8" in k))
    for key in order:
        r = rows[key]
        cells = [key, _fmt(r["test_acc"], 100) if r["test_acc"] else "—",
                 _fmt(r["nonzero_params"], digits=0) if r["nonzero_params"] else "—",
                 _fmt(r["bytes"], 1e-3, 1) if r["bytes"] else "—",
                 _fmt(r["zipped_bytes"], 1e-3, 1) if r["zipped_bytes"] else "—",
                 _fmt(r["sparse_bytes"], 1e-3, 1) if "pruned fp32" in key else "—",
                 _fmt(r["latency_ms"]) if r["latency_ms"] else "—",
                 _fmt(r["rr_ms"]) if r["rr_ms"] else "—"]
        print("| " + " | ".join(cells) + f" |  <!-- n={len(r['test_acc'] or r['rr_ms'])} -->")


if __name__ == "__main__":
    main()
