"""Synthetic images of any shape, for smoke runs and speed runs where the real data is absent.

Every class has a fixed random low-frequency pattern; an image is its class's pattern plus
per-pixel noise, stored as uint8 like a real dataset. A network can learn it (so a smoke run
shows accuracy rising) but nothing measured on it says anything about real data: results on
``data=synthetic_*`` are labelled as synthetic wherever kdlab reports them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdlab.data.memory import InMemoryDataModule
from kdlab.util.errors import KdlabError


def synthetic_images(n: int, input_shape: Sequence[int], num_classes: int, seed: int,
                     noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images ``(n, C, H, W)`` and their labels (balanced, shuffled), drawn with
    ``seed``; the class patterns depend only on the shape and the number of classes."""
    c, h, w = (int(d) for d in input_shape)
    patterns = torch.rand(num_classes, c, 4, 4, generator=torch.Generator().manual_seed(12345))
    patterns = F.interpolate(patterns, size=(h, w), mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=generator)]
    images = torch.empty(n, c, h, w, dtype=torch.uint8)
    for start in range(0, n, 1024):  # in blocks: ImageNet-sized images stay cheap in memory
        y = labels[start:start + 1024]
        x = patterns[y] + noise * torch.randn(len(y), c, h, w, generator=generator)
        images[start:start + 1024] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


class SyntheticDataModule(InMemoryDataModule):
    """Random class-patterned images held in memory; see
    :class:`~kdlab.data.memory.InMemoryDataModule` for the split, label and loader options.

    Args:
        input_shape: ``[C, H, W]`` of one image (e.g. ``[3, 32, 32]`` like CIFAR).
        num_classes: number of classes.
        train_size: training images (the validation split is taken out of them).
        test_size: test images.
        noise: standard deviation of the per-pixel noise (images lie in [0, 1]).
        seed: seed of the images (the class patterns are fixed).
        **kwargs: options of ``InMemoryDataModule``.
    """

    name = "synthetic"
    mean = 0.5
    std = 0.25

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 100,
                 train_size: int = 5000, test_size: int = 1000, noise: float = 0.3,
                 seed: int = 0, **kwargs) -> None:
        if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
            raise KdlabError(f"data.input_shape={list(input_shape)} must be [C, H, W]")
        if num_classes < 2:
            raise KdlabError(f"data.num_classes={num_classes} must be at least 2")
        if train_size <= 0 or test_size <= 0:
            raise KdlabError(f"data.train_size={train_size} and data.test_size={test_size} "
                             "must be positive")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        super().__init__(**kwargs)
        self.train_size, self.test_size = int(train_size), int(test_size)
        self.noise, self.seed = float(noise), int(seed)

    def source(self) -> str:
        return (f"synthetic:{list(self.input_shape)}x{self.dataset_classes}:"
                f"{self.train_size}/{self.test_size}:{self.noise}:{self.seed}")

    def load(self) -> tuple[torch.Tensor, ...]:
        x_train, y_train = synthetic_images(self.train_size, self.input_shape,
                                            self.dataset_classes, self.seed, self.noise)
        x_test, y_test = synthetic_images(self.test_size, self.input_shape,
                                          self.dataset_classes, self.seed + 1, self.noise)
        return x_train, y_train, x_test, y_test
