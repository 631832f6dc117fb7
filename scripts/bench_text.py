"""The main text job measured: the top-k teacher cache's memory and error, KD's gain over three
seeds, and tokens/s against a raw PyTorch loop. Writes three sections of docs/TEXT.md.

    python scripts/bench_text.py                       # all three parts (about 40 min, 2 cores)
    python scripts/bench_text.py --parts topk          # the cache table only
    python scripts/bench_text.py --parts gain --seeds 0 1 2
    python scripts/bench_text.py --parts speed --epochs 3 --batches 60

Every part uses ``experiment=text_kd`` (Python standard library source, byte tokens, context 64,
the first 2 MB; teacher gpt_micro, student gpt_nano) and one teacher store under ``--workdir``,
so the teacher is trained once (by kdlab, into the store) and shared.

* ``topk`` (section ``text-topk``): the stored teacher's next-byte distributions over the
  training windows (what a cache stores) against those of its top-k logits with the rest of
  the probability spread evenly (:mod:`kdlab.engine.topk`): per token, ``KL(p ‖ p̂)`` at
  T = 1 and T = 2 (mean and 99th percentile, nats) and ``‖p − p̂‖₁`` at T = 1, which is exactly
  the error of the KD gradient on the student's logits (the gradient of ``KL(p ‖ q)`` with
  respect to them is ``q − p``); and the bytes per token and the size of the cache for the
  job's training split and for the whole default corpus.
* ``gain`` (section ``text-gain``): ``kdlab-train -m experiment=text_kd seed=…`` — every run
  trains the KD student and the same student without the teacher (its ``baseline``); the
  table gives test bits per byte and next-byte accuracy, mean ± std over the seeds, and the
  paired gain (baseline minus KD student, same seed).
* ``speed`` (section ``text-speed``): tokens/s of kdlab's KD student (the job's config, teacher
  logits read from the top-k cache) against a raw PyTorch loop of the same models that runs the
  teacher live (``inference_mode``) and against a raw student-only loop. Paired as in
  scripts/bench_speed.py: after each kdlab training step the raw loop trains on as many
  batches in the same process, each timed on its own; a ratio is the median over the measured
  epochs (the first is a warm-up) of kdlab's rate over the raw rate of the same epoch.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from doc_section import replace_section  # noqa: E402

DOC = ROOT / "docs" / "TEXT.md"
KS = (1, 2, 4, 8, 16, 32, 64)


def compose(workdir: Path, overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kdlab.util.config import CONF_DIR

    base = ["experiment=text_kd", f"paths.teacher_store={workdir}/teachers",
            f"paths.output_dir={workdir}/run-{time.time_ns()}", f"paths.log_dir={workdir}/logs"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[*base, *overrides])


def teacher_and_data(workdir: Path) -> tuple[torch.nn.Module, Any, str | None]:
    """The job's stored teacher (trained into the store when missing), its datamodule and the
    path of its stored weights."""
    from kdlab.modes.build import build_datamodule
    from kdlab.modes.teacher import get_teacher

    cfg = compose(workdir, [])
    teacher, source = get_teacher(cfg, Path(cfg.paths.output_dir))
    print(f"teacher: {source.get('source')} {source.get('key', '')}", flush=True)
    data = build_datamodule(cfg, transfer=True)
    data.setup()
    return teacher, data, source.get("path")


# -- the top-k table ---------------------------------------------------------------------------
def topk_part(workdir: Path, windows: int) -> str:
    from kdlab.data.text import TextDataModule
    from kdlab.engine.cache import compute_outputs
    from kdlab.engine.topk import compress, expand

    teacher, data, _ = teacher_and_data(workdir)
    x = data.x_train[torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
                     [:windows]]
    logits, _ = compute_outputs(teacher, None, x)
    logits = logits.flatten(0, 1)  # one row per token
    vocab = logits.shape[1]
    train_tokens = data.x_train.numel()
    corpus = TextDataModule(context=data.context)  # the whole default corpus, no max_bytes
    corpus.setup()
    corpus_tokens = corpus.x_train.numel()
    rows = []
    probs = {t: torch.softmax(logits / t, 1) for t in (1.0, 2.0)}
    logp = {t: torch.log_softmax(logits / t, 1) for t in (1.0, 2.0)}
    for k in KS:
        expanded = expand(*compress(logits, k), vocab)
        kl = {}
        for t in (1.0, 2.0):
            q = torch.log_softmax(expanded / t, 1)
            kl[t] = (probs[t] * (logp[t] - q)).sum(1)
        l1 = (probs[1.0] - torch.softmax(expanded, 1)).abs().sum(1)
        mass = probs[1.0].topk(k, 1).values.sum(1)
        per_token = k * (2 + 2) + 2
        rows.append((k, per_token, train_tokens * per_token / 2**20,
                     corpus_tokens * per_token / 2**20, mass.mean().item(),
                     kl[1.0].mean().item(), kl[1.0].quantile(0.99).item(),
                     kl[2.0].mean().item(), l1.mean().item()))
    full16, full32 = 2 * vocab, 4 * vocab
    lines = [
        "## The per-token teacher cache: memory and error of top-k",
        "",
        f"Command: `python scripts/bench_text.py --parts topk` ({time.strftime('%Y-%m-%d')}, "
        f"torch {torch.__version__}, {platform.machine()}). Teacher: the job's gpt_micro from "
        f"the store; {len(logits):,} next-byte distributions ({windows:,} random training "
        f"windows of {data.context} tokens). The cache stores the k largest logits of every "
        "token (float16), their token ids (int16) and one float16 for the rest: "
        "`4k + 2` bytes per token, against "
        f"{full16} (float16) or {full32} (float32) for all {vocab} logits. Cache sizes are for "
        f"the job's training split ({train_tokens:,} tokens) and for the whole default corpus "
        f"({corpus_tokens:,} training tokens, `data.max_bytes=null`).",
        "",
        "| k | bytes/token | cache, text_kd | cache, whole corpus | top-k mass | KL(p‖p̂) T=1 "
        "mean | KL T=1 p99 | KL T=2 mean | ‖p − p̂‖₁ (KD gradient error) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| all ({vocab}, float16) | {full16} | {train_tokens * full16 / 2**20:,.0f} MB | "
        f"{corpus_tokens * full16 / 2**20:,.0f} MB | 1 | 0 | 0 | 0 | 0 |",
    ]
    for k, per_token, mb, corpus_mb, mass, kl1, kl1_99, kl2, l1 in rows:
        lines.append(f"| {k} | {per_token} | {mb:,.1f} MB | {corpus_mb:,.0f} MB | {mass:.4f} | "
                     f"{kl1:.2e} | {kl1_99:.2e} | {kl2:.2e} | {l1:.4f} |")
    lines += [
        "",
        "KL in nats per token. At T = 1 the top-k probabilities are the teacher's exactly and "
        "only the spread of the remainder differs; at T = 2 the spread remainder is an "
        "approximation too. ‖p − p̂‖₁ is the L1 norm of the change of the KD gradient on one "
        "token's logits (at most 2).",
    ]
    return "\n".join(lines)


# -- chunked soft-target KL: memory --------------------------------------------------------------
CHUNK_CHILD = """
import sys, time, torch
from kdlab.strategies import logits
from kdlab.strategies.logits import soft_target_kl
from kdlab.strategies.divergences import chunked_mean, generalized_jsd
rows, vocab, chunked, loss_name = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1",
                                   sys.argv[4])
