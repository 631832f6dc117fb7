"""Factor transfer: match the student's translated features to the teacher's paraphrased ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_epochs, check_number
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


def factor_transfer_loss(
    student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: int = 1
) -> torch.Tensor:
    """``mean_n (1/d) · ‖F_t/‖F_t‖₂ − F_s/‖F_s‖₂‖_p^p`` over factors flattened per sample
    (``d`` elements each): the FT loss as the authors' code computes it (``nn.L1Loss`` on
    L2-normalised factors for ``p = 1``). Maps of different spatial size are first
    average-pooled to the smaller one."""
    if student_factor.shape[-2:] != teacher_factor.shape[-2:]:
        size = tuple(min(a, b) for a, b in zip(student_factor.shape[-2:],
                                                teacher_factor.shape[-2:]))
        student_factor = F.adaptive_avg_pool2d(student_factor, size)
        teacher_factor = F.adaptive_avg_pool2d(teacher_factor, size)
    s = F.normalize(student_factor.flatten(1), dim=1)
    t = F.normalize(teacher_factor.flatten(1), dim=1)
    return (s - t).abs().pow(p).mean()


class FT(Strategy):
    """Factor transfer — Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression
    via Factor Transfer", NeurIPS 2018 (arXiv:1802.04977).

    ``pre-stage: L_rec = ‖x − P(x)‖²``, ``main: loss = beta · mean_n (1/d)·‖F_t/‖F_t‖₂ −
    F_s/‖F_s‖₂‖_p^p`` with ``F_t = P_enc(x_t)`` and ``F_s = T(x_s)``

    Reads the last entry of ``student_layers`` / ``teacher_layers`` (default: the last stage of
    each, as in the paper). A *paraphraser* ``P`` (3-conv encoder to ``round(rate · C_t)``
    channels and its mirrored decoder, LeakyReLU 0.1) learns to reconstruct the teacher map
    during the pre-stage of ``init_epochs`` epochs; its encoder output is the *teacher factor*.
    Then a *translator* ``T`` (3 convs on the student map to the same channels) is trained with
    the student so that the L2-normalised student factor matches the teacher's; the
    paraphraser is frozen then (its factor is computed under ``no_grad``). Factors of different
    spatial size are average-pooled to the smaller one.

    The norm is divided by the factor size ``d`` (a mean over elements, as ``nn.L1Loss`` in the
    authors' code and RepDistiller): ``beta`` is on that scale. Hard-label cross-entropy is
    kept with weight 1 (RepDistiller's FT runs: ``-a 0 -b 200``).

    Config (``conf/distill/ft.yaml``)::

        _target_: kdlab.strategies.paraphrase.FT
        beta: 200.0
        rate: 0.5
        p: 1
        init_epochs: 1

    Args:
        beta: weight of the factor-transfer term, ``>= 0``.
        rate: paraphrase rate ``k > 0``: the factor has ``max(1, round(k · C_t))`` channels.
        p: the norm of the factor difference, 1 (paper default) or 2.
        init_epochs: epochs of the paraphraser pre-stage, ``>= 0`` (0: random paraphraser).
        student_layers: student layer(s); the last one is used.
        teacher_layers: teacher layer(s); the last one is used.
    """

    def __init__(
        self,
        beta: float = 200.0,
        rate: float = 0.5,
        p: int = 1,
        init_epochs: int = 1,
        student_layers: Sequence[str] | str = "stages",
        teacher_layers: Sequence[str] | str = "stages",
    ) -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        self.rate = check_number("rate", rate, "> 0")
        if p not in (1, 2):
            raise KdlabError(f"distill.p={p} must be 1 or 2")
        self.p = int(p)
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
        return {"ft_rec": F.mse_loss(self.paraphraser(t), t)}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(self.teacher_features(teacher)[-1].detach())
        factor_s = self.translator(self.student_features(student)[-1])
        return {"ft": self.beta * factor_transfer_loss(factor_s, factor_t, self.p)}
