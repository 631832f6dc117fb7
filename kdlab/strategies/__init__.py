"""Distillation strategies, one family per file. Each is selected by ``distill=<name>``, where
``conf/distill/<name>.yaml`` names its class with ``_target_``; ``distill=[a,b]`` combines
several (:class:`Composite`). The table of methods is ``docs/STRATEGIES.md``."""

from kdlab.strategies.attention import AT, NST
from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.class_maps import CATKD, SDD
from kdlab.strategies.composite import Composite
from kdlab.strategies.contrastive import CRD
from kdlab.strategies.controls import LabelSmoothing, PseudoLabels
from kdlab.strategies.curriculum import CTKD
from kdlab.strategies.deit import DeiT
from kdlab.strategies.divergences import GKD, ULD, ReverseKL, SkewKL
from kdlab.strategies.flow import FSP, KDSVD
from kdlab.strategies.hints import AB, OFD, VID, FitNets
from kdlab.strategies.logits import DIST, DKD, KD, LSKD, kd_loss
from kdlab.strategies.multilevel import MLKD
from kdlab.strategies.paraphrase import FT
from kdlab.strategies.relations import CC, PKT, RKD, SP
from kdlab.strategies.reused_classifier import SimKD
from kdlab.strategies.review import ReviewKD
from kdlab.strategies.transformed import NKD, WTTM

__all__ = [
    "AB", "AT", "CATKD", "CC", "CRD", "CTKD", "DIST", "DKD", "FSP", "FT", "GKD", "KD", "KDSVD",
    "LSKD", "MLKD", "NKD", "NST", "OFD", "PKT", "RKD", "SDD", "SP", "ULD", "VID", "WTTM",
    "Batch", "Composite", "DeiT", "FitNets", "LabelSmoothing", "Outputs", "PseudoLabels",
    "ReverseKL", "ReviewKD", "SimKD", "SkewKL", "Strategy", "Terms", "kd_loss",
]
