"""Optimizers kdlab adds to PyTorch's: :class:`DOT` (``optimizer=dot``)."""

from kdlab.optim.dot import DOT

__all__ = ["DOT"]
