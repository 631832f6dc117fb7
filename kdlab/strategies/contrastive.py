"""Strategies that distil a representation by contrasting it with a memory bank of others."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_choice, check_number, layers_arg
from kdlab.util.errors import KdlabError


def random_unit_rows(rows: int, dim: int) -> torch.Tensor:
    """``rows`` random unit vectors of ``dim`` (isotropic: normalised Gaussians), drawn from
    torch's global RNG."""
    return F.normalize(torch.randn(rows, dim), dim=1)


def nce_loss(
    positive: torch.Tensor, negatives: torch.Tensor, log_z: torch.Tensor, num_samples: int
) -> torch.Tensor:
    """The NCE loss of CRD (Tian et al. 2020, eq. 19–20) from temperature-scaled scores.

    With ``P = exp(score) / Z`` and uniform noise ``1/M`` over the ``M = num_samples`` items,
    ``h = P / (P + K/M)`` for ``K`` negatives, and the loss is
    ``-log h(positive) - Σ_k log(1 - h(negative_k))``, averaged over the batch. Computed in
    log space (no epsilon needed).

    Args:
        positive: ``[B]`` scores ``<anchor, positive> / τ``.
        negatives: ``[B, K]`` scores ``<anchor, negative_k> / τ``.
        log_z: ``log Z``, the (detached) log normalisation constant.
        num_samples: ``M``, the number of items the negatives are drawn from.
    """
    log_noise = math.log(negatives.shape[1] / num_samples)  # log(K · 1/M)
    log_p_pos = positive - log_z
    log_p_neg = negatives - log_z
    log_h_pos = log_p_pos - torch.logaddexp(log_p_pos, torch.full_like(log_p_pos, log_noise))
    log_not_h_neg = log_noise - torch.logaddexp(log_p_neg, torch.full_like(log_p_neg, log_noise))
    return -(log_h_pos + log_not_h_neg.sum(dim=1)).mean()


#: which row the anchor is scored against as the positive (see :class:`CRD`)
CRD_POSITIVES = ("bank", "live")
#: where the negatives are drawn from
CRD_NEGATIVES = ("other_classes", "uniform")
#: rounds of redrawing negatives that share the anchor's class (``negatives: other_classes``)
REDRAW_ROUNDS = 10


