"""Train and test one network (a teacher, a distilled student or a baseline) as one stage.

:func:`fit_stage` takes a :class:`~kdlab.engine.spec.StageSpec` — what a mode built from its
config — builds the :class:`~kdlab.engine.module.DistillationModule` (and the teacher-output
cache), fits it with a Lightning ``Trainer`` and tests its best-validation checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kdlab.data.mix import check_stage
from kdlab.engine.cache import prepare_cache
from kdlab.engine.callbacks import Throughput
from kdlab.engine.checkpoint_io import AtomicCheckpointIO
from kdlab.engine.loop import trainer_arguments
from kdlab.engine.module import DistillationModule, as_rows, output_classes
from kdlab.engine.on_policy import check_on_policy
from kdlab.engine.spec import CompileOptions, StageSpec
from kdlab.util.errors import KdlabError
from kdlab.util.inputs import TokenShape
from kdlab.util.runtime import release_free_memory

log = logging.getLogger(__name__)

#: the fraction of skipped batches (``nonfinite_loss=skip``) above which a stage is flagged
SKIPPED_WARNING = 0.01


@dataclass
class StageResult:
    """What one stage produced: metrics and where its checkpoints are."""

    module: DistillationModule
    metrics: dict[str, float] = field(default_factory=dict)
    best_ckpt: str | None = None
    last_ckpt: str | None = None
    #: training samples/s of each epoch (empty without the Throughput callback)
    samples_per_s: list[float] = field(default_factory=list)


def compile_models(options: CompileOptions, module: DistillationModule) -> None:
    """``torch.compile`` the student and/or the live teacher (in place: parameter names and
    checkpoints are unchanged)."""
    if options.student:
        module.student.compile(mode=options.mode)
        log.info("compile: student compiled (mode %s)", options.mode or "default")
    if options.teacher and module.teacher is not None:
        if module.teacher_cache is not None:
            log.info("compile: teacher not compiled, its outputs come from the cache")
        else:
            module.teacher.compile(mode=options.mode)
            log.info("compile: teacher compiled (mode %s)", options.mode or "default")


def two_view_names(strategy: Any) -> str:
    """The ``distill.*`` names of the members that read a strong view (``views > 1``), for
    messages: ``distill=mlkd`` or ``distill=[mlkd,...]``'s ``mlkd``."""
    members = getattr(strategy, "members", None)
    if members is None:
        return type(strategy).__name__.lower()
    return ",".join(name for name, m in members.items() if m.views > 1)


def check_views(data: Any, strategy: Any, stage: str) -> None:
    """A strategy that reads a second, strong view (``Strategy.views = 2``) needs a datamodule
    that can draw it from in-memory batches, and unmixed batches (the strong view is of the
    sample, a mixed image has no label for its cross-entropy); anything else fails in one
    line."""
    if strategy is None or strategy.views <= 1:
        return
    name = two_view_names(strategy)
    if strategy.views > 2:
        raise KdlabError(f"distill={name} asks for {strategy.views} views per sample; kdlab "
                         "draws at most two (a weak and a strong one)")
    if isinstance(getattr(data, "input_shape", None), TokenShape):
        raise KdlabError(f"distill={name} trains on a second, strongly augmented view of every "
                         f"image; data={data.name} is text, which has no augmentation: use an "
                         "image dataset, or a one-view strategy (distill=kd, gkd, ...)")
    if not hasattr(data, "strong_view"):
        raise KdlabError(f"distill={name} trains on a second, strongly augmented view of every "
                         f"batch, which kdlab draws from in-memory batches only; data "
                         f"{type(data).__name__} streams its images from disk: use an "
                         "in-memory dataset (e.g. data=cifar100)")
    mix = getattr(data, "mix", "none")
    if mix != "none":
        raise KdlabError(f"data.mix={mix} with distill={name}: the strong view is drawn from "
                         "the unmixed images and its cross-entropy needs their labels; set "
                         "data.mix=none")


