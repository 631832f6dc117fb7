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
test accuracy (the whole test set), parameters and non-zero parameters, size on disk and
latency. The latencies are measured side by side, in one process, after all the training: the
models take turns on the same batch, round after round in alternating order, and each gets the
median of its rounds (:func:`side_by_side_latency_ms`); timed one after the other, minutes
apart, the same network can measure twice as slow. The stage entries of these networks take the
side-by-side latency and the non-zero count, and the log prints the report as a table.
"""

from __future__ import annotations

import copy
import io
import logging
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.compression import (
    FINAL_METRIC,
    MagnitudePruning,
    global_magnitude_prune,
    make_permanent,
    prunable_weights,
    quantize_dynamic_int8,
    sparsity,
)
from kdlab.engine.fit import accuracy
from kdlab.modes.build import build_model, build_strategy
from kdlab.modes.runner import model_name, stage_entry, train_stage
from kdlab.util.errors import KdlabError
from kdlab.util.measure import side_by_side_latency_ms
from kdlab.util.report import markdown

log = logging.getLogger(__name__)

SCHEDULES = ("during", "after")
QUANTIZE = ("dynamic_int8",)


# -- measurements -------------------------------------------------------------------------------
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


def cpu_accuracy(model: nn.Module, data: InMemoryDataModule, channels_last: bool) -> float:
    """Test accuracy of ``model`` on the CPU over the whole test split of ``data``."""
    return accuracy(model.cpu(), data.test_dataloader(), data.num_classes, torch.device("cpu"),
                    channels_last)


def _deployable(model: nn.Module) -> nn.Module:
    """``model`` as it would be deployed: a copy with the pruning made permanent when its
    layers are still reparametrised (``weight_orig × weight_mask`` on every forward pass)."""
    if any(hasattr(m, "weight_mask") for _, m in prunable_weights(model)):
        model = copy.deepcopy(model)
        make_permanent(model)
    return model


@torch.no_grad()
def measure(model: nn.Module, data: InMemoryDataModule, channels_last: bool,
            sparse: bool = False) -> dict[str, Any]:
    """Test accuracy, parameters and non-zero parameters, sparsity and size on disk of one
    model (its latency is measured beside the others: :func:`side_by_side_latency_ms`)."""
    nonzero, total = nonzero_parameters(model)
    return {
        "test_acc": cpu_accuracy(model, data, channels_last),
        "params": total,
        "nonzero_params": nonzero,
        "sparsity": sparsity(model),
        **disk_size(model, sparse=sparse),
    }


def compression_report(dense: nn.Module | None, pruned: nn.Module | None,
                       quantize: str | None, data: InMemoryDataModule,
                       latency: tuple) -> dict[str, Any]:
    """Measurements (:func:`measure`, on the CPU) of the dense fp32 student, the pruned student
    and the int8 student (the pruned one quantised, or the dense one without pruning); a model
    given as ``None`` is left out. Sizes: ``bytes`` of the saved state_dict, ``zipped_bytes``
    (zlib -9 of it), and for the pruned model ``sparse_bytes`` (bitmask + non-zero values).
    ``params`` counts every weight, ``nonzero_params`` those that are not zero. The latencies
    of all the models are measured together, interleaved (:func:`side_by_side_latency_ms`),
    with ``latency`` = ``(input_shape, {batch_size, repeats}, channels_last)``."""
    input_shape, latency_cfg, channels_last = latency
    networks: dict[str, nn.Module] = {}
    models: dict[str, Any] = {}
    if dense is not None:
        networks["dense"] = dense
        models["dense"] = measure(dense, data, channels_last, sparse=pruned is not None)
    if pruned is not None:
        networks["pruned"] = _deployable(pruned)
        models["pruned"] = measure(pruned, data, channels_last, sparse=True)
    report: dict[str, Any] = {"models": models}
    source = pruned if pruned is not None else dense
    if quantize == "dynamic_int8" and source is not None:
        quantized, linear, convs = quantize_dynamic_int8(source)
        name = "pruned_int8" if pruned is not None else "dense_int8"
        networks[name] = quantized
        models[name] = measure(quantized, data, channels_last)
        report["quantized_modules"] = linear
        report["fp32_modules"] = convs
    batch_size, repeats = int(latency_cfg["batch_size"]), int(latency_cfg["repeats"])
    timed = side_by_side_latency_ms(networks, tuple(input_shape), batch_size, repeats,
                                    channels_last=channels_last)
    for name, entry in models.items():
        entry.update(latency_ms=timed[name], latency_batch_size=batch_size,
                     latency_threads=torch.get_num_threads())
    report["latency"] = {"method": "side by side: one process, the models interleaved in "
                                   "alternating order, median of each",
                         "batch_size": batch_size, "repeats": repeats,
                         "threads": torch.get_num_threads()}
    return report


#: columns of :func:`report_table`
REPORT_HEADERS = ["model", "test acc %", "params", "non-zero params", "sparsity %",
                  "state_dict KB", "zipped KB", "bitmask+values KB", "CPU ms/batch"]


def report_table(report: Mapping[str, Any]) -> str:
    """The compression report as a Markdown table, a row per model: test accuracy, parameters
    and non-zero parameters side by side, sparsity, sizes and the side-by-side latency."""
    rows = []
    for name, m in report["models"].items():
        sparse = m.get("sparse_bytes")
        rows.append([name, f"{100 * m['test_acc']:.2f}", f"{m['params']:,}",
                     f"{m['nonzero_params']:,}", f"{100 * m['sparsity']:.1f}",
                     f"{m['bytes'] / 1024:.1f}", f"{m['zipped_bytes'] / 1024:.1f}",
                     "—" if sparse is None else f"{sparse / 1024:.1f}", f"{m['latency_ms']:.2f}"])
    return markdown(REPORT_HEADERS, rows)


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

    @property
    def monitor(self) -> str:
        """What the student stage's best checkpoint monitors: the accuracy at the final
        sparsity when it prunes (:data:`~kdlab.engine.compression.FINAL_METRIC`)."""
        return FINAL_METRIC if self.pruning is not None else "val/acc"

    def _train(self, stage: str, run_dir: Path, student: nn.Module, data: InMemoryDataModule,
               teacher: nn.Module | None, latency: tuple, max_epochs: int | None = None,
               callbacks: list[Callback] = ()) -> dict[str, Any]:
        strategy = build_strategy(self.cfg) if teacher is not None else None
        result = train_stage(self.cfg, stage, run_dir / stage, student, data, self.cfg.optimizer,
                             self.cfg.get("scheduler"), max_epochs=max_epochs, teacher=teacher,
                             strategy=strategy, callbacks=callbacks,
                             monitor=FINAL_METRIC if callbacks else "val/acc")
        return stage_entry(stage, model_name(self.cfg.student.model), student, result, latency)

    def run(self, results: dict[str, Any], run_dir: Path, student: nn.Module,
            data: InMemoryDataModule, teacher: nn.Module | None, latency: tuple) -> None:
        """After the student stage: the rest of the compression, measured into ``results``."""
        if not self.active:
            return
        dense = pruned = None
        dense_source = "the student stage"
        info: dict[str, Any] = {"quantize": self.quantize, "prune": None}
        #: the stage of results["stages"] that each measured network is
        stage_of = {"dense": "student"}
        if self.prune is None:
            dense = student
        elif self.prune.schedule == "during":
            pruned = student
            stage_of = {"pruned": "student", "dense": "student_dense"}
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
                stage_of["pruned"] = "student_pruned"
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
                stage_of[name] = f"student_{name}"
        share_measurements(results["stages"], report, stage_of)
        self._log(report)

    @staticmethod
    def _log(report: dict[str, Any]) -> None:
        lat = report["latency"]
        log.info("compress: CPU ms per batch of %d measured side by side (%d threads, median of "
                 "%d interleaved repeats each); params counts every weight, non-zero params "
                 "those left after pruning\n%s", lat["batch_size"], lat["threads"],
                 lat["repeats"], report_table(report))


def share_measurements(stages: list[dict[str, Any]], report: Mapping[str, Any],
                       stage_of: Mapping[str, str]) -> None:
    """Give each stage entry that is a network of the compression report (``stage_of``: report
    name → stage name) the report's side-by-side latency and its non-zero parameter count, so
    that the run's table compares the dense and compressed students as measured together."""
    by_name = {entry.get("stage"): entry for entry in stages}
    for name, stage in stage_of.items():
        entry, measured = by_name.get(stage), report["models"].get(name)
        if entry is None or measured is None:
            continue
        entry.update(nonzero_params=measured["nonzero_params"],
                     latency_ms=measured["latency_ms"],
                     latency_batch_size=measured["latency_batch_size"],
                     latency_threads=measured["latency_threads"],
                     latency_measured="side by side with the other compressed models")
