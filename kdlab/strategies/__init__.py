"""Distillation strategies, one family per file. Each is selected by ``distill=<name>``, where
``conf/distill/<name>.yaml`` names its class with ``_target_``."""

from kdlab.strategies.base import Outputs, Strategy
from kdlab.strategies.logits import KD, kd_loss

__all__ = ["KD", "Outputs", "Strategy", "kd_loss"]
