"""Divergences between the teacher's and the student's output distributions beyond Hinton's
forward KL: reverse KL, the generalised Jensen–Shannon divergence of GKD, DistiLLM's skew KL
and skew reverse KL, and the Universal Logit Distillation loss for different vocabularies.

They compare one categorical distribution per row of the logits: a sample's classes for an
image classifier, a position's next-token distribution for a language model (whose tokens are
the rows). Every loss is the mean over rows of a per-row divergence, so a batch of images and
a batch of token positions are reduced alike. Notation: ``p = softmax(z_t / T)`` the teacher,
``q = softmax(z_s / T)`` the student, ``KL(a ‖ b) = Σ_v a_v (log a_v − log b_v)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdlab.strategies import logits
from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_choice, check_number
from kdlab.util.errors import KdlabError


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a ‖ b)`` per row from (finite) log-probabilities."""
    return torch.sum(log_a.exp() * (log_a - log_b), dim=1)


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(w · a + (1 − w) · b)`` per entry, computed in log space, for ``0 < w < 1``."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """``mean_rows KL(q ‖ p)``: the student's mass where the teacher has little is penalised
    (mode-seeking), unlike Hinton's ``KL(p ‖ q)`` (mass-covering)."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    return _kl_rows(log_q, log_p).mean()


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """GKD's generalised Jensen–Shannon divergence, mean over rows:

    ``JSD_β = β · KL(p ‖ m) + (1 − β) · KL(q ‖ m)``, ``m = β · p + (1 − β) · q``,

    with the end points defined as the limits the GKD authors and TRL's ``GKDTrainer`` use:
    ``β = 0`` is the forward ``KL(p ‖ q)`` and ``β = 1`` the reverse ``KL(q ‖ p)`` (the
    formula itself vanishes there). ``β = 0.5`` is the symmetric Jensen–Shannon divergence."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    if beta == 0.0:
        return _kl_rows(log_p, log_q).mean()
    if beta == 1.0:
        return _kl_rows(log_q, log_p).mean()
    log_m = _mixture(log_p, log_q, beta)
    return (beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)).mean()


def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1,
            temperature: float = 1.0) -> torch.Tensor:
    """DistiLLM's skew KL, mean over rows: ``KL(p ‖ α · p + (1 − α) · q)`` (``α = 0``:
    Hinton's forward KL)."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    log_m = log_q if alpha == 0.0 else _mixture(log_p, log_q, alpha)
    return _kl_rows(log_p, log_m).mean()


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    alpha: float = 0.1, temperature: float = 1.0) -> torch.Tensor:
    """DistiLLM's skew reverse KL, mean over rows: ``KL(q ‖ (1 − α) · p + α · q)``
    (``α = 0``: the reverse KL)."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    log_m = log_p if alpha == 0.0 else _mixture(log_q, log_p, alpha)
    return _kl_rows(log_q, log_m).mean()


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """ULD's closed-form Wasserstein-1 distance between the two distributions with their
    supports sorted, mean over rows: ``Σ_i |q_(i) − p_(i)|``, ``q_(1) ≥ q_(2) ≥ …`` the sorted
    probabilities, the smaller vocabulary padded with zeros. It needs no mapping between the
    two vocabularies, so teacher and student may have different ones (``V_s ≠ V_t``)."""
    q = F.softmax(student_logits / temperature, dim=1).sort(dim=1, descending=True).values
    p = F.softmax(teacher_logits / temperature, dim=1).sort(dim=1, descending=True).values
    width = max(q.shape[1], p.shape[1])
    q = F.pad(q, (0, width - q.shape[1]))
    p = F.pad(p, (0, width - p.shape[1]))
    return (q - p).abs().sum(dim=1).mean()


def _check_same_vocabulary(student: Outputs, teacher: Outputs, name: str) -> None:
    if student.logits.shape[1] != teacher.logits.shape[1]:
        raise KdlabError(f"distill={name} compares distributions over the same classes or "
                         f"vocabulary, but the student has {student.logits.shape[1]} and the "
                         f"teacher {teacher.logits.shape[1]}: use distill=uld for different "
                         "vocabularies")


def chunked_mean(divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``divergence(student, teacher)`` (a mean over rows) for a language model's ``tokens ×
    vocabulary`` logits: above :data:`~kdlab.strategies.logits.CHUNKED_ABOVE` elements it is
    computed over chunks of rows, each under activation checkpointing, so the backward pass
    keeps only the inputs and recomputes one chunk's softmaxes at a time instead of holding
    every ``[rows, V]`` intermediate of the whole batch (the same mean, to float rounding)."""
    rows = student.shape[0]
    if student.numel() <= logits.CHUNKED_ABOVE or rows < 2:
        return divergence(student, teacher)
    size = max(1, logits.CHUNK_ELEMENTS // student.shape[1])
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, size):
        s, t = student[start : start + size], teacher[start : start + size]
        total = total + checkpoint(divergence, s, t, use_reentrant=False) * len(s)
    return total / rows


