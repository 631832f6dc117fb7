"""Compress a distilled student: magnitude pruning to a target sparsity, then dynamic int8.

**Pruning** is global unstructured magnitude pruning (``torch.nn.utils.prune``) of the weights
of every ``Conv*d`` and ``Linear`` layer of the student: the ``round(amount × N)`` weights of
smallest magnitude over all those layers together are masked to zero (biases and BatchNorm
stay dense). Two schedules (``compress.prune.schedule``):

- ``during``: the gradual schedule of Zhu & Gupta 2017, "To prune, or not to prune: exploring
  the efficacy of pruning for model compression": the sparsity after ``e`` completed epochs is
  ``s_e = s_f (1 - (1 - (e - start_epoch) / (end_epoch - start_epoch))^3)`` for
  ``start_epoch <= e <= end_epoch`` (0 before, ``s_f`` after). The mask is updated at each
  epoch boundary, before the next epoch trains, so every validation (and checkpoint) sees a
  network that has trained one epoch under its mask; epochs ``end_epoch … max_epochs-1`` train
  at the final sparsity. Applied by :class:`MagnitudePruning`, a Lightning callback given to
  the student stage.
- ``after``: the student is distilled dense, pruned one-shot to ``s_f`` (Han et al. 2015,
  "Learning both Weights and Connections for Efficient Neural Networks"), then distilled
  ``finetune_epochs`` more with the mask fixed.

**Best checkpoint and ramping sparsity.** The student stage tests its best-validation
checkpoint. A network that is still dense or half pruned validates better than the final one,
so only checkpoints at the final sparsity compete: when the final mask is applied the callback
forgets the best checkpoint so far (and deletes its file). **Checkpoint format**: the callback
writes checkpoints with plain ``weight`` keys (``weight_orig × weight_mask``: zeros where
pruned) instead of ``weight_orig``/``weight_mask``, and makes the pruning permanent
(``prune.remove``) when training ends, so the best checkpoint loads for the test, into
``kdlab-eval`` and into any dense copy of the model; resuming re-derives the mask (the pruned
weights are the exact zeros, the smallest magnitudes).

**Quantisation** (``compress.quantize: dynamic_int8``): ``torch.ao.quantization.quantize_dynamic``
of the ``nn.Linear`` layers (int8 weights, activations quantised on the fly; Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference"). Convolutions have no dynamic int8 kernel and stay fp32; the report lists both.

:func:`compression_report` measures the dense fp32, pruned and pruned+int8 students on the CPU:
test accuracy (the whole test set), non-zero parameters, size on disk and latency.
"""

from __future__ import annotations

import copy
import io
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.build import build_model, build_strategy
from kdlab.engine.cache import INFERENCE_BATCH
from kdlab.engine.fit import fit_stage
from kdlab.modes.runner import model_name, stage_entry
from kdlab.util.errors import KdlabError
from kdlab.util.measure import cpu_latency_ms

log = logging.getLogger(__name__)

SCHEDULES = ("during", "after")
QUANTIZE = ("dynamic_int8",)
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# -- pruning ------------------------------------------------------------------------------------
def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Conv/Linear layer whose ``weight`` is pruned."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]


def _weight(module: nn.Module) -> torch.Tensor:
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
        score = _weight(module).abs().flatten().float()
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
        n = _weight(module).numel()
        if not hasattr(module, "weight_mask"):
            prune.identity(module, "weight")
        mask = keep[offset:offset + n].view_as(module.weight_mask).to(module.weight_mask)
        module.weight_mask.copy_(mask)
        module.weight_orig.data.mul_(mask)  # cleaner state: the pruned values are zero too
        offset += n
    return n_prune


