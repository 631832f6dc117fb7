"""Students and teachers. Every model maps an image batch ``(N, C, H, W)`` to logits ``(N, K)``."""

from kdlab.models.cnn import CNN
from kdlab.models.mlp import MLP

__all__ = ["CNN", "MLP", "count_parameters"]


def count_parameters(model) -> int:
    """Number of parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