if not chunked:
    logits.CHUNKED_ABOVE = 1 << 62  # in one piece at every size
torch.manual_seed(0)
s = torch.randn(rows, vocab, requires_grad=True)
t = torch.log_softmax(torch.randn(rows, vocab), 1)  # log-probabilities are logits too
inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
kept = []
def pack(x):
    if x.untyped_storage().data_ptr() not in inputs:
        kept.append(x.untyped_storage().nbytes())
    return x
start = time.perf_counter()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
    if loss_name == "kd":
        loss = soft_target_kl(s, t, 1.0, chunk_rows=(4 << 20) // vocab if chunked else None)
    else:  # GKD's generalised JSD, beta 0.5, through autograd (checkpointed chunks)
        loss = chunked_mean(lambda a, b: generalized_jsd(a, b, 0.5), s, t)
loss.backward()
seconds = time.perf_counter() - start
print(f"{sum(kept) / 2**20:.0f} {seconds:.3f} {loss.item():.6f}")
"""


def chunk_part(rows: int, vocabs: list[int]) -> str:
    """Peak memory added by one KD loss + backward on ``rows`` tokens, fused vs chunked, each
    in a fresh process (ru_maxrss)."""
    lines = [
        "## Chunked token losses: memory",
        "",
        f"Command: `python scripts/bench_text.py --parts chunk` ({time.strftime('%Y-%m-%d')}, "
        f"torch {torch.__version__}). One soft-target KL (KD's term) and its backward pass on "
        f"{rows:,} tokens (a batch of 64 windows of 64) for several vocabulary sizes, in a "
        "fresh process each: the memory the loss keeps for the backward pass beyond its two "
        "inputs (counted exactly, by `torch.autograd.graph.saved_tensors_hooks`), and the time "
        "of forward + backward. The fused form keeps `log p_s` and `p_t`, two more "
        "`[tokens, vocabulary]` tensors, until the backward pass; the chunked form "
        "(`kdlab/strategies/logits.py`, used automatically above 2^24 logits) keeps none and "
        "holds one 4M-element chunk's softmax at a time. The other divergences (`gkd` here; "
        "`reverse_kl`, `skew_kl`, `uld` alike) run through autograd: in one piece it keeps "
        "every `[tokens, vocabulary]` intermediate of the formula; chunked, each chunk runs "
        "under activation checkpointing and only the inputs are kept. Losses agree to float "
        "rounding.",
        "",
        "| loss | vocabulary | logits (float32) | one piece: kept for backward | chunked: kept "
        "| one piece s | chunked s |",
        "|---|---|---|---|---|---|---|",
    ]
    for loss, vocab in [("kd", v) for v in vocabs] + [("gkd", vocabs[-1])]:
        out = {}
        for chunked in (False, True):
            proc = subprocess.run([sys.executable, "-c", CHUNK_CHILD, str(rows), str(vocab),
                                   "1" if chunked else "0", loss], capture_output=True,
                                  text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-2000:])
            out[chunked] = proc.stdout.split()
        if abs(float(out[False][2]) - float(out[True][2])) > 1e-3 * abs(float(out[False][2])):
            sys.exit(f"chunked and fused losses differ at vocabulary {vocab}: {out}")
        size = rows * vocab * 4 / 2**20
        lines.append(f"| {loss} | {vocab:,} | {size:,.0f} MB | {out[False][0]} MB | "
                     f"{out[True][0]} MB | {out[False][1]} | {out[True][1]} |")
    return "\n".join(lines)


# -- the gain over seeds -----------------------------------------------------------------------
def gain_part(workdir: Path, seeds: list[int], extra: list[str]) -> str:
    folder = workdir / "gain"
    done = sorted(folder.glob("*/results.json"))
    if len(done) < len(seeds):
        command = ["kdlab-train", "-m", "experiment=text_kd",
                   f"seed={','.join(map(str, seeds))}", f"paths.teacher_store={workdir}/teachers",
                   "trainer.enable_progress_bar=false", f"hydra.sweep.dir={folder}", *extra]
        print("+", " ".join(command), flush=True)
        start = time.perf_counter()
        if subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL).returncode != 0:
            sys.exit(f"failed: {' '.join(command)}")
        (folder / "wall_s.txt").write_text(f"{time.perf_counter() - start:.0f}\n")
        done = sorted(folder.glob("*/results.json"))
    results = [json.loads(p.read_text()) for p in done]
    wall = (folder / "wall_s.txt").read_text().strip() if (folder / "wall_s.txt").exists() \
        else "?"

    def stats(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
        mean = statistics.fmean(values) * scale
        std = statistics.stdev(values) * scale if len(values) > 1 else float("nan")
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    def metric(role: str, key: str) -> list[float]:
        return [r[role]["metrics"][key] for r in results]

    def bpb(role: str) -> list[float]:
        m = [r[role]["metrics"] for r in results]
        return [x.get("test/bits_per_byte", x["test/bits_per_token"]) for x in m]

    teacher = results[0]["teacher"]
    sources = {(r["teacher"].get("source") or {}).get("source") for r in results}
    stored = ("the teacher read from the store, where an earlier part trained it"
              if sources == {"store"} else "the first run trains the teacher into the store")
    teacher_bpb = teacher["metrics"].get("test/bits_per_byte",
                                         teacher["metrics"]["test/bits_per_token"])
    kd, base = bpb("student"), bpb("baseline")
    gains = [b - s for s, b in zip(kd, base)]
    every = "positive in every seed" if all(g > 0 for g in gains) else \
        "not positive in every seed"
    seeds_text = " ".join(str(r["config"]["seed"]) for r in results)
    tokens_s = [r["student"].get("train_tokens_per_s", {}).get("median") for r in results]
    lines = [
        "## KD's gain on the main text job, over seeds",
        "",
        f"Command: `python scripts/bench_text.py --parts gain` = `kdlab-train -m "
        f"experiment=text_kd seed={','.join(map(str, seeds))}` ({time.strftime('%Y-%m-%d')}, "
        f"2 CPU cores, {wall} s wall for the sweep; {stored}). "
        "Test split, best-validation checkpoint of each run; ± is the sample std over the "
        f"seeds ({seeds_text}).",
        "",
        "| network | params | test bits per byte | next-byte accuracy % | KL(teacher ‖ ·) "
        "nats/token |",
        "|---|---|---|---|---|",
        f"| teacher {teacher['model']} | {teacher['params']:,} | "
        f"{teacher_bpb:.3f} | "
        f"{100 * teacher['metrics']['test/acc']:.2f} | 0 |",
        f"| KD student {results[0]['student']['model']} | {results[0]['student']['params']:,} | "
        f"{stats(kd)} | {stats(metric('student', 'test/acc'), 100, 2)} | "
        f"{stats(metric('student', 'test/teacher_kl'))} |",
        f"| baseline {results[0]['baseline']['model']} (no teacher, same steps) | "
        f"{results[0]['baseline']['params']:,} | {stats(base)} | "
        f"{stats(metric('baseline', 'test/acc'), 100, 2)} | — |",
        "",
        f"**KD gain: {stats(gains)} bits per byte** (baseline minus KD student, paired by seed; "
        f"per seed: {', '.join(f'{g:+.3f}' for g in gains)}), "
        f"{every}."
        f" The KD student trained at a median of "
        f"{statistics.median([t for t in tokens_s if t]):,.0f} tokens/s.",
    ]
    return "\n".join(lines)


# -- tokens/s against raw PyTorch --------------------------------------------------------------
#: per epoch of the kdlab run: (kdlab tokens/s, raw KD tokens/s, raw student-only tokens/s)
PAIRED: list[tuple[float, float, float]] = []
#: the stored teacher, for the raw KD loop
TEACHER: list[torch.nn.Module] = []


class RawLoop:
    """The loop a user writes: shuffled windows, AdamW, the teacher (if any) in eval mode
    under ``inference_mode``, KD as ``alpha·KL(p_T ‖ q_T)·T² + (1 − alpha)·CE`` per token."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, student: torch.nn.Module,
                 teacher: torch.nn.Module | None, batch: int, lr: float, alpha: float,
                 temperature: float) -> None:
        self.x, self.y, self.student, self.teacher = x, y, student, teacher
        self.batch, self.alpha, self.t = batch, alpha, temperature
        self.opt = torch.optim.AdamW(student.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(0)
        self.perm, self.pos = torch.empty(0, dtype=torch.long), 0

    def steps(self, n: int) -> int:
        tokens = 0
        for _ in range(n):
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.x), generator=self.generator), 0
            idx = self.perm[self.pos : self.pos + self.batch]
            self.pos += self.batch
            xb, yb = self.x[idx], self.y[idx].flatten()
            out = self.student(xb).flatten(0, 1)
            ce = F.cross_entropy(out, yb)
            if self.teacher is None:
                loss = ce
            else:
                with torch.inference_mode():
                    t = self.teacher(xb).flatten(0, 1)
                soft = F.kl_div(F.log_softmax(out / self.t, 1), F.log_softmax(t / self.t, 1),
                                reduction="batchmean", log_target=True)
                loss = self.alpha * self.t * self.t * soft + (1 - self.alpha) * ce
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            tokens += xb.numel()
        return tokens


