"""Datamodules. Each yields training batches ``(x, y, index)`` where ``y = -1`` marks an
unlabelled transfer-set sample."""

from kdlab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from kdlab.data.fashion_mnist import FashionMNISTDataModule
from kdlab.data.imagefolder import ImageFolderDataModule
from kdlab.data.memory import UNLABELLED, InMemoryDataModule
from kdlab.data.synthetic import SyntheticDataModule
from kdlab.data.text import TextDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "SyntheticDataModule",
    "TextDataModule",
    "UNLABELLED",
]
