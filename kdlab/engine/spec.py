"""What the engine is asked to do: a typed description of one training stage.

Modes read the config (:mod:`kdlab.modes.build`) and hand the engine a :class:`StageSpec`:
the networks, the data, the recipe, the strategy, the loop options and the output folder, as
objects. Nothing in the engine reads a ``DictConfig``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.loggers import Logger
from torch import nn

from kdlab.strategies.base import Strategy

#: what a NaN or infinite training loss does
NonFinite = Literal["stop", "skip", "off"]
NONFINITE_CHOICES = ("stop", "skip", "off")


@dataclass(frozen=True)
class Recipe:
    """How a stage optimises.

    Args:
        optimizer: ``params -> Optimizer`` (e.g. a Hydra ``_partial_`` of ``torch.optim.AdamW``).
        scheduler: ``optimizer -> LRScheduler`` or ``None``; a ``total_steps`` / ``T_max``
            argument it leaves unset is filled with the stage's number of optimizer steps, and
            it then steps every optimizer step (otherwise once per epoch).
        max_epochs: epochs of the stage.
    """

    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., Any] | None = None
    max_epochs: int = 1


@dataclass(frozen=True)
class LoopOptions:
    """How the engine's training loop (:mod:`kdlab.engine.loop`) runs its batches.

    Args:
        steps_per_call: batches per Lightning training step (each with its own optimizer step);
            above 1 Lightning's per-step overhead is paid once per chunk. The Trainer's
            arguments keep their meaning in batches (see :mod:`kdlab.engine.loop`).
        accumulate_grad_batches: batches whose gradients are summed before one optimizer step
            (``trainer.accumulate_grad_batches``).
        gradient_clip_val: clip gradients to this norm (or value) before each optimizer step
            (``trainer.gradient_clip_val``); ``None``: no clipping.
        gradient_clip_algorithm: ``norm`` or ``value``.
        nonfinite_loss: ``stop`` the run at a NaN / infinite loss, ``skip`` the batch, or ``off``.
    """

    steps_per_call: int = 1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    nonfinite_loss: NonFinite = "stop"


@dataclass(frozen=True)
class CacheOptions:
    """The teacher-output cache (:mod:`kdlab.engine.cache`).

    Args:
        enabled: ``auto`` (when exact), ``True`` (required: fail with the reason otherwise) or
            ``False``.
        dtype: ``float16``, ``bfloat16`` or ``float32`` of the stored outputs.
        folder: where entries are kept for later runs (``None``: memory only).
        max_mb: features are cached too when the strategy reads them and they fit (for a
            view bank: its ``views`` outputs per sample).
        views: under random augmentation or mixing, the augmented views per training sample
            whose outputs are computed once (:mod:`kdlab.data.views`); ``0``: the teacher
            runs live on fresh random views instead.
        view_seed: the seed the views' random parameters are drawn from (shared by every run
            of a sweep, so they share the bank).
        progress: show a progress bar while the outputs are computed.
        topk: keep only the ``k`` largest logits of each input and spread the rest of the
            probability evenly (:mod:`kdlab.engine.topk`); ``None``: every logit.
    """

    enabled: bool | Literal["auto"] = False
    dtype: str = "float16"
    folder: Path | None = None
    max_mb: float = 1024.0
    views: int = 0
    view_seed: int = 0
    progress: bool = False
    topk: int | None = None


@dataclass(frozen=True)
class OnPolicyOptions:
    """On-policy distillation of a language model (GKD: Agarwal et al., "On-Policy Distillation
    of Language Models: Learning from Self-Generated Mistakes", ICLR 2024), see
    :mod:`kdlab.engine.on_policy`; the config's ``on_policy.*``.

    Args:
        fraction: the share λ of training batches the student generates (0: off, 1: all).
        prompt: tokens of each training window kept as the prompt; the student writes the rest.
        temperature: of the student's sampling (0: greedy).
        top_k: sample among the ``k`` most likely tokens; ``None``: all.
        seed: which batches are generated and what is sampled follow from it and the step.
    """

    fraction: float = 0.0
    prompt: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class SequenceKDOptions:
    """Sequence-level knowledge distillation (Kim & Rush, "Sequence-Level Knowledge
    Distillation", EMNLP 2016), see :mod:`kdlab.engine.sequences`; the config's
    ``sequence_kd.*``.

    Args:
        prompt: tokens of each training window kept; the teacher writes the rest.
        temperature: 0: greedy (the teacher's most likely token at every step); > 0: sampled.
        top_k: sample among the ``k`` most likely tokens; ``None``: all.
        seed: of the sampling.
        folder: where generated windows are kept for later runs (``None``: this run only).
        progress: show a progress bar while the teacher generates.
    """

    prompt: int = 1
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    folder: Path | None = None
    progress: bool = False


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` of the student and / or the live teacher (``mode`` of torch.compile)."""

    student: bool = False
    teacher: bool = False
    mode: str | None = None


@dataclass
class StageSpec:
    """One stage: train ``student`` (from ``teacher`` with ``strategy``, if given) on ``data``.

    Args:
        name: the stage's name (``teacher``, ``student``, ``baseline``, ``gen1`` …): log
            prefixes, checkpoint hyper-parameters, messages.
        folder: the stage's folder: ``checkpoints/`` and ``logs/`` below it.
        student, teacher, strategy, data, recipe, loop: what is trained, from what and how.
        trainer: Lightning ``Trainer`` arguments in Lightning's meaning (``max_epochs`` comes
            from the recipe; callbacks, loggers and the folder from this spec).
        callbacks, loggers: built for this stage.
        cache, compile: the teacher-output cache and ``torch.compile`` options.
        on_policy: the share of batches the student generates (off by default).
        channels_last: feed conv nets NHWC tensors.
        hparams: plain containers saved in checkpoints (the run's resolved config).
        ckpt_path: continue from this checkpoint (a resumed run).
        test_last: also test the last epoch's weights (``last/test/acc``).
        monitor: the metric whose best checkpoint is tested and reported as the stage's
            ``val/acc`` (a pruned stage monitors the accuracy at its final sparsity).
    """

    name: str
    folder: Path
    student: nn.Module
    data: LightningDataModule
    recipe: Recipe
    loop: LoopOptions = field(default_factory=LoopOptions)
    teacher: nn.Module | None = None
    strategy: Strategy | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: Sequence[Callback] = ()
    loggers: Sequence[Logger] = ()
    cache: CacheOptions = field(default_factory=CacheOptions)
    compile: CompileOptions = field(default_factory=CompileOptions)
    on_policy: OnPolicyOptions = field(default_factory=OnPolicyOptions)
    channels_last: bool = False
    hparams: dict[str, Any] = field(default_factory=dict)
    ckpt_path: str | None = None
    test_last: bool = False
    monitor: str = "val/acc"
