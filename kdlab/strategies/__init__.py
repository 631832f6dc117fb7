"""Distillation strategies, one family per file. Each is selected by ``distill=<name>``, where
``conf/distill/<name>.yaml`` names its class with ``_target_``; ``distill=[a,b]`` combines
several (:class:`Composite`)."""

from kdlab.strategies.base import Batch, Outputs, Strategy
from kdlab.strategies.composite import Composite
from kdlab.strategies.logits import KD, kd_loss

__all__ = ["KD", "Batch", "Composite", "Outputs", "Strategy", "kd_loss"]