def make_permanent(model: nn.Module) -> None:
    """``prune.remove`` on every pruned layer: plain ``weight`` parameters with zeros."""
    for _, module in prunable_weights(model):
        if hasattr(module, "weight_mask"):
            prune.remove(module, "weight")


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over the Conv/Linear layers of ``model`` (int8 ones included)."""
    weights = list(_layer_weights(model))
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
    student: at the start of each training epoch ``e`` the mask is raised to ``s_e``; at the
    final sparsity the best checkpoint so far is forgotten (only checkpoints at the final
    sparsity compete); checkpoints hold plain ``weight`` keys; when training ends the pruning is
    made permanent. ``start_epoch == end_epoch == 0`` prunes once, before the first epoch (the
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
        if epoch >= self.end_epoch and not self.final_reached:
            self.final_reached = True
            self._forget_best(trainer)

    def _reparametrised(self, pl_module: L.LightningModule) -> bool:
        return any(hasattr(m, "weight_mask") for _, m in prunable_weights(self._model(pl_module)))

    @staticmethod
    def _forget_best(trainer: L.Trainer) -> None:
        """Reset the best-by-metric checkpoint callbacks: checkpoints of a denser network
        do not compete with the ones at the final sparsity."""
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback.monitor is None:
                continue
            for path in list(callback.best_k_models):
                if trainer.is_global_zero and Path(path).is_file():
                    trainer.strategy.remove_checkpoint(path)
            callback.best_k_models = {}
            callback.best_model_path = callback.kth_best_model_path = ""
            callback.best_model_score = None
            callback.kth_value = torch.tensor(
                float("inf") if callback.mode == "min" else -float("inf"))

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


# -- measurements -------------------------------------------------------------------------------
def _layer_weights(model: nn.Module) -> Iterator[torch.Tensor]:
    """The effective weights of the Conv/Linear layers of ``model``, fp32 or (dequantised)
    dynamically quantised int8."""
    for module in model.modules():
        if isinstance(module, PRUNABLE):
            yield _weight(module)
        elif hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            yield module.weight().dequantize()


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every weight of ``model``: its parameters and the int8 weights (dequantised) and biases
    of dynamically quantised Linear layers."""
    yield from (p.detach() for p in model.parameters())
    for module in model.modules():
        if hasattr(module, "_packed_params") and hasattr(module, "weight") and callable(
                module.weight):
            yield module.weight().dequantize()
            if module.bias() is not None:
                yield module.bias().detach()