class _Divergence(Strategy):
    """A weighted divergence between teacher and student distributions plus the label CE."""

    #: the term's name in the logs
    term = ""

    def __init__(self, weight: float, temperature: float, ce_weight: float) -> None:
        super().__init__()
        self.weight = check_number("weight", weight)
        self.temperature = check_number("temperature", temperature, "> 0")
        self.ce_weight = check_number("ce_weight", ce_weight)

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        _check_same_vocabulary(student, teacher, self.term)

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        t = self.temperature
        return {self.term: self.weight * t * t
                * chunked_mean(self.divergence, student.logits, teacher.logits.detach())}


class ReverseKL(_Divergence):
    """Reverse KL distillation, ``weight · T² · KL(q ‖ p)`` + ``ce_weight`` · CE — the
    mode-seeking objective of MiniLLM (Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation
    of Large Language Models", ICLR 2024, arXiv:2306.08543), here as a per-row (per-token)
    loss on the data, not MiniLLM's policy-gradient optimisation over sampled sequences.

    Config (``conf/distill/reverse_kl.yaml``): ``weight: 1.0``, ``temperature: 1.0``,
    ``ce_weight: 0.0`` (token-level KD in the LLM literature matches the teacher alone).
    """

    term = "reverse_kl"

    def __init__(self, weight: float = 1.0, temperature: float = 1.0,
                 ce_weight: float = 0.0) -> None:
        super().__init__(weight, temperature, ce_weight)

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return reverse_kl(student, teacher, self.temperature)


class GKD(_Divergence):
    """Generalised Jensen–Shannon distillation — Agarwal, Vieillard, Zhou, Stanczyk, Ramos,
    Geist & Bachem, "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD), ICLR 2024 (arXiv:2306.13649).

    ``loss = weight · T² · JSD_β(p, q) + ce_weight · CE`` with :func:`generalized_jsd`
    (``β = 0``: forward KL, ``β = 1``: reverse KL, as TRL's ``GKDTrainer``). Defaults:
    ``β = 0.5`` (TRL's ``GKDConfig``; the paper tunes β per task), temperature 1, no label term
    (the paper's objective is the divergence alone). GKD's on-policy data (a fraction λ of the
    sequences generated by the student) is a property of the training data, not of this loss.
    """

    term = "gkd"

    def __init__(self, beta: float = 0.5, weight: float = 1.0, temperature: float = 1.0,
                 ce_weight: float = 0.0) -> None:
        super().__init__(weight, temperature, ce_weight)
        self.beta = check_number("beta", beta)
        if self.beta > 1.0:
            raise KdlabError(f"distill.beta={beta} must be in [0, 1] (0: forward KL, "
                             "1: reverse KL)")

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return generalized_jsd(student, teacher, self.beta, self.temperature)


class SkewKL(_Divergence):
    """Skew KL and skew reverse KL — Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined
    Distillation for Large Language Models", ICML 2024 (arXiv:2402.03898).

    ``kind: forward``: ``SKL_α = KL(p ‖ α p + (1 − α) q)``; ``kind: reverse``:
    ``SRKL_α = KL(q ‖ (1 − α) p + α q)``; ``loss = weight · T² · SKL + ce_weight · CE``.
    Skewing the second argument towards the first keeps the divergence and its gradient
    bounded where one distribution has almost no mass. The authors' default ``α = 0.1``
    (their release trains with SRKL); their adaptive off-policy sampling of student outputs is
    a property of the data, not of this loss.
    """

    term = "skew_kl"

    def __init__(self, kind: str = "reverse", alpha: float = 0.1, weight: float = 1.0,
                 temperature: float = 1.0, ce_weight: float = 0.0) -> None:
        super().__init__(weight, temperature, ce_weight)
        self.kind = check_choice("kind", kind, ("forward", "reverse"))
        self.alpha = check_number("alpha", alpha)
        if self.alpha >= 1.0:
            raise KdlabError(f"distill.alpha={alpha} must be in [0, 1): at 1 the skewed "
                             "divergence is 0 whatever the student does")

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        skew = skew_kl if self.kind == "forward" else skew_reverse_kl
        return skew(student, teacher, self.alpha, self.temperature)


class ULD(_Divergence):
    """Universal Logit Distillation — Boizard, El Haddad, Hudelot & Colombo, "Towards
    Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs", TMLR 2025
    (arXiv:2402.12030).

    ``loss = weight · Σ_i |q_(i) − p_(i)| + ce_weight · CE`` (:func:`uld_distance`, sorted
    probabilities, zero-padded to the larger vocabulary), so the teacher and the student may
    have different vocabularies or class sets. Defaults as the authors' release
    (Nicolas-BZRD/llm-recipes, ``ULDLoss``): the student's CE and the ULD term both weighted 1,
    temperature 1, and no ``T²`` factor. Where kdlab departs: the authors align the answer
    tokens of the two tokenizations by position and truncate to the shorter; here the rows are
    already aligned (the same images, or the same byte positions).
    """

    term = "uld"
    any_vocabulary = True

    def __init__(self, weight: float = 1.0, temperature: float = 1.0,
                 ce_weight: float = 1.0) -> None:
        super().__init__(weight, temperature, ce_weight)

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        """Any two vocabularies: nothing to check."""

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {self.term: self.weight * chunked_mean(
            functools.partial(uld_distance, temperature=self.temperature), student.logits,
            teacher.logits.detach())}
