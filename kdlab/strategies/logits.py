"""Strategies that match the teacher's output distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.data.memory import UNLABELLED
from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_number
from kdlab.util.errors import KdlabError


class _SoftTargetKL(torch.autograd.Function):
    """``scale · KL(p_t ‖ softmax(s / T))`` averaged over the batch, from the student's logits
    ``s`` and the teacher's log-probabilities; constant teacher targets (no gradient to them).

    Fused by hand: the forward pass saves ``log p_s`` and ``p_t`` and the backward pass is the
    closed form ``∂/∂s = scale / (T · B) · (p_s − p_t)``, a few tensor operations instead of
    autograd's graph through division, two log-softmaxes and ``kl_div``.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_log_probs, temperature, scale):  # noqa: ANN001
        batch = student_logits.shape[0]
        log_ps = torch.log_softmax(student_logits / temperature, dim=1)
        p_t = teacher_log_probs.exp()
        ctx.save_for_backward(log_ps, p_t)
        ctx.factor = scale / (temperature * batch)
        return torch.sum(p_t * (teacher_log_probs - log_ps)) * (scale / batch)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        log_ps, p_t = ctx.saved_tensors
        return (log_ps.exp() - p_t) * (grad * ctx.factor), None, None, None


class _ChunkedSoftTargetKL(torch.autograd.Function):
    """:class:`_SoftTargetKL` computed ``rows`` rows at a time, for a language model's
    ``tokens × vocabulary`` logits: it saves only its two inputs (tensors that exist anyway),
    and both passes hold one chunk's softmax at a time, so no full ``[rows, V]`` softmax sits
    beside the logits (the fused form keeps two: ``log p_s`` and ``p_t``). The same sums,
    chunk by chunk (equal to float rounding)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_log_probs, temperature, scale, rows):  # noqa: ANN001
        batch = student_logits.shape[0]
        total = student_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, batch, rows):
            s, lt = student_logits[start : start + rows], teacher_log_probs[start : start + rows]
            total += torch.sum(lt.exp() * (lt - torch.log_softmax(s / temperature, dim=1)))
        ctx.save_for_backward(student_logits, teacher_log_probs)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.factor = scale / (temperature * batch)
        return total * (scale / batch)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        student_logits, teacher_log_probs = ctx.saved_tensors
        out = torch.empty_like(student_logits)
        factor, rows = grad * ctx.factor, ctx.rows
        for start in range(0, len(out), rows):
            s, lt = student_logits[start : start + rows], teacher_log_probs[start : start + rows]
            out[start : start + rows] = (torch.softmax(s / ctx.temperature, dim=1) - lt.exp()) \
                * factor
        return out, None, None, None, None


#: logits of more elements than this (rows × classes: a language model's tokens × vocabulary)
#: go through :class:`_ChunkedSoftTargetKL`, in chunks of about :data:`CHUNK_ELEMENTS`
CHUNKED_ABOVE = 2**24  # 64 MB of float32
CHUNK_ELEMENTS = 2**22


def soft_target_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                   temperature: float, scale: float = 1.0,
                   chunk_rows: int | None = None) -> torch.Tensor:
    """``scale · KL(p_teacher ‖ softmax(student_logits / T))``, batch mean, where
    ``teacher_log_probs = log_softmax(teacher_logits / T)``. Uses the fused closed-form
    gradient unless the teacher side needs a gradient too (then plain autograd); logits of more
    than :data:`CHUNKED_ABOVE` elements (or any, with ``chunk_rows``) are processed in chunks
    of rows (:class:`_ChunkedSoftTargetKL`)."""
    if teacher_log_probs.requires_grad and torch.is_grad_enabled():
        log_ps = F.log_softmax(student_logits / temperature, dim=1)
        kl = F.kl_div(log_ps, teacher_log_probs, reduction="batchmean", log_target=True)
        return kl * scale
    if chunk_rows is None and student_logits.numel() > CHUNKED_ABOVE:
        chunk_rows = max(1, CHUNK_ELEMENTS // student_logits.shape[1])
    if chunk_rows is not None:
        return _ChunkedSoftTargetKL.apply(student_logits, teacher_log_probs, float(temperature),
                                          float(scale), int(chunk_rows))
    return _SoftTargetKL.apply(student_logits, teacher_log_probs, float(temperature),
                               float(scale))


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    temperature: float | torch.Tensor,
) -> torch.Tensor:
    """Hinton's soft-target loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean.

    The ``T²`` factor keeps the gradient magnitude of the soft term roughly independent of the
    temperature (Hinton et al. 2015, §2). A float ``T`` uses the fused closed-form gradient
    (:func:`soft_target_kl`); a tensor ``T`` (a learned temperature, e.g. CTKD's) goes through
    plain autograd, so the temperature receives its gradient through both softmaxes and ``T²``.
    """
    if isinstance(temperature, torch.Tensor):
        log_ps = F.log_softmax(student_logits / temperature, dim=1)
        log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
        kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
        return kl * temperature * temperature
    teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return soft_target_kl(student_logits, teacher, temperature, temperature**2)


class KD(Strategy):
    """Knowledge distillation with soft targets — Hinton, Vinyals & Dean, "Distilling the
    Knowledge in a Neural Network", NIPS Deep Learning Workshop 2015 (arXiv:1503.02531).

    ``loss = alpha · T² · KL(p_teacher^T ‖ p_student^T) + (1 - alpha) · CE(student, labels)``

    ``alpha`` weights the soft (teacher) term; ``1 - alpha`` weights the hard-label
    cross-entropy, which is computed on the labelled samples of the batch only. The soft term
    covers every sample, labelled or not, so unlabelled transfer-set images are learned from
    the teacher alone.

    Config (``conf/distill/kd.yaml``)::

        _target_: kdlab.strategies.KD
        temperature: 4.0
        alpha: 0.9

    Args:
        temperature: softmax temperature ``T > 0`` for both teacher and student.
        alpha: weight of the soft term, in ``[0, 1]``.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        if not temperature > 0:
            raise KdlabError(f"distill.temperature={temperature} must be > 0")
        if not 0.0 <= alpha <= 1.0:
            raise KdlabError(f"distill.alpha={alpha} must be in [0, 1]")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.ce_weight = 1.0 - self.alpha

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        t = self.temperature
        return {"kd": soft_target_kl(student.logits, teacher.log_probs(t), t,
                                     self.alpha * t * t)}


class DKD(Strategy):
    """Decoupled knowledge distillation — Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge
    Distillation", CVPR 2022 (arXiv:2203.08679).

    KD's KL splits into a target-class term (TCKD: KL between the binary distributions
    ``[p_target, 1 - p_target]``) and a non-target term (NCKD: KL between the distributions
    renormalised over the non-target classes); DKD weights them independently:

    ``loss = w(e) · T² · (alpha · KL(b^T ‖ b^S) + beta · KL(p̂^T ‖ p̂^S))``,
    ``w(e) = min((e + 1) / warmup, 1)``

    Reads logits only. The warm-up factor ``w`` ramps linearly over the first ``warmup``
    epochs; ``e`` is the 0-based :attr:`epoch`, so the first epoch has ``1 / warmup`` (the
    official code's ``min(epoch / warmup, 1)`` with 1-based epochs); ``warmup: 0`` disables it.
    The target class is the label; for unlabelled transfer-set samples (target ``-1``) it is
    the teacher's argmax. Returns the terms ``tckd`` and ``nckd``.

    Config (``conf/distill/dkd.yaml``; the paper's CIFAR-100 setting)::

        _target_: kdlab.strategies.logits.DKD
        alpha: 1.0
        beta: 8.0
        temperature: 4.0
        warmup: 20
        ce_weight: 1.0

    Args:
        alpha: weight of TCKD, ``>= 0``.
        beta: weight of NCKD, ``>= 0`` (the paper uses 8 on CIFAR-100, 0.5 on ImageNet).
        temperature: softmax temperature ``T > 0``.
        warmup: epochs of the linear warm-up of both terms, ``>= 0``.
        ce_weight: weight of the cross-entropy on the labels, ``>= 0``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: int = 20, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, ">= 0")
        self.beta = check_number("beta", beta, ">= 0")
        self.temperature = check_number("temperature", temperature, "> 0")
        if isinstance(warmup, bool) or int(warmup) != warmup or warmup < 0:
            raise KdlabError(f"distill.warmup={warmup} must be an integer >= 0 (epochs)")
        self.warmup = int(warmup)
        self.ce_weight = check_number("ce_weight", ce_weight, ">= 0")

    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup, 1)``, or 1 without warm-up."""
        return 1.0 if self.warmup == 0 else min((self.epoch + 1) / self.warmup, 1.0)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        tckd, nckd = dkd_kl(student.logits, teacher.logits.detach(), batch.targets,
                            self.temperature)
        scale = self.warmup_factor() * self.temperature**2
        return {"tckd": scale * self.alpha * tckd, "nckd": scale * self.beta * nckd}


def dkd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
           temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's two divergences at temperature ``T``, batch means, *without* ``T²`` or weights:
    TCKD ``KL(b^T ‖ b^S)`` between the binary ``[p_target, 1 − p_target]`` distributions and
    NCKD ``KL(p̂^T ‖ p̂^S)`` between the distributions renormalised over the non-target
    classes. The target is the label, or the teacher's argmax where the label is ``-1``
    (unlabelled). ``T`` may be a float or a tensor (a learned temperature, plain autograd)."""
    s, t = student_logits, teacher_logits
    num, classes = s.shape
    if classes < 2:
        raise KdlabError(f"distill=dkd needs at least 2 classes, got {classes}")
    target = torch.where(targets != UNLABELLED, targets, t.argmax(dim=1))
    is_target = F.one_hot(target, classes).bool()
    log_s = F.log_softmax(s / temperature, dim=1)
    log_t = F.log_softmax(t / temperature, dim=1)

    def binary(log_p: torch.Tensor) -> torch.Tensor:
        """``log [p_target, 1 - p_target]``, with ``1 - p_target`` summed in log space."""
        rest = log_p.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
        return torch.stack([log_p[is_target], rest], dim=1)

    def non_target(logits: torch.Tensor) -> torch.Tensor:
        """log-softmax over the non-target classes only, ``[N, C - 1]``."""
        kept = logits[~is_target].view(num, classes - 1)
        return F.log_softmax(kept / temperature, dim=1)

    tckd = F.kl_div(binary(log_s), binary(log_t), reduction="batchmean", log_target=True)
    nckd = F.kl_div(non_target(s), non_target(t), reduction="batchmean", log_target=True)
    return tckd, nckd


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation between the rows of ``a`` and ``b``, one value per row."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(Strategy):
    """Distillation from a stronger teacher — Huang, You, Wang, Qian & Xu, "Knowledge
    Distillation from A Stronger Teacher", NeurIPS 2022 (arXiv:2205.10536).

    Matches relations instead of exact probabilities: with ``Y = softmax(z / tau)`` for a batch
    (rows samples, columns classes) and ``ρ`` the Pearson correlation,

    ``loss = tau² · (beta · (1 − mean_i ρ(Y^S_i,:, Y^T_i,:))``
    ``             + gamma · (1 − mean_j ρ(Y^S_:,j, Y^T_:,j)))``

    — the inter-class relation (per sample, across classes) and the intra-class relation (per
    class, across the batch). Reads logits only; the soft terms cover every sample, labelled
    or not. Returns the terms ``inter`` and ``intra``.

    The authors' code (hunto/image_classification_sota, ``lib/models/losses/dist_kd.py``)
    computes this with ``beta = gamma = 1`` and multiplies it by an overall ``kd_loss_weight``
    of 2 in their configs (a fork's ``configs/strategies/distill/resnet_dist+.yaml`` and run
    config, ImageNet; the README's ``dist_cifar.yaml`` with ``dist_t4``, CIFAR-100): kdlab folds
    that weight into ``beta = gamma = 2``. Published: 76.31 on CIFAR-100, resnet32x4 →
    resnet8x4.

    Config (``conf/distill/dist.yaml``; the authors' CIFAR-100 setting — on ImageNet
    ``tau = 1``)::

        _target_: kdlab.strategies.logits.DIST
        beta: 2.0
        gamma: 2.0
        tau: 4.0
        ce_weight: 1.0

    Args:
        beta: weight of the inter-class relation, ``>= 0``.
        gamma: weight of the intra-class relation, ``>= 0``.
        tau: softmax temperature ``> 0``.
        ce_weight: weight of the cross-entropy on the labels, ``>= 0``.
    """

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, tau: float = 4.0,
                 ce_weight: float = 1.0) -> None:
        super().__init__()
        self.beta = check_number("beta", beta, ">= 0")
        self.gamma = check_number("gamma", gamma, ">= 0")
        self.tau = check_number("tau", tau, "> 0")
        self.ce_weight = check_number("ce_weight", ce_weight, ">= 0")

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        y_s = F.softmax(student.logits / self.tau, dim=1)
        y_t = F.softmax(teacher.logits.detach() / self.tau, dim=1)
        inter = 1 - _pearson(y_s, y_t).mean()
        intra = 1 - _pearson(y_s.t(), y_t.t()).mean()
        scale = self.tau**2
        return {"inter": scale * self.beta * inter, "intra": scale * self.gamma * intra}


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score ``(z − mean(z)) / (σ(z) + eps)`` over the ``C`` classes (LSKD's
    Algorithm 1, without its base temperature), with ``σ`` the *sample* standard deviation
    ``sqrt(Σ (z_k − mean)² / (C − 1))``: the authors' released code
    (sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``, ``normalize``)
    calls ``Tensor.std`` with torch's default Bessel correction and adds ``eps = 1e-7``. The
    paper's Algorithm 1 writes the population ``σ`` (``1 / C``); the two differ by the constant
    factor ``sqrt((C − 1) / C)`` on the z-scores (0.995 for 100 classes), i.e. an effective base
    temperature ``τ · sqrt(C / (C − 1))``. Needs ``C >= 2``."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True, correction=1)
    return (logits - mean) / (std + eps)


class LSKD(Strategy):
    """KD with logit standardisation — Sun, Ren, Li, Wang & Cao, "Logit Standardization in
    Knowledge Distillation", CVPR 2024 (arXiv:2403.01427).

    Both logit vectors are z-scored per sample before Hinton's KD, so the student matches the
    teacher's logit *relations* rather than their range and variance:

    ``loss = alpha · τ² · KL(softmax(Z(v)/τ) ‖ softmax(Z(z)/τ)) + ce_weight · CE``,
    ``Z(x) = (x − mean(x)) / σ(x)``

    with ``τ`` the base temperature (the paper's ``Z(x; τ)`` folds the ``1/τ`` into the
    z-score) and ``σ`` the sample standard deviation (``C − 1`` denominator, as the authors'
    released code computes it; see :func:`standardize`). Reads logits only; the soft term
    covers every sample, labelled or not. Unlike KD, the cross-entropy weight is its own option
    and not ``1 - alpha``: the paper's weights (``λ_KD = 9``, ``λ_CE = 0.1``, Table 4) do not
    sum to 1. ``alpha = 0.9, ce_weight = 0.1`` gives KD's weighting. Returns the term
    ``lskd``. Published: 76.62 % top-1 on CIFAR-100 resnet32x4 → resnet8x4 with these defaults
    (the paper's Table 2, "KD+Ours"; KD 73.33).

    Config (``conf/distill/lskd.yaml``; the paper's CIFAR-100 KD+LS setting)::

        _target_: kdlab.strategies.logits.LSKD
        temperature: 2.0
        alpha: 9.0
        ce_weight: 0.1

    Args:
        temperature: base temperature ``τ > 0``.
        alpha: weight ``λ_KD >= 0`` of the soft term.
        ce_weight: weight ``λ_CE >= 0`` of the cross-entropy on the labels.
    """

    def __init__(self, temperature: float = 2.0, alpha: float = 9.0,
                 ce_weight: float = 0.1) -> None:
        super().__init__()
        self.temperature = check_number("temperature", temperature, "> 0")
        self.alpha = check_number("alpha", alpha, ">= 0")
        self.ce_weight = check_number("ce_weight", ce_weight, ">= 0")

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"lskd": self.alpha * lskd_loss(student.logits, teacher.logits.detach(),
                                               self.temperature)}


def lskd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float | torch.Tensor) -> torch.Tensor:
    """LSKD's soft term without its weight: :func:`kd_loss` (``τ² · KL``) on the
    :func:`standardize`-d logits; ``τ`` a float or a tensor (a learned temperature)."""
    return kd_loss(standardize(student_logits), standardize(teacher_logits), temperature)
