"""How the exact-view cache's build grows: its time and memory against the number of training
samples and of views per sample.

    python scripts/bench_views_scaling.py --samples 5000 20000 55000 --views 1 4 8

Builds the cache of the main job's CNN teacher (422k parameters; random weights: the cost
does not depend on them) over the first ``n`` Fashion-MNIST training images with shift/flip
views, in memory (``teacher_cache.disk=false``), each size in a fresh child process with
kdlab-train's start-up settings (tuned allocator). Reports
wall seconds of the build, images/s, the cache's size and the process's peak resident memory
above what it held before the build, into docs/SCALING.md (section ``views-scaling``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from doc_section import replace_section  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
from kdlab.data import FashionMNISTDataModule
from kdlab.data.views import ViewBank
from kdlab.engine.cache import prepare_cache
from kdlab.engine.spec import CacheOptions
from kdlab.models import CNN
from kdlab.util.runtime import apply_speed_settings

apply_speed_settings()  # what kdlab-train does at start-up (tuned allocator)
n, views = int(sys.argv[1]), int(sys.argv[2])
data = FashionMNISTDataModule(augment=True, val_size=5000)
data.setup()
data.x_train = data.x_train[:n].contiguous()
torch.manual_seed(0)
teacher = CNN([1, 28, 28], 10, channels=[32, 64], hidden=128).eval()
teacher = teacher.to(memory_format=torch.channels_last)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
cache = prepare_cache(CacheOptions(enabled=True, views=views, max_mb=1e9), teacher, None, data,
                      channels_last=True)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "mb": cache.nbytes / 2**20,
                  "rss_before_mb": before / 1024, "peak_extra_mb": (after - before) / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[5000, 20000, 55000])
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "SCALING.md")
    args = parser.parse_args()
    rows = []
    for n in args.samples:
        for k in args.views:
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(k)], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append((n, k, r))
            print(n, k, r, flush=True)
    import torch

    command = (f"python scripts/bench_views_scaling.py --samples "
               f"{' '.join(map(str, args.samples))} --views {' '.join(map(str, args.views))}")
    lines = [f"`{command}` on {time.strftime('%Y-%m-%d')}: CPU ({platform.machine()}, "
             f"{torch.get_num_threads()} threads), torch {torch.__version__}; the main job's "
             "CNN teacher (422k parameters) over Fashion-MNIST training images with shift/flip "
             "views, float16 logits, in memory; one fresh process per row.", "",
             "| samples | views | teacher passes | build s | images/s | cache MB | "
             "peak RSS above start MB |", "|---|---|---|---|---|---|---|"]
    for n, k, r in rows:
        lines.append(f"| {n:,} | {k} | {n * k:,} | {r['seconds']:.1f} | "
                     f"{n * k / r['seconds']:,.0f} | {r['mb']:.2f} | "
                     f"{r['peak_extra_mb']:,.0f} |")
    text = "\n".join(lines)
    print(text)
    replace_section(args.out, "views-scaling", text)


if __name__ == "__main__":
    main()