class CRD(Strategy):
    """Contrastive representation distillation — Tian, Krishnan & Isola, "Contrastive
    Representation Distillation", ICLR 2020 (arXiv:1910.10699).

    ``loss = beta · (L(s → bank_t) + L(t → bank_s))``, ``L = -log h(pos) - Σ_K log(1 - h(neg))``
    with ``h = P / (P + K/M)``, ``P = exp(<a, b>/τ) / Z``: NCE telling the pair (student,
    teacher) of the same input from ``K`` pairs drawn among the ``M`` training samples.

    Reads the penultimate feature vectors (``"embedding"`` on both sides; another layer is
    flattened). Each side has a linear head to ``feat_dim`` followed by L2 normalisation; both
    heads train with the student (the teacher's head is part of the critic), the teacher never
    receives gradients. Each side keeps a memory bank of ``M = num_train_samples`` rows (a
    persistent buffer, saved in checkpoints, initialised with random unit vectors; the authors'
    rows are uniform in ``±√(3/feat_dim)``, of unit norm only on average): row ``i`` holds the
    past embedding of training sample ``i`` (``batch.index``).

    The positive (``positive``): ``bank`` (default, the authors' code — RepDistiller, which is
    CRD's — and torchdistill) scores the student anchor against the teacher bank's row of the
    same sample and the teacher anchor against the student bank's row, so gradients reach each
    head through its anchor only; the rows hold momentum averages of past epochs' embeddings
    (random vectors before a sample's first visit, so short runs of under an epoch learn
    little from it). ``live`` scores each anchor against the other network's current
    embedding of the same input (the paper's pairs drawn from the joint; kdlab's earlier
    default); then gradients also flow through the positive. Not a constant factor.

    The negatives (``negatives``): ``K = min(num_negatives, M - 1)`` rows per sample, never the
    sample itself, drawn uniformly with replacement; ``other_classes`` (default, as the
    authors' CIFAR-100 sampler, ``mode=exact``) redraws (up to 10 rounds) any that share the
    anchor's label. kdlab learns the labels of the rows from the batches it sees (a
    non-persistent buffer), so during the first epoch unseen rows count as other classes, and
    unlabelled transfer-set samples never clash; the authors sample without replacement.
    ``uniform``: any other sample. The two directions share the negative indices.

    ``Z`` is estimated once per direction, on the first training batch, by Monte Carlo over
    the negatives: ``Z ≈ M · mean exp(<a, bank_j>/τ)`` (the authors' mean also includes the
    positive), then kept fixed (a buffer, so resumed runs keep it). After the loss, the rows of
    the batch are updated without gradients:
    ``bank[i] ← normalise(m · bank[i] + (1 - m) · embedding_i)``.

    Cost: two banks of ``M × feat_dim`` floats (2 × 28 MB for Fashion-MNIST) and, per step,
    ``B × M`` scores per direction. Written for one process: under DDP the banks are not
    gathered across processes.

    Cross-entropy on the labels keeps weight 1 (RepDistiller's CRD: CE 1, CRD 0.8); combine
    with KD as ``distill=[kd,crd]``.

    CIFAR-100 resnet32x4 → resnet8x4 top-1 (the paper / RepDistiller): 75.51.

    Config (``conf/distill/crd.yaml``)::

        _target_: kdlab.strategies.contrastive.CRD
        beta: 0.8
        feat_dim: 128
        num_negatives: 16384
        nce_t: 0.07
        nce_mom: 0.5
        positive: bank
        negatives: other_classes

    Args:
        beta: weight of the contrastive term, ``>= 0``.
        feat_dim: dimension of the projected, normalised embeddings, ``> 0``.
        num_negatives: negatives per sample ``N``, ``> 0`` (clamped to ``M - 1``).
        nce_t: temperature ``τ > 0`` of the critic.
        nce_mom: momentum of the bank update, in ``[0, 1)``.
        positive: ``bank`` or ``live`` (above).
        negatives: ``other_classes`` or ``uniform`` (above).
        student_layers: the student layer to read (a path or an alias naming one layer).
        teacher_layers: the teacher layer to read (a path or an alias naming one layer).
    """

    def __init__(
        self,
        beta: float = 0.8,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        nce_t: float = 0.07,
        nce_mom: float = 0.5,
        positive: str = "bank",
        negatives: str = "other_classes",
        student_layers: Sequence[str] | str = "embedding",
        teacher_layers: Sequence[str] | str = "embedding",
    ) -> None:
        super().__init__()
        if isinstance(feat_dim, bool) or int(feat_dim) != feat_dim or feat_dim < 1:
            raise KdlabError(f"distill.feat_dim={feat_dim} must be a positive integer")
        if (isinstance(num_negatives, bool) or int(num_negatives) != num_negatives
                or num_negatives < 1):
            raise KdlabError(f"distill.num_negatives={num_negatives} must be a positive integer")
        if not 0.0 <= nce_mom < 1.0:
            raise KdlabError(f"distill.nce_mom={nce_mom} must be in [0, 1)")
        check_choice("positive", positive, CRD_POSITIVES)
        check_choice("negatives", negatives, CRD_NEGATIVES)
        self.beta = check_number("beta", beta)
        self.feat_dim = int(feat_dim)
        self.num_negatives = int(num_negatives)
        self.nce_t = check_number("nce_t", nce_t, "> 0")
        self.nce_mom = float(nce_mom)
        self.positive = str(positive)
        self.negative_sampling = str(negatives)
        self.student_layers = layers_arg(student_layers, "student_layers")
        self.teacher_layers = layers_arg(teacher_layers, "teacher_layers")
        self.num_samples = 0  # M, set by setup
        self.negatives = 0  # K = min(num_negatives, M - 1), set by setup

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        for side, paths in (("student", self.student_paths), ("teacher", self.teacher_paths)):
            if len(paths) != 1:
                layers = getattr(self, f"{side}_layers")
                raise KdlabError(f"distill.{side}_layers={layers} must name one layer "
                                 f"(CRD reads one embedding per network), not {len(paths)}")
        if num_train_samples < 2:
            raise KdlabError(f"CRD needs the size of the training split for its memory banks "
                             f"(got num_train_samples={num_train_samples}); it must be >= 2")
        s_dim = self.student_features(student)[0].flatten(1).shape[1]
        t_dim = self.teacher_features(teacher)[0].flatten(1).shape[1]
        self.student_head = nn.Linear(s_dim, self.feat_dim)
        self.teacher_head = nn.Linear(t_dim, self.feat_dim)
        self.num_samples = int(num_train_samples)
        self.negatives = min(self.num_negatives, self.num_samples - 1)
        self.register_buffer("student_bank", random_unit_rows(self.num_samples, self.feat_dim))
        self.register_buffer("teacher_bank", random_unit_rows(self.num_samples, self.feat_dim))
        # log Z for the student anchor (vs the teacher bank) and the teacher anchor; NaN: not
        # estimated yet
        self.register_buffer("log_z", torch.full((2,), math.nan))
        # the label of each row as seen in training (-1: not seen yet, or unlabelled)
        self.register_buffer("labels", torch.full((self.num_samples,), -1, dtype=torch.long),
                             persistent=False)

    def embed(self, student: Outputs, teacher: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected, L2-normalised student and teacher embeddings, ``[B, feat_dim]``."""
        s = self.student_features(student)[0].flatten(1)
        t = self.teacher_features(teacher)[0].flatten(1).detach()
        return (F.normalize(self.student_head(s), dim=1),
                F.normalize(self.teacher_head(t), dim=1))

    def _uniform_others(self, index: torch.Tensor, count: int) -> torch.Tensor:
        """``[len(index), count]`` rows drawn uniformly among the ``M - 1`` other than each
        sample's own (``index`` is ``[n]``, or ``[n, 1]`` for one own row per draw)."""
        own = index if index.dim() == 2 else index[:, None]
        draws = torch.randint(0, self.num_samples - 1, (own.shape[0], count),
                              device=index.device)
        return draws + (draws >= own).long()  # skip the sample's own row

    def sample_negatives(self, index: torch.Tensor,
                         targets: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, K]`` bank rows drawn uniformly with replacement among the ``M - 1`` rows other
        than each sample's own; with ``negatives: other_classes`` and ``targets`` given, rows
        whose known label equals the sample's are redrawn (up to :data:`REDRAW_ROUNDS`
        rounds).

        Each round redraws only the clashing entries: with C balanced classes a round leaves
        about 1/C of the last one's, so the rounds cost about ``C/(C-1)`` of one draw of
        ``B·K`` rows (redrawing every entry each round, as kdlab did before, cost one draw a
        round: about 7 rounds on Fashion-MNIST with every row labelled). Each entry goes
        through the same process either way, so the negatives have the same distribution;
        only the random stream differs."""
        draws = self._uniform_others(index, self.negatives)
        if self.negative_sampling != "other_classes" or targets is None:
            return draws
        own = targets.to(draws.device).long()
        clash = ((self.labels[draws] == own[:, None]) & (own[:, None] >= 0)).nonzero()
        for _ in range(REDRAW_ROUNDS):
            if clash.shape[0] == 0:
                break
            rows, cols = clash.unbind(1)
            redrawn = self._uniform_others(index[rows, None], 1)[:, 0]
            draws[rows, cols] = redrawn
            still = (self.labels[redrawn] == own[rows]).nonzero()[:, 0]
            clash = clash[still]
        return draws

    def _direction(self, anchor: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor,
                   negatives: torch.Tensor, which: int) -> torch.Tensor:
        """NCE loss of ``anchor`` against its ``positive`` and the ``negatives`` rows of
        ``bank``; estimates ``log Z`` on the first call."""
        pos = (anchor * positive).sum(dim=1) / self.nce_t
        # scoring the whole bank and picking the K columns needs B·M floats, where gathering
        # the rows first needs B·K·D (D=128: 38x more for Fashion-MNIST) and is slower
        neg = (anchor @ bank.T).gather(1, negatives) / self.nce_t
        with torch.no_grad():
            # Z ≈ M · mean_j exp(<a, bank_j>/τ) over this batch's negatives; kept once set
            estimate = (torch.logsumexp(neg.flatten(), dim=0) - math.log(neg.numel())
                        + math.log(self.num_samples))
            log_z = torch.where(torch.isnan(self.log_z[which]), estimate, self.log_z[which])
            self.log_z[which] = log_z
        return nce_loss(pos, neg, log_z, self.num_samples)

    @torch.no_grad()
    def update_banks(self, index: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> None:
        """Momentum update and renormalisation of the batch's rows of both banks.

        Out of place: the loss's graph still holds the old banks for its backward pass."""
        for name, new in (("student_bank", s), ("teacher_bank", t)):
            bank = getattr(self, name)
            rows = bank.index_select(0, index) * self.nce_mom
            rows.add_(new.detach().to(bank.dtype), alpha=1.0 - self.nce_mom)
            setattr(self, name, bank.index_copy(0, index, F.normalize(rows, dim=1)))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        index = batch.index.to(self.student_bank.device).long()
        targets = batch.targets.to(index.device).long()
        with torch.no_grad():
            self.labels[index] = targets.clamp_min(-1)
        s, t = (e.float() for e in self.embed(student, teacher))
        with torch.autocast(device_type=index.device.type, enabled=False):  # scores in fp32
            negatives = self.sample_negatives(index, targets)
            student_bank, teacher_bank = self.student_bank.float(), self.teacher_bank.float()
            if self.positive == "bank":
                pos_t, pos_s = teacher_bank[index], student_bank[index]
            else:
                pos_t, pos_s = t, s
            loss_s = self._direction(s, pos_t, teacher_bank, negatives, 0)
            loss_t = self._direction(t, pos_s, student_bank, negatives, 1)
        self.update_banks(index, s, t)
        return {"crd": self.beta * (loss_s + loss_t)}
