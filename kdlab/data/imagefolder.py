"""ImageNet-style folders (``<root>/train/<class>/*.JPEG``, ``<root>/val/<class>/*.JPEG``),
read from disk batch by batch with worker processes.

The training split is ``<root>/<train_dir>`` minus a seeded, held-out validation split of
``val_size`` images (used for checkpoint selection); ``<root>/<test_dir>`` (ImageNet's official
validation set) is the test set, reported once at the end. Training images get the standard
``RandomResizedCrop(image_size) + flip``; evaluation images ``Resize(resize) +
CenterCrop(image_size)``. Batches are ``(x, y, index)`` like every kdlab datamodule; the teacher
runs live (its outputs cannot be cached for a dataset that is not in memory).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from kdlab.util.errors import KdlabError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Indexed(Dataset):
    """``(image, label, position)`` for the positions ``indices`` of an ImageFolder."""

    def __init__(self, folder: Any, indices: torch.Tensor, transform: Any) -> None:
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        path, label = self.folder.samples[int(self.indices[i])]
        return self.transform(self.folder.loader(path)), label, i


def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch as the tuple ``(x, y, index)`` (a list would read as a chunk of batches)."""
    return tuple(default_collate(samples))


class EpochSampler(Sampler[int]):
    """Positions ``0..n-1`` shuffled with a generator seeded by ``(seed, epoch)``, so a resumed
    run sees the same order."""

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class ImageFolderDataModule(L.LightningDataModule):
    """Images in class folders, decoded by ``num_workers`` worker processes.

    Args:
        root: the dataset folder.
        train_dir, test_dir: its training and test sub-folders (same class folders).
        image_size: side of the crops fed to the networks.
        resize: shorter side before the centre crop of evaluation images.
        batch_size, eval_batch_size: training and evaluation batch sizes (per process).
        val_size: training images held out for validation (seeded by ``split_seed``).
        split_seed: seed of the validation split.
        augment: ``RandomResizedCrop + flip`` for training images (false: the evaluation crop).
        shuffle_seed: seed of the training order.
        num_workers: decoding processes per loader.
        mean, std: per-channel normalisation (ImageNet's by default).
        num_labels, transfer, label_seed, mix, classes: accepted for the common interface;
            only their defaults (every label, no mixing, every class) are supported here.
    """

    name = "imagefolder"
    #: streamed from disk: ``steps_per_call: auto`` is 1 (a chunk would hold all its batches)
    in_memory = False

    def __init__(self, root: str | None = None, train_dir: str = "train",
                 test_dir: str = "val", image_size: int = 224, resize: int = 256,
                 batch_size: int = 256, eval_batch_size: int = 256, val_size: int = 10000,
                 split_seed: int = 0, augment: bool = True, shuffle_seed: int = 0,
                 num_workers: int = 8, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, num_labels: int | None = None,
                 transfer: bool = False, label_seed: int = 0, mix: str = "none",
                 mix_alpha: float = 1.0, classes: Sequence[int] | None = None) -> None:
        super().__init__()
        for key, value, default in (("num_labels", num_labels, None), ("mix", mix, "none"),
                                    ("classes", classes, None)):
            if value != default:
                raise KdlabError(f"data.{key}={value} is not supported by data=imagefolder "
                                 f"(only {default}); use an in-memory dataset for it")
        if root is None or not Path(root).is_dir():
            raise KdlabError(f"data.root={root} is not a folder: point it at the dataset "
                             f"(with {train_dir}/ and {test_dir}/ class folders)")
        self.root, self.train_dir, self.test_dir = Path(root), train_dir, test_dir
        self.image_size, self.resize = int(image_size), int(resize)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.val_size, self.split_seed = int(val_size), int(split_seed)
        self.augment, self.shuffle_seed = bool(augment), int(shuffle_seed)
        self.num_workers = int(num_workers)
        self.mean, self.std = tuple(mean), tuple(std)
        self.transfer, self.mix, self.mix_alpha = transfer, "none", mix_alpha
        self.input_shape = (3, self.image_size, self.image_size)
        self._ready = False
        folder = self._folder(self.train_dir)
        self.class_names = folder.classes
        self.num_classes = len(folder.classes)

    def _folder(self, sub: str):
        from torchvision.datasets import ImageFolder

        path = self.root / sub
        try:
            return ImageFolder(str(path))
        except (FileNotFoundError, OSError) as e:
            raise KdlabError(f"data.root={self.root}: {sub}/ is not an image-folder dataset "
                             f"({str(e).splitlines()[0]})") from None

    def _transforms(self, train: bool):
        from torchvision import transforms as T

        normalise = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if train and self.augment:
            return T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(),
                              *normalise])
        return T.Compose([T.Resize(self.resize), T.CenterCrop(self.image_size), *normalise])

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        self.train_folder = self._folder(self.train_dir)
        self.test_folder = self._folder(self.test_dir)
        if self.test_folder.classes != self.train_folder.classes:
            raise KdlabError(f"data.root={self.root}: {self.test_dir}/ and {self.train_dir}/ "
                             "have different class folders")
        n = len(self.train_folder)
        if self.val_size >= n:
            raise KdlabError(f"data.val_size={self.val_size} leaves no training images (of {n})")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        self.val_indices = perm[: self.val_size].sort().values
        self.train_indices = perm[self.val_size:].sort().values
        labels = torch.tensor(self.train_folder.targets, dtype=torch.long)
        self.targets = labels[self.train_indices]
        self._ready = True

    def identity(self) -> dict[str, Any]:
        """What defines the data (see :meth:`InMemoryDataModule.identity`): the class names,
        a digest of the training folder's file list with each file's size (reading every
        image would take longer than an epoch), the validation split and the crop size."""
        self.setup()
        digest = hashlib.blake2b(digest_size=16)
        for path, label in self.train_folder.samples:
            relative = Path(path).relative_to(self.root)
            digest.update(f"{relative}|{label}|{Path(path).stat().st_size}\n".encode())
        return {"dataset": type(self).__name__, "content": digest.hexdigest(),
                "classes": list(self.class_names), "val_size": self.val_size,
                "split_seed": self.split_seed, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape)}

    def augmentation(self) -> dict[str, Any]:
        """The random augmentation of training images (``{"augment": False}`` without)."""
        return {"augment": True, "transform": "RandomResizedCrop+flip"} if self.augment \
            else {"augment": False}

    @property
    def num_train_samples(self) -> int:
        return len(self.train_indices)

    @property
    def has_unlabelled(self) -> bool:
        return False

    def example_input(self, n: int = 2) -> torch.Tensor:
        """``n`` training images with the evaluation transform (for probing feature shapes);
        reads the folders if needed."""
        self.setup()
        dataset = _Indexed(self.train_folder, self.train_indices[:n], self._transforms(False))
        return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])

    def _loader(self, folder, indices, train: bool) -> DataLoader:
        # under DDP, Lightning wraps this sampler in its DistributedSamplerWrapper (a plain
        # DataLoader: trainer.use_distributed_sampler applies), which shards it across ranks
        sampler = EpochSampler(len(indices), shuffle=train, seed=self.shuffle_seed)
        return DataLoader(_Indexed(folder, indices, self._transforms(train)),
                          batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=sampler, num_workers=self.num_workers, collate_fn=collate,
                          pin_memory=torch.cuda.is_available(), drop_last=False,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_folder, self.train_indices, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.train_folder, self.val_indices, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_folder, torch.arange(len(self.test_folder)), train=False)

    def describe(self) -> str:
        return (f"imagefolder {self.root}: {self.num_classes} classes, train "
                f"{len(self.train_indices)}, val {len(self.val_indices)} (held out of "
                f"{self.train_dir}/), test {len(self.test_folder)} ({self.test_dir}/), "
                f"{self.image_size}px, {self.num_workers} workers")
