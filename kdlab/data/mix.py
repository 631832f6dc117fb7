"""Mixup and CutMix of training batches, for "patient and consistent" teaching.

Beyer et al., "Knowledge distillation: A good teacher is patient and consistent" (CVPR 2022)
distill with *function matching*: teacher and student see the very same aggressively augmented
view of every image — mixup (Zhang et al., ICLR 2018, "mixup: Beyond Empirical Risk
Minimization") or CutMix (Yun et al., ICCV 2019, "CutMix: Regularization Strategy to Train
Strong Classifiers with Localizable Features") on top of crops and flips — and the student
matches the teacher's output on it, over a long schedule. kdlab mixes in
:meth:`~kdlab.data.memory.InMemoryDataModule.on_after_batch_transfer`, after the shift/flip
augmentation, so the training step's live teacher runs on exactly the student's input.

A mixed image has no single hard label. kdlab therefore allows mixing only with a
*soft-target-only* strategy — one whose cross-entropy weight is 0, such as
``distill=kd distill.kd.alpha=1.0`` — and hides the labels of mixed batches (targets ``-1``, as for
transfer-set images), so no loss term can read a label that is no longer the image's. This is
the paper's function matching (its students never see labels); a mixed cross-entropy
``λ·CE(y_a) + (1−λ)·CE(y_b)`` would reintroduce the labels the paper shows are unnecessary, and
would be ill-defined for transfer-set images without labels. Stages without a teacher cannot
use mixed images: the no-teacher baseline of a run trains on the unmixed batches (with the
run's shift/flip augmentation), and a student stage without a teacher fails naming
``data.mix``.

λ ~ Beta(α, α) is drawn once per batch and the partner of each image is a random permutation of
the batch, all from the global RNG (seeded by ``seed``, like the shift/flip augmentation), on
the batch's device.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)

MIXES = ("none", "mixup", "cutmix")


def check_mix(mix: str | None, alpha: float) -> tuple[str, float]:
    """``(mix, alpha)`` validated; a bad value fails naming ``data.mix`` or ``data.mix_alpha``."""
    mix = "none" if mix is None or mix is False else str(mix)
    if mix not in MIXES:
        raise KdlabError(f"data.mix={mix} must be one of {', '.join(MIXES)}")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise KdlabError(f"data.mix_alpha={alpha!r} must be a positive number") from None
    if not alpha > 0 or not math.isfinite(alpha):
        raise KdlabError(f"data.mix_alpha={alpha} must be a positive number (the Beta(α, α) "
                         "parameter of the mixing ratio)")
    return mix, alpha


def sample_lambda(alpha: float) -> float:
    """One mixing ratio ``λ ~ Beta(α, α)`` from the global (CPU) RNG."""
    a = torch.tensor([float(alpha)])
    return float(torch.distributions.Beta(a, a).sample())


def partner(n: int, device: torch.device) -> torch.Tensor:
    """A random permutation of the batch: image ``i`` is mixed with image ``perm[i]``."""
    return torch.randperm(n, device=device)


def mixup(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """``λ·x + (1−λ)·x[perm]`` (Zhang et al. 2018)."""
    return x.mul(lam).add_(x[perm], alpha=1.0 - lam)


def cutmix_box(lam: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A box ``(top, bottom, left, right)`` covering about ``1 − λ`` of the image: sides
    ``√(1−λ)`` of the image's, centred uniformly at random and clipped to the image (Yun et al.
    2019); drawn from the global RNG by :func:`cutmix_box_tensor`."""
    box = cutmix_box_tensor(torch.tensor(float(lam), dtype=torch.float64), height, width)
    top, bottom, left, right = (int(v) for v in box)
    return top, bottom, left, right


def cutmix_box_tensor(lam: torch.Tensor, height: int, width: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """CutMix boxes for every ratio in ``lam`` at once, drawn with ``generator`` (``None``: the
    global RNG): ``(..., 4)`` of ``top, bottom, left, right`` (int16)."""
    cut = (1.0 - lam).clamp_min(0.0).sqrt()
    cy = torch.randint(height, lam.shape, generator=generator)
    cx = torch.randint(width, lam.shape, generator=generator)
    half_h = (height * cut).floor().long() // 2
    half_w = (width * cut).floor().long() // 2
    box = torch.stack([(cy - half_h).clamp_min(0), (cy + half_h).clamp_max(height),
                       (cx - half_w).clamp_min(0), (cx + half_w).clamp_max(width)], dim=-1)
    return box.to(torch.int16)


def cutmix(x: torch.Tensor, box: tuple[int, int, int, int], perm: torch.Tensor) -> torch.Tensor:
    """``x`` with the ``box`` of every image replaced by the same box of ``x[perm]``."""
    top, bottom, left, right = box
    out = x.clone()
    out[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
    return out


def mix_batch(x: torch.Tensor, mix: str, alpha: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """``x`` mixed per ``mix`` (``mixup`` or ``cutmix``), and what was drawn: ``lam`` (for
    CutMix, the fraction of each image left unpasted), ``perm`` and, for CutMix, ``box``."""
    lam = sample_lambda(alpha)
    perm = partner(len(x), x.device)
    if mix == "mixup":
        return mixup(x, lam, perm), {"lam": lam, "perm": perm}
    if mix == "cutmix":
        h, w = x.shape[-2:]
        box = cutmix_box(lam, h, w)
        area = (box[1] - box[0]) * (box[3] - box[2])
        return cutmix(x, box, perm), {"lam": 1.0 - area / (h * w), "perm": perm, "box": box}
    raise KdlabError(f"data.mix={mix} must be one of {', '.join(MIXES)}")


def check_stage(data: Any, strategy: Any, stage: str) -> None:
    """Mixing needs a soft-target-only strategy (see the module docstring). The no-teacher
    ``baseline`` stage trains on unmixed batches (said in the log); any other stage whose
    strategy reads labels fails naming ``data.mix``."""
    mix = getattr(data, "mix", "none")
    if mix == "none":
        return
    if strategy is None or not strategy.needs_teacher:
        if stage == "baseline":
            log.info("[baseline] data.mix=%s is off for the baseline: a mixed image has no "
                     "hard label and there is no teacher to give soft targets", mix)
            data.mix = "none"
            return
        raise KdlabError(f"data.mix={mix} needs a teacher's soft targets (a mixed image has no "
                         "single hard label): use a soft-target-only strategy such as "
                         "distill=kd distill.kd.alpha=1.0, or data.mix=none")
    if strategy.ce_weight > 0:
        raise KdlabError(f"data.mix={mix} mixes images, so they have no single hard label, but "
                         f"the strategy weights a label cross-entropy by {strategy.ce_weight:g}: "
                         "use a soft-target-only strategy (ce_weight 0, e.g. distill=kd "
                         "distill.kd.alpha=1.0 — function matching), or data.mix=none")
