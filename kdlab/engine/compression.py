"""Compression primitives for a trained network: global magnitude pruning (a Lightning callback
on the cubic schedule, or one shot) and dynamic int8 quantisation. The orchestration — which
stages train, what is measured — is :mod:`kdlab.modes.compress`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import prune

from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: the metric a pruned stage's best checkpoint monitors (see :class:`MagnitudePruning`)
FINAL_METRIC = "val/acc_final_sparsity"


# -- pruning ------------------------------------------------------------------------------------
def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Conv/Linear layer whose ``weight`` is pruned."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The effective weight (``weight_orig × weight_mask`` while reparametrised)."""
    if prune.is_pruned(module) and hasattr(module, "weight_mask"):
        return module.weight_orig.detach() * module.weight_mask
    return module.weight.detach()


def global_magnitude_prune(model: nn.Module, amount: float) -> int:
    """Mask the ``round(amount × N)`` smallest-magnitude weights over all Conv/Linear layers of
    ``model`` (N: their weights together); returns how many are masked. Weights masked before
    stay masked (sparsity only grows), so the schedule's masks are nested. The layers are
    reparametrised by ``torch.nn.utils.prune`` (``weight_orig`` and a ``weight_mask`` buffer)."""
    layers = prunable_weights(model)
    if not layers:
        raise KdlabError(f"compress.prune: {type(model).__name__} has no Conv/Linear layer")
    scores = []
    for _, module in layers:
        mask = module.weight_mask if hasattr(module, "weight_mask") else None
        score = effective_weight(module).abs().flatten().float()
        if mask is not None:  # already pruned weights rank below every kept one
            score = torch.where(mask.flatten() > 0, score, torch.full_like(score, -1.0))
        scores.append(score)
    flat = torch.cat(scores)
    n_prune = int(round(float(amount) * flat.numel()))
    keep = torch.ones_like(flat)
    if n_prune > 0:
        keep[torch.topk(flat, n_prune, largest=False).indices] = 0.0
    offset = 0
    for _, module in layers:
        n = effective_weight(module).numel()
        if not hasattr(module, "weight_mask"):
            prune.identity(module, "weight")
        mask = keep[offset:offset + n].view_as(module.weight_mask).to(module.weight_mask)
        module.weight_mask.copy_(mask)
        module.weight_orig.data.mul_(mask)  # cleaner state: the pruned values are zero too
        offset += n
    return n_prune


def make_permanent(model: nn.Module) -> None:
    """``prune.remove`` on every pruned layer: plain ``weight`` parameters with zeros, in the
    memory layout the weights had before pruning (:func:`keep_layout`)."""
    for _, module in prunable_weights(model):
        if hasattr(module, "weight_mask"):
            strides = module.weight_orig.stride()
            prune.remove(module, "weight")
            keep_layout(module, strides)


def keep_layout(module: nn.Module, strides: tuple[int, ...]) -> None:
    """Put ``module.weight``'s values back into ``strides``. ``prune.remove`` builds the weight
    as ``weight_orig × weight_mask``, and the product can come out in another layout: a conv
    with one input channel loses ``channels_last`` (its strides are ambiguous), and the CPU
    convolution then reorders the weight at every call, twice as slow for kdlab's CNN."""
    weight = module.weight
    if weight.stride() == tuple(strides):
        return
    kept = torch.empty_strided(weight.shape, strides, dtype=weight.dtype, device=weight.device)
    kept.copy_(weight.detach())
    weight.data = kept


