"""What a top-k teacher cache (``teacher_cache.topk``) changes: the error of the expanded soft
targets against the full ones, and the bytes per stored input.

    python scripts/bench_topk.py --epochs 3

Trains the main job's CNN teacher architecture (plain PyTorch, AdamW, ``--epochs`` epochs) on
Fashion-MNIST (10 classes, real data) and on synthetic CIFAR-100-shaped data (100 classes;
numbers on it say nothing about CIFAR), then compares, over the training split (what a cache
stores), the teacher's softmax at T = 1 and T = 4 with that of the expanded top-k logits:
``KL(p ‖ p̂)`` per input (mean and 99th percentile, nats) and the largest absolute
probability error. Writes docs/BENCHMARKS.md (section ``topk-error``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from doc_section import replace_section  # noqa: E402

from kdlab.data import FashionMNISTDataModule, SyntheticDataModule  # noqa: E402
from kdlab.engine.topk import compress, expand, kl_error  # noqa: E402
from kdlab.models import CNN  # noqa: E402


def teacher_logits(data, epochs: int) -> tuple[torch.Tensor, float]:
    """Training-split logits of a CNN trained ``epochs`` epochs, and its validation accuracy."""
    data.setup()
    torch.manual_seed(0)
    model = CNN(list(data.input_shape), data.num_classes, channels=[32, 64], hidden=128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = data.x_train, data.y_train
    for _ in range(epochs):
        model.train()
        for j in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b) for b in x.split(512)])
        val = torch.cat([model(b) for b in data.x_val.split(512)]).argmax(1)
    return logits, float((val == data.y_val).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    settings = [("Fashion-MNIST (real), 10 classes", FashionMNISTDataModule(), [1, 2, 3, 5]),
                ("synthetic CIFAR-100 shapes, 100 classes",
                 SyntheticDataModule(input_shape=[3, 32, 32], num_classes=100, train_size=5000,
                                     test_size=500, val_size=500), [1, 5, 10, 20])]
    lines = [f"`python scripts/bench_topk.py --epochs {args.epochs}` on "
             f"{time.strftime('%Y-%m-%d')} (CPU {platform.machine()}, torch "
             f"{torch.__version__}): the main job's CNN teacher architecture trained "
             f"{args.epochs} epochs; errors over every training input, float32 (the cache's "
             "float16 rounding comes on top: < 1e-3 on a logit). Bytes per input: float16 "
             "values and fill, int16 class indices.", "",
             "| data (teacher val acc) | k | bytes / input (full) | mean KL T=1 | p99 KL T=1 | "
             "mean KL T=4 | p99 KL T=4 | max abs prob error T=4 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, data, ks in settings:
        logits, acc = teacher_logits(data, args.epochs)
        classes = logits.shape[1]
        for k in ks:
            row = [f"{label} ({100 * acc:.1f}%)", str(k), f"{k * 4 + 2} ({classes * 2})"]
            for t in (1.0, 4.0):
                kl = kl_error(logits, k, t)
                row += [f"{kl.mean():.2e}", f"{kl.quantile(0.99):.2e}"]
            q = torch.softmax(expand(*compress(logits, k), classes) / 4.0, 1)
            row.append(f"{(q - torch.softmax(logits / 4.0, 1)).abs().max():.3f}")
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    replace_section(args.out, "topk-error", text)


if __name__ == "__main__":
    main()
