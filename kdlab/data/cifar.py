"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 50k training and 10k test 32×32 colour images.

Read from the python pickles torchvision downloads (``<root>/cifar-10-batches-py``,
``<root>/cifar-100-python``), held in memory (CIFAR-100 as float32: 0.6 GB for the training
split). The training augmentation is the standard one of the KD literature (RepDistiller, CRD,
mdistiller): ``RandomCrop(32, padding=4)`` and a horizontal flip, done on the whole batch
(``data.augment=true``, ``data.shift=4``).
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import torch

from kdlab.data.memory import InMemoryDataModule
from kdlab.util.errors import KdlabError


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


@functools.lru_cache(maxsize=1)
def _read(folder: Path, train_files: tuple[str, ...], test_file: str,
          label_key: str) -> tuple[torch.Tensor, ...]:
    def load(names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in names:
            entry = _unpickle(folder / name)
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[label_key])
        return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)

    return (*load(train_files), *load((test_file,)))


class _CIFARDataModule(InMemoryDataModule):
    """CIFAR held in memory; see :class:`~kdlab.data.memory.InMemoryDataModule` for the split,
    label and loader options.

    Args:
        root: folder holding torchvision's extracted CIFAR folder.
        download: if the files are missing, download them into ``root`` through torchvision.
        **kwargs: options of ``InMemoryDataModule`` (``augment=true, shift=4`` is the standard
            random crop with padding 4 and flip; see ``conf/data/cifar100.yaml``).
    """

    input_shape = (3, 32, 32)
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    torchvision_class: str

    def __init__(self, root: str | None = None, download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download

    def _folder(self) -> Path | None:
        if self.root is None:
            return None
        folder = Path(self.root) / self.folder
        files = (*self.train_files, self.test_file)
        return folder if all((folder / name).is_file() for name in files) else None

    def prepare_data(self) -> None:
        if self._folder() is None and self.download:
            import torchvision.datasets

            dataset = getattr(torchvision.datasets, self.torchvision_class)
            try:
                dataset(str(self.root or "data"), train=True, download=True)
                dataset(str(self.root or "data"), train=False, download=True)
            except Exception as e:  # no network, or the mirror is down
                raise KdlabError(
                    f"data.download=true could not download {self.name} into {self.root} "
                    f"({type(e).__name__}: {e}); copy torchvision's {self.folder} folder into "
                    "data.root, or use data=synthetic_cifar100 for a smoke run"
                ) from None

    def source(self) -> str:
        folder = self._folder()
        return str(folder.resolve()) if folder is not None else f"missing:{self.root}"

    def load(self) -> tuple[torch.Tensor, ...]:
        self.prepare_data()
        folder = self._folder()
        if folder is None:
            raise KdlabError(
                f"{self.name} not found: data.root={self.root} has no {self.folder}/ with "
                f"{', '.join((*self.train_files, self.test_file))}; set data.root to the folder "
                "holding it, data.download=true (needs internet), or data=synthetic_cifar100 "
                "for a smoke run on random images of the same shape"
            )
        return _read(folder, self.train_files, self.test_file, self.label_key)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 10 classes; per-channel mean/std of the training set."""

    name = "cifar10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_file = "test_batch"
    label_key = "labels"
    torchvision_class = "CIFAR10"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 100 fine classes; the mean/std RepDistiller and mdistiller normalise with."""

    name = "cifar100"
    num_classes = 100
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)
    folder = "cifar-100-python"
    train_files = ("train",)
    test_file = "test"
    label_key = "fine_labels"
    torchvision_class = "CIFAR100"