def build_module(spec: StageSpec, caches: dict[tuple[str, ...], Any] | None = None,
                 compile_teacher: bool = True) -> DistillationModule:
    """The stage's LightningModule: student, frozen teacher, strategy (its connectors built
    from a dry forward pass) and, when exact, the teacher-output cache. ``caches``: caches
    already built for this teacher and data, by the teacher layers they hold (the members of
    a pack share them); ``compile_teacher=False`` leaves the teacher as it is (a pack compiles
    its shared teacher once)."""
    data = spec.data
    data.setup()
    check_views(data, spec.strategy, spec.name)  # a strong view: in-memory, unmixed data
    check_stage(data, spec.strategy, spec.name)  # mixed batches need soft targets only
    example = data.example_input(2)
    module = DistillationModule(
        student=spec.student,
        num_classes=output_classes(spec.student, data.num_classes, example),
        optimizer=spec.recipe.optimizer,
        scheduler=spec.recipe.scheduler,
        teacher=spec.teacher,
        strategy=spec.strategy,
        channels_last=spec.channels_last,
        hparams={"stage": spec.name, "config": spec.hparams},
        example_input=example,
        num_train_samples=data.num_train_samples,
        loop=spec.loop,
        on_policy=spec.on_policy,
    )
    module.has_unlabelled = data.has_unlabelled
    tapped = any(taps is not None and taps.paths
                 for taps in (module.student_taps, module.teacher_taps))
    check_on_policy(spec.on_policy, data, spec.strategy, tapped)
    module.target_bytes = getattr(data, "target_bytes", None)
    if spec.strategy is not None and spec.strategy.needs_teacher:
        taps = module.teacher_taps
        key = tuple(taps.paths) if taps is not None else ()
        if spec.strategy.views > 1:  # a fresh strong view every step: nothing to cache
            name = two_view_names(spec.strategy)
            if spec.cache.enabled is True:
                raise KdlabError(f"teacher_cache.enabled=true but distill={name} shows the "
                                 "teacher a fresh strongly augmented view of every batch, "
                                 "which no cache of its outputs can hold: set "
                                 "teacher_cache.enabled=auto or false")
            if spec.cache.enabled is not False:
                log.info("Teacher cache: off, the teacher runs every step (distill=%s shows "
                         "it a fresh strong view of every batch)", name)
            module.teacher_cache = None
        elif caches is not None and key in caches:
            module.teacher_cache = caches[key]
        else:
            module.teacher_cache = prepare_cache(spec.cache, module.teacher, taps, data,
                                                 spec.channels_last,
                                                 quick=bool(spec.trainer.get("fast_dev_run")))
            if caches is not None:
                caches[key] = module.teacher_cache
    options = spec.compile
    if not compile_teacher:
        options = CompileOptions(student=options.student, teacher=False, mode=options.mode)
    compile_models(options, module)
    return module


def fit_stage(spec: StageSpec) -> StageResult:
    """Fit ``spec.student`` (distilling from ``spec.teacher`` with ``spec.strategy`` if given),
    then test the checkpoint with the best validation accuracy (the last weights if there is
    none)."""
    return fit_module(spec, build_module(spec))


def build_trainer(spec: StageSpec, module: L.LightningModule,
                  checkpoint_io: AtomicCheckpointIO | None = None
                  ) -> tuple[L.Trainer, LightningDataModule]:
    """The stage's Trainer (``spec.trainer`` in Lightning's meaning, translated for the chunked
    loop by :func:`kdlab.engine.loop.trainer_arguments`) and the datamodule to fit it on;
    ``checkpoint_io``: how checkpoints are written (default :class:`AtomicCheckpointIO`)."""
    args, data = trainer_arguments(dict(spec.trainer), module.loop.steps_per_call, spec.data)
    args["max_epochs"] = spec.recipe.max_epochs
    try:
        # checkpoints renamed into place in their folder, never copied from /tmp
        args["plugins"] = [*(args.get("plugins") or []), checkpoint_io or AtomicCheckpointIO()]
        trainer = L.Trainer(**args, callbacks=list(spec.callbacks),
                            logger=list(spec.loggers) or False,
                            default_root_dir=str(spec.folder))
    except (TypeError, ValueError, MisconfigurationException) as e:  # Lightning's checks
        detail = " ".join(str(e).split())[:300]
        raise KdlabError(f"trainer could not be built: {detail}") from None
    return trainer, data


def fit_module(spec: StageSpec, module: DistillationModule) -> StageResult:
    """Fit an already built ``module`` (a :class:`DistillationModule` or a subclass, e.g. a
    cohort) with the spec's Trainer, data, callbacks and loggers, and test its best-validation
    checkpoint."""
    spec.data.setup()
    trainer, data = build_trainer(spec, module)
    strategy = module.strategy
    strong = strategy.strong_augment if strategy is not None and strategy.views > 1 else None
    with showing_views(spec.data, getattr(module.teacher_cache, "bank", None), spec.name,
                       strong):
        trainer.fit(module, datamodule=data, ckpt_path=spec.ckpt_path)
    speed = next((c.history for c in trainer.callbacks if isinstance(c, Throughput)), [])
    return finish_stage(spec, module, trainer, data, trainer.checkpoint_callbacks,
                        trainer.current_epoch, list(speed))


