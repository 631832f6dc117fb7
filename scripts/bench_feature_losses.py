"""AB's, OFD's and VID's losses, fused or reduced by hand, KD-SVD's decomposition and CRD's
sampling of negatives, against the code kdlab used before.

    python scripts/bench_feature_losses.py                          # prints the table
    python scripts/bench_feature_losses.py --doc docs/BENCHMARKS.md

AB and OFD compare pre-ReLU maps at full resolution, so on a small pair their loss, not the
networks, dominates a training step. kdlab computes both as ``Σ d²`` of a residual ``d`` with
a hand-written gradient ``2 d`` (:func:`kdlab.strategies.hints.piecewise_square_sum`); the
reference is the element formula differentiated by autograd, the code kdlab used before
(:func:`kdlab.strategies.hints.ab_elementwise`; OFD's ``(s − t)² · keep``). VID's Gaussian
NLL ``½ (log σ_c² + (t − μ(s))² / σ_c²)`` is averaged per channel first (square and reduce the
map once, then divide C numbers by their variances); its reference divides and adds at every
element, kdlab's code before. KD-SVD's top singular vectors come from the eigen-decomposition
of each map's smaller Gram matrix in float64 (:func:`kdlab.strategies.flow.left_singular`); its
reference is the same loss with ``torch.linalg.svd`` of the maps in float32, kdlab's code before
(the same backward, :class:`kdlab.strategies.flow._TopSingular`). CRD (16,384 negatives from
a bank of 55,000 rows, 10 balanced classes) redraws only the negatives that share the anchor's
class (:meth:`kdlab.strategies.contrastive.CRD.sample_negatives`); its reference redraws every
entry each round, kdlab's code before. The two draw different negatives from the same
distribution, so their losses agree to about 1e-3, not to rounding.

The main job's pair and batch: the 27k-parameter CNN student (channels 8, 16) and the 422k
CNN teacher (32, 64) on 28×28 inputs, batch 128; AB and OFD read both pre-ReLU maps of
each network (``preact``: 128×8×28×28 → connector → 128×32×28×28, and 128×16×14×14 →
128×64×14×14), VID both stage outputs (``stages``: the maps after ReLU and pooling, regressed
to the teacher's channels by three 1×1 convolutions), KD-SVD the same stage outputs (the
student's widened by 1×1 connectors: matrices 128×32×196 and 128×64×49), CRD both
embeddings (32 and 128 features, projected to 128). Two parts are
timed, each in one process with the two versions interleaved iteration by iteration (this
machine's speed drifts within seconds, so only paired ratios mean anything):

- ``loss``: the strategy's forward from the networks' maps (connectors included, in training
  mode; OFD's margin update included) and its backward, the maps held fixed;
- ``step``: a whole training step: the teacher's forward (no gradient), the student's forward
  with its taps, the loss, the backward and an AdamW step.

A ratio is the median over iterations of reference time / fused time of the same iteration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_record import _cpu  # noqa: E402
from doc_section import replace_section  # noqa: E402

from kdlab.engine.taps import Taps  # noqa: E402
from kdlab.models import CNN  # noqa: E402
from kdlab.strategies import flow  # noqa: E402
from kdlab.strategies.base import Batch, Outputs  # noqa: E402
from kdlab.strategies.contrastive import CRD, REDRAW_ROUNDS  # noqa: E402
from kdlab.strategies.flow import KDSVD  # noqa: E402
from kdlab.strategies.hints import AB, OFD, VID, ab_elementwise  # noqa: E402

BATCH_SIZE = 128
NUM_TRAIN = 55_000
NUM_CLASSES = 10
#: how closely the two versions' losses must agree (CRD's draw different negatives)
AGREE_RTOL = {"crd": 1e-2}


def reference_ab(ab: AB, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
    """AB's ``mean`` loss, the element formula through autograd (kdlab's code before)."""
    total = 0.0
    for connector, (s, t) in zip(ab.connectors, ab.paired_maps(student, teacher)):
        total = total + ab_elementwise(connector(s), t, ab.margin).mean()
    return ab.beta * total


def reference_ofd(ofd: OFD, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
    """OFD's loss, the partial L2 through autograd (kdlab's code before)."""
    pairs = ofd.paired_maps(student, teacher)
    if ofd.training:
        ofd.update_margins([t for _, t in pairs])
    total = 0.0
    for i, (connector, margin, (s, t)) in enumerate(zip(ofd.connectors, ofd.margins(), pairs)):
        s = connector(s)
        target = torch.maximum(t, margin.to(t.dtype).view(1, -1, 1, 1))
        keep = (s > target) | (target > 0)
        total = total + ((s - target).pow(2) * keep).sum() / s.shape[0] / 2 ** (len(pairs) - 1 - i)
    return ofd.beta * total


def reference_vid(vid: VID, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
    """VID's loss, the Gaussian NLL at every element through autograd (kdlab's code before)."""
    total = 0.0
    for mu, var, (s, t) in zip(vid.regressors, vid.variances(), vid.paired_maps(student, teacher)):
        var = var.view(1, -1, 1, 1)
        total = total + (0.5 * (torch.log(var) + (t - mu(s)).pow(2) / var)).mean()
    return vid.beta * total


def svd_left_singular(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin left singular vectors and values by ``torch.linalg.svd`` (kdlab's code before)."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u, s


def reference_kdsvd(kdsvd: KDSVD, student: Outputs, teacher: Outputs,
                    batch: Batch) -> torch.Tensor:
    """KD-SVD's loss with the decomposition by ``torch.linalg.svd``."""
    with mock.patch.object(flow, "left_singular", svd_left_singular):
        return kdsvd(student, teacher, batch)["kdsvd"]


