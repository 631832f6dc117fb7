"""DOT, the distillation-oriented trainer: SGD with one momentum buffer for the task gradient and
another for the distillation gradient."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kdlab.util.errors import KdlabError


class DOT(torch.optim.Optimizer):
    """Distillation-oriented trainer — Zhao, Song & Qiu, "DOT: A Distillation-Oriented
    Trainer", ICCV 2023 (arXiv:2307.08436). Published on CIFAR-100, resnet32x4 → resnet8x4:
    KD + DOT 75.12 (KD alone 73.33).

    SGD with momentum whose momentum differs by gradient: the distillation gradient ``g_kd``
    accumulates with ``β + Δ`` and the task (cross-entropy) gradient ``g_ce`` with ``β − Δ``,
    so the distillation loss, whose gradients are the more consistent, dominates the update::

        b_ce ← (β − Δ) · b_ce + g_ce + λ · θ        (weight decay λ with the task gradient)
        b_kd ← (β + Δ) · b_kd + g_kd
        θ    ← θ − lr · (b_ce + b_kd)

    A parameter that receives only one of the two gradients (a connector reads only the
    distillation loss) keeps one buffer with the plain momentum ``β`` and its own weight decay.
    A buffer starts as its first gradient (PyTorch's SGD convention). This is the update of the
    authors' code (megvii-research/mdistiller, ``mdistiller/engine/dot.py``), with ``β`` and
    ``Δ`` as options where their trainer passes ``β ± Δ``; one departure: a distillation-only
    parameter's first buffer includes its weight decay (theirs omits it on that first step).

    kdlab's loop calls :meth:`stash_distillation_gradients` after the backward pass of the
    distillation terms and :meth:`step` after that of the ``ce`` term (``optimizer=dot``; see
    :class:`kdlab.engine.module.DistillationModule`). Defaults: the authors' CIFAR-100 recipe
    (lr 0.05, ``β = 0.9``, ``Δ = 0.075``, weight decay 5e-4).

    Args:
        params: the parameters (or parameter groups) to optimise.
        lr: learning rate ``> 0``.
        momentum: the base momentum ``β`` in ``[0, 1)``.
        delta: ``Δ >= 0``, with ``0 <= β − Δ`` and ``β + Δ < 1``; ``Δ = 0`` is SGD with momentum.
        weight_decay: L2 penalty ``λ >= 0``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.9,
                 delta: float = 0.075, weight_decay: float = 5e-4) -> None:
        for key, value, ok in (("lr", lr, lr > 0), ("momentum", momentum, 0 <= momentum < 1),
                               ("delta", delta, delta >= 0 and 0 <= momentum - delta
                                and momentum + delta < 1),
                               ("weight_decay", weight_decay, weight_decay >= 0)):
            if not ok:
                raise KdlabError(f"optimizer.{key}={value} is out of range: DOT needs lr > 0, "
                                 "0 <= momentum - delta and momentum + delta < 1, "
                                 "weight_decay >= 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def stash_distillation_gradients(self) -> None:
        """Keep each parameter's current gradient as its distillation gradient and clear it, so
        that the next backward pass leaves the task gradient alone in ``.grad``."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.state[param]["kd_grad"] = param.grad
                    param.grad = None

    @staticmethod
    def _accumulate(state: dict[str, Any], key: str, grad: torch.Tensor,
                    momentum: float) -> torch.Tensor:
        """``b ← momentum · b + grad`` (``b = grad`` on the first step), stored under ``key``."""
        buffer = state.get(key)
        if buffer is None:
            buffer = state[key] = grad.detach().clone()
        else:
            buffer.mul_(momentum).add_(grad)
        return buffer

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - see the class docstring
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, delta = group["lr"], group["momentum"], group["delta"]
            decay = group["weight_decay"]
            for param in group["params"]:
                state = self.state[param]
                task, kd = param.grad, state.pop("kd_grad", None)
                if task is None and kd is None:
                    continue
                if task is not None and kd is not None:
                    if decay:
                        task = task.add(param, alpha=decay)
                    update = self._accumulate(state, "task_buffer", task, beta - delta)
                    update = update + self._accumulate(state, "kd_buffer", kd, beta + delta)
                else:
                    key = "task_buffer" if kd is None else "kd_buffer"
                    grad = task if kd is None else kd
                    if decay:
                        grad = grad.add(param, alpha=decay)
                    update = self._accumulate(state, key, grad, beta)
                param.add_(update, alpha=-lr)
        return loss
