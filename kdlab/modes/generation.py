"""The config's generated-text options for language models, read here and handed to the engine:
``on_policy.*`` (GKD's on-policy batches, :mod:`kdlab.engine.on_policy`) and ``sequence_kd.*``
(Kim & Rush's sequence-level KD, :mod:`kdlab.engine.sequences`).

Both are options of ``mode=offline``: the student stage trains on batches the student writes,
or on windows the teacher wrote. Every other mode refuses them (:func:`refuse_outside_offline`)
rather than ignoring them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from kdlab.engine.sequences import teacher_windows
from kdlab.engine.spec import OnPolicyOptions, SequenceKDOptions
from kdlab.util.errors import KdlabError
from kdlab.util.inputs import TokenShape

log = logging.getLogger(__name__)


def _number(value: Any, key: str, low: float, high: float | None, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(float(value)) or value < low or (high is not None and value > high):
        raise KdlabError(f"{key}={value!r} must be {what}")
    return float(value)


def _whole(value: Any, key: str, what: str, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KdlabError(f"{key}={value!r} must be {what}")
    return int(value)


def on_policy_options(cfg: DictConfig) -> OnPolicyOptions:
    """``cfg.on_policy`` checked (``fraction`` in [0, 1], a positive ``prompt``, ``temperature``
    >= 0, ``top_k`` >= 1 or null), seeded with the run's ``seed``. The checks that need the
    data and the strategy (text, ``prompt`` below ``data.context``, a logit strategy) are the
    engine's (:func:`kdlab.engine.on_policy.check_on_policy`)."""
    node = cfg.get("on_policy") or {}
    fraction = _number(node.get("fraction", 0.0), "on_policy.fraction", 0.0, 1.0,
                       "a number in [0, 1] (the share of batches the student generates)")
    if fraction == 0:
        return OnPolicyOptions()
    return OnPolicyOptions(
        fraction=fraction,
        prompt=_whole(node.get("prompt", 16), "on_policy.prompt", "a positive number of tokens"),
        temperature=_number(node.get("temperature", 1.0), "on_policy.temperature", 0.0, None,
                            "a number >= 0 (0: greedy)"),
        top_k=_whole(node.get("top_k"), "on_policy.top_k", "a number of tokens >= 1, or null",
                     nullable=True),
        seed=int(cfg.seed))


def sequence_kd_options(cfg: DictConfig) -> SequenceKDOptions | None:
    """``cfg.sequence_kd`` checked, or ``None`` when ``sequence_kd.enabled`` is false; the
    windows are kept in ``<paths.teacher_store>/sequences`` (with ``teacher_cache.disk``;
    never under ``trainer.fast_dev_run``)."""
    node = cfg.get("sequence_kd") or {}
    enabled = node.get("enabled", False)
    if not isinstance(enabled, bool):
        raise KdlabError(f"sequence_kd.enabled={enabled!r} must be true or false")
    if not enabled:
        return None
    seed = node.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KdlabError(f"sequence_kd.seed={seed!r} must be an integer")
    trainer = cfg.get("trainer") or {}
    quick = bool(trainer.get("fast_dev_run"))
    disk = (cfg.get("teacher_cache") or {}).get("disk", True)
    return SequenceKDOptions(
        prompt=_whole(node.get("prompt", 16), "sequence_kd.prompt",
                      "a positive number of tokens"),
        temperature=_number(node.get("temperature", 0.0), "sequence_kd.temperature", 0.0, None,
                            "a number >= 0 (0: greedy)"),
        top_k=_whole(node.get("top_k"), "sequence_kd.top_k", "a number of tokens >= 1, or null",
                     nullable=True),
        seed=seed,
        folder=Path(cfg.paths.teacher_store) / "sequences" if disk and not quick else None,
        progress=trainer.get("enable_progress_bar", True) is not False)


def refuse_outside_offline(cfg: DictConfig, mode: str) -> None:
    """``on_policy.fraction`` > 0 or ``sequence_kd.enabled`` with a mode other than offline
    fails naming the key (no other mode reads them)."""
    if mode == "offline":
        return
    fraction = (cfg.get("on_policy") or {}).get("fraction", 0)
    if fraction:
        raise KdlabError(f"on_policy.fraction={fraction} is an option of mode=offline (the "
                         f"distilled student generates its batches); mode={mode} does not "
                         "read it: set on_policy.fraction=0")
    if (cfg.get("sequence_kd") or {}).get("enabled"):
        raise KdlabError(f"sequence_kd.enabled=true is an option of mode=offline (the student "
                         f"trains on the teacher's windows); mode={mode} does not read it: set "
                         "sequence_kd.enabled=false")


def reads_features(strategy: Any) -> bool:
    """Whether a strategy (or a member of a composite) reads hidden states."""
    members = getattr(strategy, "members", None)
    parts = members.values() if members is not None else [strategy] if strategy else []
    return any(m.student_layers or m.teacher_layers for m in parts)


def check_sequence_kd(options: SequenceKDOptions, data: Any) -> None:
    """Sequence-level KD needs text, and a prompt that leaves tokens for the teacher to write:
    anything else fails naming the key (before any teacher is trained)."""
    if not isinstance(getattr(data, "input_shape", None), TokenShape) or \
            not hasattr(data, "use_training_windows"):
        raise KdlabError(f"sequence_kd.enabled=true: the teacher writes token sequences, but "
                         f"data={getattr(data, 'name', type(data).__name__)} is not text; "
                         "set sequence_kd.enabled=false (or use data=text)")
    context = int(data.input_shape[0])
    if not options.prompt < context:
        raise KdlabError(f"sequence_kd.prompt={options.prompt} must be below data.context="
                         f"{context}: the teacher writes the rest of each window")


def generation_device(cfg: DictConfig) -> torch.device:
    """Where the teacher generates before training: the GPU when the run's trainer may use
    one and there is one, else the CPU."""
    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def train_on_teacher_windows(cfg: DictConfig, options: SequenceKDOptions, teacher: nn.Module,
                             data: Any) -> dict[str, Any]:
    """Replace ``data``'s training windows by the teacher's continuations of their prompts
    (generated once, or reused from the store); validation and test keep the corpus. Returns
    the ``results.json`` entry describing them."""
    device = generation_device(cfg)
    before = next(teacher.parameters(), torch.empty(0)).device
    teacher.to(device)
    try:
        windows, info = teacher_windows(teacher, data.training_windows(), options)
    finally:
        teacher.to(before)
    data.use_training_windows(windows, f"the teacher (sequence-level KD, key {info['key']})")
    return info