def nonzero_parameters(model: nn.Module) -> tuple[int, int]:
    """``(non-zero, total)`` weights of ``model`` (quantised Linear layers included)."""
    tensors = list(_tensors(model))
    return sum(int((t != 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


def _saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def disk_size(model: nn.Module, sparse: bool = False) -> dict[str, int]:
    """Bytes of ``torch.save(model.state_dict())`` and of the same deflated (zlib level 9);
    with ``sparse`` also the bytes of a saved bitmask + non-zero values encoding of every fp32
    Conv/Linear weight (one bit per weight, 4 bytes per non-zero; other tensors as they are)."""
    if any(hasattr(m, "weight_mask") for _, m in prunable_weights(model)):
        model = copy.deepcopy(model)
        make_permanent(model)
    state = {k: v.cpu() if isinstance(v, torch.Tensor) else v
             for k, v in model.state_dict().items()}
    raw = _saved(state)
    sizes = {"bytes": len(raw), "zipped_bytes": len(zlib.compress(raw, 9))}
    if sparse:
        pruned = {f"{n}.weight" if n else "weight" for n, _ in prunable_weights(model)}
        encoded: dict[str, Any] = {}
        for key, value in state.items():
            if key in pruned and isinstance(value, torch.Tensor) and value.is_floating_point():
                flat = value.flatten()
                bits = np.packbits((flat != 0).numpy())
                encoded[key] = (torch.from_numpy(bits), flat[flat != 0].clone(),
                                tuple(value.shape))
            else:
                encoded[key] = value
        sizes["sparse_bytes"] = len(_saved(encoded))
    return sizes


@torch.no_grad()
def cpu_accuracy(model: nn.Module, data: InMemoryDataModule, channels_last: bool,
                 batch_size: int = INFERENCE_BATCH) -> float:
    """Test accuracy of ``model`` on the CPU over the whole test split of ``data``."""
    model = model.cpu().eval()
    correct = 0
    for start in range(0, len(data.x_test), batch_size):
        x = data.x_test[start:start + batch_size].cpu()
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(-1) == data.y_test[start:start + batch_size].cpu())
                       .sum())
    return correct / len(data.x_test)


class _Anchored(nn.Module):
    """Wraps a model without parameters (a fully quantised MLP) so that
    :func:`kdlab.util.report.cpu_latency_ms` can read its device."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def measure(model: nn.Module, data: InMemoryDataModule, latency: tuple,
            sparse: bool = False) -> dict[str, Any]:
    """Test accuracy, non-zero parameters, size on disk and CPU latency of one model."""
    input_shape, latency_cfg, channels_last = latency
    nonzero, total = nonzero_parameters(model)
    timed = model if any(True for _ in model.parameters()) else _Anchored(model)
    return {
        "test_acc": cpu_accuracy(model, data, channels_last),
        "params": total,
        "nonzero_params": nonzero,
        "sparsity": sparsity(model),
        **disk_size(model, sparse=sparse),
        "latency_ms": cpu_latency_ms(timed, tuple(input_shape),
                                     batch_size=int(latency_cfg["batch_size"]),
                                     repeats=int(latency_cfg["repeats"]),
                                     channels_last=channels_last),
        "latency_batch_size": int(latency_cfg["batch_size"]),
        "latency_threads": torch.get_num_threads(),
    }


def compression_report(dense: nn.Module | None, pruned: nn.Module | None,
                       quantize: str | None, data: InMemoryDataModule,
                       latency: tuple) -> dict[str, Any]:
    """Measurements (:func:`measure`, on the CPU) of the dense fp32 student, the pruned student
    and the int8 student (the pruned one quantised, or the dense one without pruning); a model
    given as ``None`` is left out. Sizes: ``bytes`` of the saved state_dict, ``zipped_bytes``
    (zlib -9 of it), and for the pruned model ``sparse_bytes`` (bitmask + non-zero values)."""
    models: dict[str, Any] = {}
    if dense is not None:
        models["dense"] = measure(dense, data, latency, sparse=pruned is not None)
    if pruned is not None:
        models["pruned"] = measure(pruned, data, latency, sparse=True)
    report: dict[str, Any] = {"models": models}
    source = pruned if pruned is not None else dense
    if quantize == "dynamic_int8" and source is not None:
        quantized, linear, convs = quantize_dynamic_int8(source)
        name = "pruned_int8" if pruned is not None else "dense_int8"
        models[name] = measure(quantized, data, latency)
        report["quantized_modules"] = linear
        report["fp32_modules"] = convs
    return report


# -- config and the offline mode's use of it ----------------------------------------------------
class Compression:
    """``cfg.compress`` checked, and the steps the offline mode runs around its student stage:
    :meth:`callbacks` for the student stage (``schedule: during``), then :meth:`run`, which
    trains what else is needed (the dense reference, or the one-shot prune and finetune), measures
    and adds ``results["compress"]`` and the compressed stages to ``results["stages"]``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        node = cfg.get("compress") or {}
        self.prune = node.get("prune")
        self.quantize = node.get("quantize")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise KdlabError(f"compress.quantize={self.quantize} is not supported: use "
                             f"{', '.join(QUANTIZE)} or null")
        self.pruning: MagnitudePruning | None = None
        if self.prune is None:
            return
        p = self.prune
        amount = p.get("amount")
        if not isinstance(amount, (int, float)) or not 0 <= float(amount) < 1:
            raise KdlabError(f"compress.prune.amount={amount} must be a sparsity in [0, 1)")
        if p.get("schedule") not in SCHEDULES:
            raise KdlabError(f"compress.prune.schedule={p.get('schedule')} must be one of "
                             f"{', '.join(SCHEDULES)}")
        epochs = cfg.trainer.get("max_epochs")
        epochs = int(epochs) if epochs is not None and int(epochs) >= 0 else None
        if p.schedule == "during":
            start, end = int(p.get("start_epoch", 0)), int(p.get("end_epoch", 0))
            if start < 0:
                raise KdlabError(f"compress.prune.start_epoch={start} must be >= 0")
            if end < start:
                raise KdlabError(f"compress.prune.end_epoch={end} must be >= "
                                 f"compress.prune.start_epoch={start}")
            if epochs is not None and end >= epochs:
                raise KdlabError(f"compress.prune.end_epoch={end} must be < trainer.max_epochs="
                                 f"{epochs} (at least one epoch trains at the final sparsity)")
            self.pruning = MagnitudePruning(float(amount), start, end)
        elif int(p.get("finetune_epochs", 0)) < 0:
            raise KdlabError(f"compress.prune.finetune_epochs={p.finetune_epochs} must be >= 0")

    @property
    def active(self) -> bool:
        return self.prune is not None or self.quantize is not None

    def callbacks(self) -> list[Callback]:
        """The student stage's extra callbacks: the pruning schedule for ``during``."""
        return [self.pruning] if self.pruning is not None else []

    def _train(self, stage: str, run_dir: Path, student: nn.Module, data: InMemoryDataModule,
               teacher: nn.Module | None, latency: tuple, max_epochs: int | None = None,
               callbacks: list[Callback] = ()) -> dict[str, Any]:
        strategy = build_strategy(self.cfg) if teacher is not None else None
        result = fit_stage(self.cfg, stage, run_dir / stage, student, data, self.cfg.optimizer,
                           self.cfg.get("scheduler"), max_epochs=max_epochs, teacher=teacher,
                           strategy=strategy, callbacks=callbacks)
        return stage_entry(stage, model_name(self.cfg.student.model), student, result, latency)

    def run(self, results: dict[str, Any], run_dir: Path, student: nn.Module,
            data: InMemoryDataModule, teacher: nn.Module | None, latency: tuple) -> None:
        """After the student stage: the rest of the compression, measured into ``results``."""
        if not self.active:
            return
        dense = pruned = None
        dense_source = "the student stage"
        info: dict[str, Any] = {"quantize": self.quantize, "prune": None}
        if self.prune is None:
            dense = student
        elif self.prune.schedule == "during":
            pruned = student
            info["prune"] = {**dict(self.prune), "history": self.pruning.history}
            if self.prune.get("dense_reference", True):
                log.info("compress: the dense reference, same initialisation and budget")
                L.seed_everything(int(self.cfg.seed), workers=True, verbose=False)
                dense = build_model(self.cfg.student.model, data, "student.model")
                if self.pruning.initial_state is not None:  # e.g. student.init_from_teacher
                    dense.load_state_dict(self.pruning.initial_state)
                results["stages"].append(self._train("student_dense", run_dir, dense, data,
                                                     teacher, latency))
                dense_source = "the student_dense stage (same initial weights, no pruning)"
            else:
                dense_source = None
        else:  # after: one shot, then distil with the mask fixed
            dense = copy.deepcopy(student)
            epochs = int(self.prune.get("finetune_epochs", 0))
            pruning = MagnitudePruning(float(self.prune.amount), 0, 0)
            if epochs > 0:
                results["stages"].append(self._train("student_pruned", run_dir, student, data,
                                                     teacher, latency, max_epochs=epochs,
                                                     callbacks=[pruning]))
            else:
                with torch.no_grad():
                    global_magnitude_prune(student, float(self.prune.amount))
                make_permanent(student)
            pruned = student
            info["prune"] = dict(self.prune)
        report = compression_report(dense, pruned, self.quantize, data, latency)
        report.update(info, dense_source=dense_source)
        results["compress"] = report
        for name, entry in report["models"].items():
            if name.endswith("int8"):  # an evaluated (not trained) network: a stage of its own
                results["stages"].append({
                    "stage": f"student_{name}", "model": model_name(self.cfg.student.model),
                    "metrics": {"test/acc": entry["test_acc"]}, "params": entry["params"],
                    "latency_ms": entry["latency_ms"],
                    "latency_batch_size": entry["latency_batch_size"],
                    "latency_threads": entry["latency_threads"]})
        self._log(report)

    @staticmethod
    def _log(report: dict[str, Any]) -> None:
        for name, m in report["models"].items():
            log.info("compress: %-11s test acc %.4f, non-zero %d/%d, %d bytes (zipped %d), "
                     "%.2f ms", name, m["test_acc"], m["nonzero_params"], m["params"],
                     m["bytes"], m["zipped_bytes"], m["latency_ms"])


__all__ = ["Compression", "MagnitudePruning", "compression_report", "cubic_sparsity",
           "global_magnitude_prune", "make_permanent", "quantize_dynamic_int8", "sparsity"]
