"""Students and teachers. Every model maps an image batch ``(N, C, H, W)`` to logits ``(N, K)``
and names the layers feature strategies read in ``taps()``. Zoo models by name:
:func:`kdlab.models.zoo.create`."""

from kdlab.models.cnn import CNN
from kdlab.models.mlp import MLP
from kdlab.models.zoo import available, create
from kdlab.util.measure import count_parameters

__all__ = ["CNN", "MLP", "available", "count_parameters", "create"]
