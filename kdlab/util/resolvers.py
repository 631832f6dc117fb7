"""Config resolvers kdlab registers with OmegaConf.

``${scaled_lr:BASE_LR,BASE_BATCH}`` is the linear scaling rule (Goyal et al. 2017): a recipe
published for a global batch of ``BASE_BATCH`` gets
``BASE_LR × data.batch_size × trainer.devices × trainer.num_nodes ×
trainer.accumulate_grad_batches / BASE_BATCH``. A third argument replaces ``data.batch_size``:
a teacher's recipe scales with its own batch,
``${scaled_lr:0.05,64,${teacher.train.batch_size}}``. The CIFAR and ImageNet recipes
(``conf/experiment/``) write their learning rates this way, so changing the batch size or the
number of GPUs keeps the recipe's LR per sample; the resolved value is in the run's saved
config and in the log. Write a number instead of the resolver to opt out.

``${after_pre_stage:N}`` is ``N`` plus the longest pre-stage (``init_epochs``) of the strategies
in ``distill``, and ``${after_pre_stage:[a,b,c]}`` each milestone moved by it: a recipe of ``N``
epochs keeps ``N`` epochs of its main stage when a staged method (AB, FSP, FT, FitNets with
``init_epochs``) runs its initialisation first, as RepDistiller does (30 + 240 epochs). The
CIFAR-100 recipe writes ``trainer.max_epochs`` and its milestones this way.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from kdlab.util.errors import KdlabError


def global_batch_size(root: Any, batch_size: int | None = None) -> int:
    """Samples per optimizer step over all processes: batch (``data.batch_size`` unless
    given) × devices × nodes × accumulation."""
    trainer = root.get("trainer") or {}
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise KdlabError(f"trainer.devices={devices} must be a number of devices (or a list of "
                         "them) for ${scaled_lr:...} to know the global batch size")
    nodes = int(trainer.get("num_nodes", 1) or 1)
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    batch = int(root.data.batch_size if batch_size is None else batch_size)
    return batch * devices * nodes * accumulate


def scaled_lr(base_lr: float, base_batch_size: int, batch_size: int | None = None, *,
              _root_: Any) -> float:
    """``base_lr`` scaled linearly from a global batch of ``base_batch_size`` to this run's
    (with ``batch_size`` per process instead of ``data.batch_size`` when given)."""
    if float(base_batch_size) <= 0:
        raise KdlabError(f"${{scaled_lr:{base_lr},{base_batch_size}}}: the base batch size "
                         "must be positive")
    return float(base_lr) * global_batch_size(_root_, batch_size) / float(base_batch_size)


def pre_stage_epochs(root: Any) -> int:
    """The longest ``init_epochs`` among the strategies of ``root.distill`` (0 without any)."""
    distill = root.get("distill") if hasattr(root, "get") else None
    if not distill or not hasattr(distill, "items"):
        return 0
    longest = 0
    for name, member in distill.items():
        value = member.get("init_epochs", 0) if hasattr(member, "get") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KdlabError(f"distill.{name}.init_epochs={value} must be an integer >= 0 "
                             "(epochs of the method's pre-stage)")
        longest = max(longest, value)
    return longest


def after_pre_stage(epochs: Any, *, _root_: Any) -> Any:
    """``epochs`` (a number, or a list of milestones) moved later by the longest pre-stage of
    the configured strategies."""
    shift = pre_stage_epochs(_root_)
    if isinstance(epochs, (list, tuple)) or OmegaConf.is_list(epochs):
        return [int(e) + shift for e in epochs]
    if isinstance(epochs, bool) or not isinstance(epochs, int):
        raise KdlabError(f"${{after_pre_stage:{epochs}}}: give a number of epochs or a list of "
                         "milestones")
    return epochs + shift


def register() -> None:
    """Register kdlab's resolvers (once per process)."""
    if not OmegaConf.has_resolver("scaled_lr"):
        OmegaConf.register_new_resolver("scaled_lr", scaled_lr)
    if not OmegaConf.has_resolver("after_pre_stage"):
        OmegaConf.register_new_resolver("after_pre_stage", after_pre_stage)


register()
