"""Datamodules. Each yields training batches ``(x, y, index)`` where ``y = -1`` marks an
unlabelled transfer-set sample."""

from kdlab.data.fashion_mnist import FashionMNISTDataModule
from kdlab.data.memory import UNLABELLED, InMemoryDataModule

__all__ = ["FashionMNISTDataModule", "InMemoryDataModule", "UNLABELLED"]
