"""Curriculum temperature: a distillation temperature learned adversarially (CTKD)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_epochs, check_number
from kdlab.strategies.composite import qualify
from kdlab.strategies.logits import DKD, KD, LSKD, dkd_kl, kd_loss, lskd_loss
from kdlab.util.errors import KdlabError

#: the losses CTKD can drive, with the options each takes (kdlab's defaults for that loss)
LOSSES: dict[str, tuple[type[Strategy], dict[str, float]]] = {
    "kd": (KD, {"alpha": 0.9}),
    "dkd": (DKD, {"alpha": 1.0, "beta": 8.0, "warmup": 20, "ce_weight": 1.0}),
    "lskd": (LSKD, {"alpha": 9.0, "ce_weight": 0.1}),
}


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the incoming gradient by ``-strength``
    (Ganin & Lempitsky's gradient reversal layer)."""

    @staticmethod
    def forward(ctx, x, strength):  # noqa: ANN001
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad * -ctx.strength, None


def reverse_gradient(x: torch.Tensor, strength: float) -> torch.Tensor:
    """``x`` unchanged, whose gradient is multiplied by ``-strength`` on the way back: what
    minimises the loss downstream of it maximises the loss upstream (``strength >= 0``)."""
    return _ReverseGradient.apply(x, float(strength))


def cosine_ramp(epoch: int, loops: int, low: float, high: float) -> float:
    """CTKD's curriculum: ``low + (high − low) · (1 − cos(π · min(epoch + 1, loops) / loops)) / 2``
    for the 0-based ``epoch`` (the authors' 1-based epoch ``n = epoch + 1``), so the first epoch
    is already one step up the cosine and ``high`` is reached at epoch ``loops − 1``;
    ``loops = 0``: ``high`` from the start."""
    if loops == 0:
        return float(high)
    n = min(epoch + 1, loops)
    return low + (high - low) * (1.0 - math.cos(math.pi * n / loops)) / 2.0


class GlobalTemperature(nn.Module):
    """One learnable temperature for every sample:
    ``T = t_start + t_range · sigmoid(GRL_λ(θ))``, ``θ`` a scalar parameter initialised at
    ``init``; the gradient reversal sits between ``θ`` and the rest, so ``θ`` is trained to
    *increase* the loss by whatever optimiser minimises it."""

    def __init__(self, t_start: float, t_range: float, init: float) -> None:
        super().__init__()
        self.t_start = t_start
        self.t_range = t_range
        self.theta = nn.Parameter(torch.tensor(float(init)))

    def value(self) -> torch.Tensor:
        """The current temperature, without gradient (for logging)."""
        with torch.no_grad():
            return self.t_start + self.t_range * torch.sigmoid(self.theta.detach())

    def forward(self, strength: float) -> torch.Tensor:
        theta = reverse_gradient(self.theta, strength)
        return self.t_start + self.t_range * torch.sigmoid(theta)