def paired_raw(lr: float, alpha: float, temperature: float) -> Any:
    """A callback that trains a raw KD loop and a raw student-only loop on as many batches as
    each kdlab training step, timing each on its own (the module docstring)."""
    import lightning as L

    class PairedRaw(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
            data = getattr(trainer.datamodule, "data", trainer.datamodule)  # kdlab's chunking
            x, y = data.x_train.cpu(), data.y_train.cpu()
            batch = data.batch_size
            teacher = copy.deepcopy(TEACHER[0]).eval()  # kdlab's module holds no teacher
            # when it reads the cache
            self.kd = RawLoop(x, y, copy.deepcopy(module.student), teacher, batch, lr, alpha,
                              temperature)
            self.alone = RawLoop(x, y, copy.deepcopy(module.student), None, batch, lr, alpha,
                                 temperature)

        def on_train_epoch_start(self, trainer: L.Trainer, module: Any) -> None:
            self.seconds, self.tokens = [0.0, 0.0, 0.0], [0, 0, 0]
            self.mark = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            now = time.perf_counter()
            self.seconds[0] += now - self.mark
            batches = batch if isinstance(batch, list) else [batch]
            self.tokens[0] += sum(b[0].numel() for b in batches)
            for i, loop in ((1, self.kd), (2, self.alone)):
                start = time.perf_counter()
                self.tokens[i] += loop.steps(len(batches))
                self.seconds[i] += time.perf_counter() - start
            self.mark = time.perf_counter()

        def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
            PAIRED.append(tuple(t / s for t, s in zip(self.tokens, self.seconds)))

    return PairedRaw()


def speed_part(workdir: Path, epochs: int, batches: int, threads: int, topk: int) -> str:
    import bench_text  # the module Hydra imports the callback from

    from kdlab.train import run

    torch.set_num_threads(threads)
    # the stored teacher (trained first if missing), where Hydra's callback will read it
    teacher, _, path = teacher_and_data(workdir)
    bench_text.TEACHER[:] = [teacher]
    cfg = compose(workdir, [
        f"teacher.ckpt={path}",  # that teacher, whatever the trainer limits below
        "baseline=false", f"trainer.max_epochs={epochs}",
        f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "latency.repeats=1", "teacher_cache.enabled=true",
        f"teacher_cache.topk={topk}", "scheduler=none",
        "+callbacks.paired._target_=bench_text.paired_raw", "+callbacks.paired.lr=3e-3",
        "+callbacks.paired.alpha=0.5", "+callbacks.paired.temperature=1.0"])
    lr = float(cfg.optimizer.lr)
    cfg.callbacks.paired.lr = lr
    run(cfg)
    measured = bench_text.PAIRED[1:] or bench_text.PAIRED
    kdlab, raw_kd, raw_alone = (statistics.median(r[i] for r in measured) for i in range(3))
    vs_kd = statistics.median(r[0] / r[1] for r in measured)
    vs_alone = statistics.median(r[0] / r[2] for r in measured)
    return "\n".join([
        "## Tokens/s against a raw PyTorch loop",
        "",
        f"Command: `python scripts/bench_text.py --parts speed --epochs {epochs} --batches "
        f"{batches} --threads {threads}` ({time.strftime('%Y-%m-%d')}, torch "
        f"{torch.__version__}, {threads} CPU threads, {platform.machine()}). The job's models "
        f"and data (gpt_micro → gpt_nano, batches of {cfg.data.batch_size} windows × "
        f"{cfg.data.context} tokens, AdamW lr {lr:g}, KD T = 1, α = 0.5); kdlab reads the "
        f"teacher's logits from its top-{topk} cache (`teacher_cache.topk={topk}`, built "
        "before training, not timed here); the raw loops run in the same process, paired batch "
        f"for batch; {len(measured)} measured epochs of {batches} batches (the first epoch, a "
        "warm-up, left out).",
        "",
        "| loop | tokens/s (median) | kdlab ÷ this (paired median) |",
        "|---|---|---|",
        f"| kdlab KD, top-{topk} cache | {kdlab:,.0f} | 1 |",
        f"| raw PyTorch KD, teacher live | {raw_kd:,.0f} | **{vs_kd:.2f}×** |",
        f"| raw PyTorch, student only (no teacher) | {raw_alone:,.0f} | {vs_alone:.2f}× |",
        "",
        "The goal is kdlab ≥ 1.0× the raw KD loop. The student-only loop is the ceiling of any "
        "cached distillation (the teacher costs nothing there); kdlab's loop adds Lightning's "
        "hooks, logging and the cache lookup and expansion of the top-k logits.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["topk", "gain", "speed", "chunk"],
                        choices=["topk", "gain", "speed", "chunk"])
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_text")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--windows", type=int, default=2000,
                        help="training windows whose distributions the top-k table measures")
    parser.add_argument("--epochs", type=int, default=3, help="speed: epochs (first a warm-up)")
    parser.add_argument("--batches", type=int, default=60, help="speed: batches per epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--topk", type=int, default=64, help="speed: the cache's k (the job's)")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("override", nargs="*", help="extra overrides for the gain sweep")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        if part == "topk":
            body = topk_part(args.workdir, args.windows)
        elif part == "chunk":
            body = chunk_part(4096, [256, 8192, 32000, 50257])
        elif part == "gain":
            body = gain_part(args.workdir, args.seeds, args.override)
        else:
            body = speed_part(args.workdir, args.epochs, args.batches, args.threads, args.topk)
        replace_section(args.doc, f"text-{part}", body)
        print(body, flush=True)


if __name__ == "__main__":
    main()