def layer_weights(model: nn.Module) -> Iterator[torch.Tensor]:
    """The effective weights of the Conv/Linear layers of ``model``, fp32 or (dequantised)
    dynamically quantised int8."""
    for module in model.modules():
        if isinstance(module, PRUNABLE):
            yield effective_weight(module)
        elif hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            yield module.weight().dequantize()


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over the Conv/Linear layers of ``model`` (int8 ones included)."""
    weights = list(layer_weights(model))
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(1, total)


def cubic_sparsity(epoch: int, final: float, start_epoch: int, end_epoch: int) -> float:
    """Zhu & Gupta (2017) sparsity after ``epoch`` completed epochs:
    ``final × (1 - (1 - (epoch - start) / (end - start))^3)`` between ``start_epoch`` and
    ``end_epoch``, 0 before and ``final`` after (``start == end``: one shot at ``start``)."""
    if epoch < start_epoch:
        return 0.0
    if epoch >= end_epoch:
        return float(final)
    progress = (epoch - start_epoch) / (end_epoch - start_epoch)
    return float(final) * (1.0 - (1.0 - progress) ** 3)


class MagnitudePruning(Callback):
    """Global magnitude pruning on the cubic schedule (:func:`cubic_sparsity`) of a stage's
    student: at the start of each training epoch ``e`` the mask is raised to ``s_e``; each
    validation logs :data:`FINAL_METRIC` (the accuracy at the final sparsity, -1 before), which
    the stage's best checkpoint monitors, so only checkpoints at the final sparsity compete;
    checkpoints hold plain ``weight`` keys; when training ends the pruning is made permanent.

    Why not Lightning's ``ModelPruning``: it prunes at the end of an epoch (or of its
    validation), so the one-shot schedule could not prune before the first epoch; its ``amount``
    compounds on the weights left (each call prunes a fraction of the remaining ones); its
    lottery-ticket reset is on by default; and a resumed run would train its first epoch without
    the mask until the next pruning call. This callback re-derives the mask from the weights
    (the pruned ones are exact zeros) at the start of every epoch.

    ``start_epoch == end_epoch == 0`` prunes once, before the first epoch (the
    fixed mask of ``schedule: after``).

    Args:
        amount: the final sparsity ``s_f`` in [0, 1).
        start_epoch, end_epoch: completed epochs where the ramp starts (sparsity 0) and ends.
        attr: the pruned network's attribute on the LightningModule.
    """

    def __init__(self, amount: float, start_epoch: int = 0, end_epoch: int = 0,
                 attr: str = "student") -> None:
        self.amount = float(amount)
        self.start_epoch = int(start_epoch)
        self.end_epoch = int(end_epoch)
        self.attr = attr
        self.current = 0.0
        self.final_reached = False
        #: (epoch, sparsity) of every mask update, for the report
        self.history: list[tuple[int, float]] = []
        #: the network's weights before training (the dense reference starts from them)
        self.initial_state: dict[str, torch.Tensor] | None = None

    def _model(self, pl_module: L.LightningModule) -> nn.Module:
        return getattr(pl_module, self.attr)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.initial_state is None:  # before a checkpoint is restored
            self.initial_state = copy.deepcopy(self._model(pl_module).state_dict())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        target = cubic_sparsity(epoch, self.amount, self.start_epoch, self.end_epoch)
        if target > 0 and (target > self.current or not self._reparametrised(pl_module)):
            with torch.no_grad():
                global_magnitude_prune(self._model(pl_module), target)
            self.current = target
            self.history.append((epoch, target))
            log.info("prune: epoch %d, sparsity %.4f", epoch, target)
        pl_module.log("prune/sparsity", self.current, on_epoch=True, on_step=False)
        if epoch >= self.end_epoch:
            self.final_reached = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log :data:`FINAL_METRIC`: the validation accuracy once the final sparsity is reached,
        -1 before. A best checkpoint monitoring it (instead of ``val/acc``) is chosen among the
        final-sparsity epochs only: a denser network validates better than the final one."""
        if trainer.sanity_checking:
            return
        accuracy = getattr(pl_module, "val_acc", None)
        value = float(accuracy.compute()) if self.final_reached and accuracy is not None \
            and accuracy.update_count else -1.0
        pl_module.log(FINAL_METRIC, value, on_epoch=True, on_step=False)

    def _reparametrised(self, pl_module: L.LightningModule) -> bool:
        return any(hasattr(m, "weight_mask") for _, m in prunable_weights(self._model(pl_module)))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.endswith(".weight_orig")]:
            prefix = key[: -len("weight_orig")]
            mask = state.pop(prefix + "weight_mask")
            state[prefix + "weight"] = state.pop(key) * mask

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        make_permanent(self._model(pl_module))

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "final_reached": self.final_reached}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = float(state_dict.get("current", 0.0))
        self.final_reached = bool(state_dict.get("final_reached", False))


# -- quantisation -------------------------------------------------------------------------------
def quantize_dynamic_int8(model: nn.Module) -> tuple[nn.Module, list[str], list[str]]:
    """A CPU copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8; also the
    names of the quantised layers and of the Conv layers left in fp32."""
    fp32 = copy.deepcopy(model).cpu().eval()
    make_permanent(fp32)
    linear = [n for n, m in fp32.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in fp32.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d,
                                                                   nn.Conv3d))]
    quantized = torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear}, dtype=torch.qint8)
    return quantized, linear, convs


