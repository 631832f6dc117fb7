"""Factor transfer: match the student's translated features to the teacher's paraphrased ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_choice, check_epochs, check_number
from kdlab.util.errors import KdlabError

#: negative slope of the LeakyReLU after every paraphraser / translator layer (authors' code)
LEAKY_SLOPE = 0.1


def _conv_stack(channels: Sequence[int], transpose: bool = False) -> nn.Sequential:
    """3×3 stride-1 (transposed) convolutions ``channels[i] → channels[i+1]``, each followed by
    a LeakyReLU; the spatial size is kept."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, stride=1, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The teacher-side convolutional autoencoder of FT: ``encoder`` maps ``C`` channels to the
    ``factor_channels`` of the teacher factor (``C → C → k·C → k·C``), ``decoder`` mirrors it
    back (``k·C → k·C → C → C``)."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels])
        self.decoder = _conv_stack([factor_channels, factor_channels, channels, channels],
                                   transpose=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``decoder(encoder(x))``."""
        return self.decoder(self.encoder(x))


class Translator(nn.Sequential):
    """The student-side encoder of FT: ``C_s → C_s → F → F`` channels, ``F`` being the
    teacher factor's channels."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__(*_conv_stack([channels, channels, factor_channels, factor_channels]))


#: what is compared of the two factors (see :func:`factor_transfer_loss`)
FT_FACTORS = ("full", "channel_mean_sq")
#: how the difference of the normalised factors is reduced
FT_DISTANCES = ("mean", "norm")
#: the paraphraser's reconstruction loss in the pre-stage
FT_RECONSTRUCTIONS = ("l1", "mse")


def factor_transfer_loss(
    student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: int = 1,
    factor: str = "full", distance: str = "mean",
) -> torch.Tensor:
    """The FT loss of two factors ``[N, C, H, W]`` (maps of different spatial size are first
    average-pooled to the smaller one). Per sample, ``φ(F)`` is

    - ``full``: the whole factor flattened (the paper, its authors' code, torchdistill), or
    - ``channel_mean_sq``: ``mean_c F_c²``, an ``H·W`` map (RepDistiller's ``p1 = 2``),

    L2-normalised; with ``Δ = φ(F_t)/‖φ(F_t)‖₂ − φ(F_s)/‖φ(F_s)‖₂`` of ``d`` entries the loss is

    - ``mean``: ``mean_n (1/d) Σ |Δ|^p`` (``nn.L1Loss`` for ``p = 1``, the authors' code;
      RepDistiller's ``.pow(p).mean()``), or
    - ``norm``: ``mean_n ‖Δ‖_p`` (the paper's ``‖·‖_p``; torchdistill's ``p = 2``). For
      ``p = 1`` this is exactly ``d ×`` ``mean``; for ``p = 2`` it is the square root of
      ``d ×`` the ``mean`` form per sample, not a constant factor.
    """
    if student_factor.shape[-2:] != teacher_factor.shape[-2:]:
        size = tuple(min(a, b) for a, b in zip(student_factor.shape[-2:],
                                                teacher_factor.shape[-2:]))
        student_factor = F.adaptive_avg_pool2d(student_factor, size)
        teacher_factor = F.adaptive_avg_pool2d(teacher_factor, size)
    if factor == "channel_mean_sq":
        student_factor, teacher_factor = (f.pow(2).mean(dim=1)
                                          for f in (student_factor, teacher_factor))
    s = F.normalize(student_factor.flatten(1), dim=1)
    t = F.normalize(teacher_factor.flatten(1), dim=1)
    if distance == "norm":
        return (s - t).norm(p=p, dim=1).mean()
    return (s - t).abs().pow(p).mean()


class FT(Strategy):
    """Factor transfer — Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression
    via Factor Transfer", NeurIPS 2018 (arXiv:1802.04977).

    Pre-stage: ``L_rec`` between the teacher map ``x`` and its reconstruction ``P(x)``; main:
    ``loss = beta · mean_n (1/d)·‖F_t/‖F_t‖₂ − F_s/‖F_s‖₂‖_p^p`` with ``F_t = P_enc(x_t)`` and
    ``F_s = T(x_s)`` (defaults; the variants below).

    Reads the last entry of ``student_layers`` / ``teacher_layers`` (default: the last stage of
    each, as in the paper and RepDistiller). A *paraphraser* ``P`` (3-conv encoder to
    ``round(rate · C_t)`` channels and its mirrored decoder, LeakyReLU 0.1, no BatchNorm, as
    the authors') learns to reconstruct the teacher map during the pre-stage of
    ``init_epochs`` epochs; its encoder output is the *teacher factor*. Then a *translator*
    ``T`` (3 convs on the student map to the same channels; RepDistiller adds BatchNorm, the
    authors do not) is trained with the student so that the L2-normalised student factor
    matches the teacher's; the paraphraser is frozen then (its factor is computed under
    ``no_grad``). Factors of different spatial size are average-pooled to the smaller one.

    Variants (config keys):

    - ``reconstruction``: ``l1`` (default: ``nn.L1Loss``, the authors' code,
      Jangho-Kim/Factor-Transfer-pytorch ``train_Paraphraser.py``) or ``mse`` (the paper's
      squared error as RepDistiller computes it, ``nn.MSELoss``; kdlab's earlier default).
    - ``factor``: ``full`` (default: the whole factor, the paper / authors / torchdistill) or
      ``channel_mean_sq`` (RepDistiller's ``FactorTransfer(p1=2)``: ``mean_c F_c²``, a spatial
      map, is what gets normalised and compared).
    - ``p`` and ``distance``: ``mean`` (default) takes ``mean_n (1/d) Σ|Δ|^p`` — the authors'
      ``nn.L1Loss`` for ``p = 1``, RepDistiller's mean for either ``p``; ``norm`` takes the
      paper's ``mean_n ‖Δ‖_p`` (torchdistill's ``p = 2``). For ``p = 1`` ``norm`` is exactly
      ``d ×`` ``mean`` (``d = round(rate·C_t)·H·W``: 8192 for resnet32x4's last stage at
      ``rate 0.5``, 128·8·8); for ``p = 2`` it is ``√(d · mean)`` per sample.

    ``beta = 200`` is RepDistiller's (``-a 0 -b 200``, CE weight 1), tuned for its
    ``channel_mean_sq`` factor; the authors' code uses 500 with the ``full`` factor on
    CIFAR-10. The scales differ: the ``mean`` of ``|Δ|`` between unit vectors of ``d`` entries
    goes as ``1/√d``, so at equal ``beta`` the ``full`` term is about ``√C`` (≈ 11 for the
    128-channel factor of resnet32x4) smaller than the ``channel_mean_sq`` one; a CIFAR-100
    protocol file (``conf/protocol/ft/cifar100_ft.yaml``, read by ``ft.yaml``'s defaults
    list when present) selects RepDistiller's factor with its ``beta``. The authors' and
    RepDistiller's paraphraser trains separately before the student (the authors' 6
    epochs at LR 0.1; RepDistiller's 30 epochs at LR 0.01 for ResNet/WRN students); here its
    pre-stage runs inside the run, at the run's LR, and counts in ``trainer.max_epochs``.

    CIFAR-100 resnet32x4 → resnet8x4 top-1 (RepDistiller): 72.86.

    Config (``conf/distill/ft.yaml``)::

        _target_: kdlab.strategies.paraphrase.FT
        beta: 200.0
        rate: 0.5
        p: 1
        distance: mean
        factor: full
        reconstruction: l1
        init_epochs: 1

    Args:
        beta: weight of the factor-transfer term, ``>= 0``.
        rate: paraphrase rate ``k > 0``: the factor has ``max(1, round(k · C_t))`` channels.
        p: the norm of the factor difference, 1 (paper default) or 2.
        distance: ``mean`` or ``norm`` (above).
        factor: ``full`` or ``channel_mean_sq`` (above).
        reconstruction: ``l1`` or ``mse``: the paraphraser's pre-stage loss.
        init_epochs: epochs of the paraphraser pre-stage, ``>= 0`` (0: random paraphraser).
        student_layers: student layer(s); the last one is used.
        teacher_layers: teacher layer(s); the last one is used.
    """

    def __init__(
        self,
        beta: float = 200.0,
        rate: float = 0.5,
        p: int = 1,
        distance: str = "mean",
        factor: str = "full",
        reconstruction: str = "l1",
        init_epochs: int = 1,
        student_layers: Sequence[str] | str = "stages",
        teacher_layers: Sequence[str] | str = "stages",
    ) -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        self.rate = check_number("rate", rate, "> 0")
        if isinstance(p, bool) or p not in (1, 2):
            raise KdlabError(f"distill.p={p} must be 1 or 2")
        self.p = int(p)
        self.distance = check_choice("distance", distance, FT_DISTANCES)
        self.factor = check_choice("factor", factor, FT_FACTORS)
        self.reconstruction = check_choice("reconstruction", reconstruction, FT_RECONSTRUCTIONS)
        self.init_epochs = check_epochs("init_epochs", init_epochs)
        self.student_layers, self.teacher_layers = student_layers, teacher_layers

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        s, t = self.student_features(student)[-1], self.teacher_features(teacher)[-1]
        for side, x in (("student", s), ("teacher", t)):
            if x.dim() != 4:
                raise KdlabError(f"distill.{side}_layers: FT needs a feature map [N, C, H, W] "
                                 f"but the last layer gives shape {list(x.shape)}")
        factor_channels = max(1, round(self.rate * t.shape[1]))
        self.paraphraser = Paraphraser(t.shape[1], factor_channels)
        self.translator = Translator(s.shape[1], factor_channels)

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        t = self.teacher_features(teacher)[-1].detach()
        rec = F.l1_loss if self.reconstruction == "l1" else F.mse_loss
        return {"ft_rec": rec(self.paraphraser(t), t)}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(self.teacher_features(teacher)[-1].detach())
        factor_s = self.translator(self.student_features(student)[-1])
        loss = factor_transfer_loss(factor_s, factor_t, self.p, self.factor, self.distance)
        return {"ft": self.beta * loss}