@contextmanager
def showing_views(data: Any, bank: Any, name: str, strong: Any = None) -> Iterator[None]:
    """While a stage fits: its batches show the stored views whose teacher outputs the cache
    holds (``bank``), or fresh random ones without a view bank, and carry a strong view drawn
    by ``strong`` (a :class:`~kdlab.data.randaugment.StrongAugment`, for a strategy with
    ``views = 2``; ``None``: none); set for every stage and cleared after it, as stages share
    a datamodule (the no-teacher baseline of a run trains on one view). The data's description
    goes to the log."""
    if hasattr(data, "view_bank"):
        data.view_bank = bank
    if hasattr(data, "strong_view"):
        data.strong_view = strong
    elif strong is not None:
        raise KdlabError(f"[{name}] the strategy reads a strong view that the datamodule "
                         f"{type(data).__name__} cannot draw")
    if hasattr(data, "describe"):
        log.info("[%s] %s", name, data.describe())
    try:
        yield
    finally:
        if hasattr(data, "view_bank"):
            data.view_bank = None
        if hasattr(data, "strong_view"):
            data.strong_view = None


def finish_stage(spec: StageSpec, module: DistillationModule, tester: L.Trainer,
                 data: LightningDataModule, checkpoints: list[Any], epochs: int,
                 speed: list[float]) -> StageResult:
    """The result of a fitted stage: the best-validation and last checkpoints of
    ``checkpoints`` (its ``ModelCheckpoint`` callbacks), the test of the best one by ``tester``
    (logged to that Trainer's loggers), the epochs, ``speed`` and the skipped batches."""
    # read the checkpoint callback before testing: restoring the best checkpoint for the test
    # also restores the callback's state as it was when that checkpoint was written
    best = last = None
    metrics: dict[str, Any] = {}
    for callback in checkpoints:
        if not isinstance(callback, ModelCheckpoint) or not callback.best_model_path:
            continue
        if callback.monitor is None:  # saves every epoch: its latest file is the last
            last = callback.best_model_path
        elif best is None and callback.monitor == spec.monitor:
            best = callback.best_model_path
            if callback.best_model_score is not None:  # the best checkpoint's val/acc
                metrics["val/acc"] = float(callback.best_model_score)
    last_acc = test_accuracy(module, spec.data) if spec.test_last else None
    # read before the test, whose loading of the best checkpoint restores that one's count
    on_policy = module.on_policy_batches if getattr(module, "on_policy", None) else None
    test = tester.test(module, datamodule=data, ckpt_path=best, verbose=False)
    metrics.update(test[0] if test else {})
    release_free_memory()  # the stage's freed activations, before the next stage allocates
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["epochs"] = epochs
    if on_policy is not None:  # training batches the student generated (on_policy.fraction)
        metrics["on_policy_batches"] = on_policy
    if last_acc is not None:
        metrics["last/test/acc"] = last_acc
    skipped = getattr(module, "skipped_batches", 0)
    if skipped:  # nonfinite_loss=skip dropped batches: say how many, loudly past 1%
        seen = max(1, getattr(module, "_batches_seen", skipped))
        metrics["skipped_batches"] = skipped
        metrics["skipped_fraction"] = skipped / seen
        if skipped / seen > SKIPPED_WARNING:
            log.warning("[%s] %d of %d training batches (%.1f%%) were skipped for a non-finite "
                        "loss: this stage's result is not that of a normal training",
                        spec.name, skipped, seen, 100 * skipped / seen)
    return StageResult(module=module, metrics=metrics, best_ckpt=best, last_ckpt=last,
                       samples_per_s=speed)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Any, num_classes: int, device: torch.device | None = None,
             channels_last: bool = False) -> float:
    """Top-1 accuracy (torchmetrics) of ``model`` in eval mode over ``(x, y, …)`` batches (a
    language model's: over its tokens, counted over its own outputs when its vocabulary is
    wider than ``num_classes``); the model's training mode is restored."""
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    metric = None
    was_training = model.training
    model.eval()
    for x, y, *_ in batches:
        x = x.to(device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits, y = as_rows(model(x)), as_rows(y.to(device))
        if metric is None:
            classes = max(num_classes, logits.shape[-1]) if not x.is_floating_point() \
                else num_classes
            metric = MulticlassAccuracy(num_classes=classes, average="micro").to(device)
        metric.update(logits, y)
    model.train(was_training)
    return float(metric.compute()) if metric is not None and metric.update_count else 0.0


def test_accuracy(module: DistillationModule, data: LightningDataModule) -> float:
    """Test accuracy of ``module``'s current weights (after a fit: the last epoch's), computed
    directly rather than through ``trainer.test`` so the loggers see one test per stage."""
    return accuracy(module, data.test_dataloader(), data.num_classes, module.device)