def redraw_every_entry(crd: CRD, index: torch.Tensor,
                       targets: torch.Tensor | None = None) -> torch.Tensor:
    """CRD's negatives of other classes, every entry redrawn each round (kdlab's code before)."""
    draws = crd._uniform_others(index, crd.negatives)
    own = targets.long()[:, None]
    for _ in range(REDRAW_ROUNDS):
        clash = (crd.labels[draws] == own) & (own >= 0)
        if not bool(clash.any()):
            break
        draws = torch.where(clash, crd._uniform_others(index, crd.negatives), draws)
    return draws


def reference_crd(crd: CRD, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
    """CRD's loss with the negatives of :func:`redraw_every_entry`."""
    with mock.patch.object(CRD, "sample_negatives", redraw_every_entry):
        return crd(student, teacher, batch)["crd"]


#: name (the strategy's loss key) -> (label in the table, class, reference loss)
STRATEGIES = {"ab": ("AB", AB, reference_ab), "ofd": ("OFD", OFD, reference_ofd),
              "vid": ("VID", VID, reference_vid), "kdsvd": ("KD-SVD", KDSVD, reference_kdsvd),
              "crd": ("CRD", CRD, reference_crd)}


def build(name: str) -> tuple[nn.Module, nn.Module, nn.Module, Taps, Taps, Callable, Callable]:
    """The main job's student and teacher, the strategy set up on a probe batch, the taps,
    and its two loss versions ``(student outputs, teacher outputs) -> loss``."""
    torch.manual_seed(0)
    student = CNN((1, 28, 28), 10, channels=(8, 16), hidden=32, dropout=0.0)
    teacher = CNN((1, 28, 28), 10, channels=(32, 64), hidden=128, dropout=0.25).eval()
    _, make, reference_fn = STRATEGIES[name]
    strategy = make()
    s_paths, t_paths = strategy.resolve(student, teacher)
    s_taps, t_taps = Taps(student, s_paths), Taps(teacher, t_paths)
    x = torch.randn(BATCH_SIZE, 1, 28, 28)
    s_out, t_out = forward(student, s_taps, x), forward(teacher, t_taps, x, grad=False)
    strategy.setup(s_out, t_out, NUM_TRAIN)
    index = torch.arange(BATCH_SIZE)
    batch = Batch(x, index % NUM_CLASSES, index)
    if isinstance(strategy, CRD):  # every row's label known, as after the first epoch
        strategy.labels.copy_(torch.arange(NUM_TRAIN) % NUM_CLASSES)

    def fused(s: Outputs, t: Outputs) -> torch.Tensor:
        return strategy(s, t, batch)[name]

    def reference(s: Outputs, t: Outputs) -> torch.Tensor:
        return reference_fn(strategy, s, t, batch)

    return student, teacher, strategy, s_taps, t_taps, fused, reference


def forward(model: nn.Module, taps: Taps, x: torch.Tensor, grad: bool = True) -> Outputs:
    with torch.set_grad_enabled(grad):
        logits = model(x)
    return Outputs(logits, taps.pop())


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, iters: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per iteration of each part and version, interleaved."""
    student, teacher, strategy, s_taps, t_taps, fused, reference = build(name)
    params = list(student.parameters()) + list(strategy.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    x = torch.randn(BATCH_SIZE, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    s_fixed, t_fixed = forward(student, s_taps, x), forward(teacher, t_taps, x, grad=False)
    s_fixed = Outputs(s_fixed.logits.detach(),
                      {k: v.detach().requires_grad_() for k, v in s_fixed.features.items()})
    versions = {"reference": reference, "fused": fused}
    out = {part: {v: [] for v in versions} for part in ("loss", "step")}
    strategy.eval()  # the two versions agree (OFD's margins held) before anything is timed
    state = {k: v.clone() for k, v in strategy.state_dict().items()}
    with torch.no_grad():  # from the same state: CRD's forward moves its banks
        a = reference(s_fixed, t_fixed).item()
        strategy.load_state_dict(state)
        b = fused(s_fixed, t_fixed).item()
    if abs(a - b) > AGREE_RTOL.get(name, 1e-4) * abs(a):
        raise SystemExit(f"{name}: the versions disagree ({a} vs {b})")
    strategy.train()  # as in training: the connectors' BatchNorm on batch statistics

    def loss_part(loss_fn: Callable) -> None:
        loss_fn(s_fixed, t_fixed).backward()

    def step_part(loss_fn: Callable) -> None:
        t_out = forward(teacher, t_taps, x, grad=False)
        s_out = forward(student, s_taps, x)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(s_out, t_out).backward()
        optimizer.step()

    for i in range(iters + 2):  # the first two are a warm-up
        for version, loss_fn in versions.items():
            for part, fn in (("loss", loss_part), ("step", step_part)):
                seconds = timed(lambda fn=fn, loss_fn=loss_fn: fn(loss_fn))
                if i >= 2:
                    out[part][version].append(seconds)
    return out


def table(results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    rows = ["| strategy | part | kdlab's code before (ms, median) | "
            "kdlab now (ms, median) | speed-up (median of paired ratios) |",
            "|---|---|---|---|---|"]
    for name, parts in results.items():
        for part, versions in parts.items():
            ref, fus = versions["reference"], versions["fused"]
            ratio = statistics.median(r / f for r, f in zip(ref, fus))
            what = {"loss": "loss forward + backward",
                    "step": "whole training step"}[part]
            rows.append(f"| {STRATEGIES[name][0]} | {what} | {1e3 * statistics.median(ref):.1f} | "
                        f"{1e3 * statistics.median(fus):.1f} | {ratio:.2f}× |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per version")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--doc", type=Path, help="rewrite this doc's `feature-losses` section")
    parser.add_argument("--strategies", nargs="*", choices=list(STRATEGIES),
                        default=list(STRATEGIES), help="measure only these (not with --doc)")
    args = parser.parse_args()
    if args.doc and set(args.strategies) != set(STRATEGIES):
        parser.error("--doc rewrites the whole table: measure every strategy")
    torch.set_num_threads(args.threads)
    results = {name: measure(name, args.iters) for name in args.strategies}
    command = "python scripts/bench_feature_losses.py" + (
        f" --iters {args.iters}" if args.iters != 30 else "") + (
        f" --threads {args.threads}" if args.threads != 2 else "")
    body = (f"`{command}` on {dt.date.today().isoformat()}: CPU ({_cpu()}), "
            f"{args.threads} threads, torch "
            f"{torch.__version__}; {args.iters} timed iterations per version after 2 of "
            f"warm-up, batch {BATCH_SIZE}, fp32.\n\n{table(results)}")
    print(body)
    if args.doc:
        replace_section(args.doc, "feature-losses", body)


if __name__ == "__main__":
    main()