class CTKD(Strategy):
    """Curriculum temperature for KD — Li, Li, Yang, Zhao, Song, Luo, Li & Yang, "Curriculum
    Temperature for Knowledge Distillation", AAAI 2023 (arXiv:2211.16231).

    The temperature of a logit loss (KD, DKD or LSKD, option ``loss``) is a learned scalar
    trained *adversarially* through a gradient reversal layer (GRL): the student minimises the
    loss, the temperature maximises it, with a reversal strength ``λ`` that rises over the first
    ``loops`` epochs (an easy-to-hard curriculum):

    ``T = t_start + t_range · sigmoid(θ)``, ``∂/∂θ ← −λ_e · ∂L/∂θ``,
    ``λ_e = λ_min + (λ_max − λ_min) · (1 − cos(π · min(e + 1, loops) / loops)) / 2``

    and ``L`` the chosen loss at temperature ``T`` (gradient through both softmaxes and its
    ``T²`` factor), e.g. with ``loss: kd``
    ``L = alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE``.
    ``e`` is the 0-based :attr:`epoch`, the authors' 1-based epoch minus one: their first epoch
    already has ``λ = (1 − cos(π / loops)) / 2`` (0.024 for 10 loops). ``θ`` is a submodule
    parameter, so it is optimised with the student (same optimizer, learning rate and weight
    decay, as in the authors' code, which puts it in the student's SGD) and saved in the
    student checkpoint. Returns the chosen loss's terms (``kd``; ``tckd`` and ``nckd``;
    ``lskd``); :meth:`metrics` gives the current temperature and ``λ`` for logging.

    Each loss keeps its own weights under its name (``distill.ctkd.dkd.beta=2``), with kdlab's
    defaults for that loss (``conf/distill/<loss>.yaml``) minus the temperature, which is
    learned; the cross-entropy weight is that loss's (KD: ``1 − alpha``).

    Published (CIFAR-100, resnet32x4 → resnet8x4, KD + CTKD): 73.39 top-1.

    Where kdlab departs from the authors' code (zhengli97/CTKD, ``train_student.py``,
    ``helper/loops.py``, ``models/temp_global.py``):

    - ``λ`` is a non-negative strength and the GRL multiplies by ``−λ``; the authors' GRL
      multiplies by a signed value that their cosine schedule takes from ``decay_max = 0`` to
      ``decay_min = −1``. Same gradients.
    - The authors' ``t_end`` is a range (the maximum is ``t_start + t_end = 21``): here
      ``t_range``.
    - Only the global temperature: the paper's instance-wise variant (an MLP predicting a
      temperature per sample) is not in the authors' released code (``--mlp_name`` accepts only
      ``global``), so it is not implemented.
    - ``loss: dkd`` is kdlab's DKD (β = 8, 20-epoch warm-up, for resnet32x4 → resnet8x4); the
      authors combined CTKD with a DKD *without* warm-up and β = 2 (resnet56 → resnet20): use
      ``distill.ctkd.dkd.warmup=0 distill.ctkd.dkd.beta=2`` for that.
    - ``loss: lskd`` follows the LSKD authors' own CTKD experiments
      (sunshangquan/logit-standardization-KD, ``CTKD/``): the learned ``T`` replaces LSKD's base
      temperature; kdlab adds ``eps = 1e-7`` to the standard deviation (their CTKD copy does
      not; their main code does).

    Config (``conf/distill/ctkd.yaml``; the authors' CIFAR-100 settings)::

        _target_: kdlab.strategies.curriculum.CTKD
        loss: kd
        t_start: 1.0
        t_range: 20.0
        init: 1.0
        lambda_min: 0.0
        lambda_max: 1.0
        loops: 10
        kd: {alpha: 0.9}
        dkd: {alpha: 1.0, beta: 8.0, warmup: 20, ce_weight: 1.0}
        lskd: {alpha: 9.0, ce_weight: 0.1}

    Args:
        loss: the loss whose temperature is learned: ``kd``, ``dkd`` or ``lskd``.
        t_start: lowest temperature, ``> 0``.
        t_range: width of the temperature's range ``>= 0`` (``T ∈ (t_start, t_start + t_range)``;
            0: a fixed temperature ``t_start``).
        init: initial value of ``θ``, any finite number (1: ``T = 1 + 20 · sigmoid(1) ≈ 15.6``).
        lambda_min: reversal strength at the start of the curriculum, ``>= 0``.
        lambda_max: reversal strength at its end (and after), ``>= 0``.
        loops: epochs of the cosine ramp from ``lambda_min`` to ``lambda_max``, ``>= 0``.
        kd: options of ``loss: kd`` (``alpha``).
        dkd: options of ``loss: dkd`` (``alpha``, ``beta``, ``warmup``, ``ce_weight``).
        lskd: options of ``loss: lskd`` (``alpha``, ``ce_weight``).
    """

    def __init__(self, loss: str = "kd", t_start: float = 1.0, t_range: float = 20.0,
                 init: float = 1.0, lambda_min: float = 0.0, lambda_max: float = 1.0,
                 loops: int = 10, kd: Mapping[str, Any] | None = None,
                 dkd: Mapping[str, Any] | None = None,
                 lskd: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise KdlabError(f"distill.loss={loss} must be one of {', '.join(LOSSES)}: the loss "
                             "whose temperature CTKD learns")
        self.loss = str(loss)
        t_start = check_number("t_start", t_start, "> 0")
        t_range = check_number("t_range", t_range, ">= 0")
        number = isinstance(init, int | float) and not isinstance(init, bool)
        if not (number and math.isfinite(init)):
            raise KdlabError(f"distill.init={init} must be a finite number (the temperature "
                             "parameter's initial value, before the sigmoid)")
        self.lambda_min = check_number("lambda_min", lambda_min, ">= 0")
        self.lambda_max = check_number("lambda_max", lambda_max, ">= 0")
        self.loops = check_epochs("loops", loops)
        # every block is checked, the chosen one drives the loss (its weights, DKD's warm-up)
        losses = {name: self._build(name, options)
                  for name, options in (("kd", kd), ("dkd", dkd), ("lskd", lskd))}
        self.base = losses[self.loss]
        self.ce_weight = self.base.ce_weight
        self.temperature = GlobalTemperature(t_start, t_range, float(init))
        self.strength = self.reversal(0)

    @staticmethod
    def _build(name: str, options: Mapping[str, Any] | None) -> Strategy:
        """The loss ``name`` with its options (for their checks and weights); errors name
        ``distill.<name>.<key>``."""
        cls, defaults = LOSSES[name]
        given = dict(options or {})
        for key in given:
            if key not in defaults:
                why = ("the temperature is learned: set distill.t_start, distill.t_range"
                       if key == "temperature" else f"it takes {', '.join(defaults)}")
                raise KdlabError(f"distill.{name}.{key} is not an option of ctkd's {name} "
                                 f"loss: {why}")
        try:
            return cls(**{**defaults, **given})
        except KdlabError as e:
            raise KdlabError(qualify(str(e), name)) from None

    def reversal(self, epoch: int) -> float:
        """The reversal strength ``λ`` of the 0-based ``epoch`` (:func:`cosine_ramp`)."""
        return cosine_ramp(epoch, self.loops, self.lambda_min, self.lambda_max)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.base.on_epoch_start(epoch)
        self.strength = self.reversal(epoch)

    def logged(self) -> dict[str, float | torch.Tensor]:
        """Logged as ``train/temperature`` and ``train/lambda`` (not part of the loss)."""
        temperature = self.temperature.value()
        return {"temperature": temperature,
                "lambda": torch.tensor(self.strength, device=temperature.device)}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        temperature = self.temperature(self.strength)
        s, t = student.logits, teacher.logits.detach()
        base = self.base
        if self.loss == "kd":
            return {"kd": base.alpha * kd_loss(s, t, temperature)}
        if self.loss == "lskd":
            return {"lskd": base.alpha * lskd_loss(s, t, temperature)}
        tckd, nckd = dkd_kl(s, t, batch.targets, temperature)
        scale = base.warmup_factor() * temperature * temperature
        return {"tckd": scale * base.alpha * tckd, "nckd": scale * base.beta * nckd}
