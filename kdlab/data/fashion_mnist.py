"""Fashion-MNIST (Xiao et al. 2017): 60k training and 10k test 28×28 grey images, 10 classes."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from kdlab.data.idx import find_idx, read_idx
from kdlab.data.memory import InMemoryDataModule
from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)

#: where Debian's ``dataset-fashion-mnist`` package installs the idx files
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def locate(root: str | Path | None, search: str | Path | None = None) -> Path | None:
    """The folder holding all four idx files. ``root`` given: ``root`` or ``root/FashionMNIST/raw``
    (torchvision's layout) and nowhere else. ``root`` null: ``search`` (``paths.data_dir``, and
    its torchvision layout), then Debian's package folder."""
    if root is not None:
        candidates = [Path(root), Path(root) / "FashionMNIST" / "raw"]
    else:
        candidates = [Path(search), Path(search) / "FashionMNIST" / "raw"] if search else []
        candidates.append(DEBIAN_DIR)
    for folder in candidates:
        if all(find_idx(folder, stem) for stem in _STEMS):
            return folder
    return None


@functools.lru_cache(maxsize=2)
def _read(folder: Path) -> tuple[torch.Tensor, ...]:
    images_train, labels_train, images_test, labels_test = (
        read_idx(find_idx(folder, stem)) for stem in _STEMS
    )
    return images_train.unsqueeze(1), labels_train, images_test.unsqueeze(1), labels_test


class FashionMNISTDataModule(InMemoryDataModule):
    """Fashion-MNIST held in memory; see :class:`~kdlab.data.memory.InMemoryDataModule`.

    Args:
        root: folder with the idx files (plain or ``.gz``, flat or torchvision's
            ``FashionMNIST/raw``); Debian's ``/usr/share/datasets/fashion-mnist`` is tried next.
        download: if nothing is found, download into ``root`` through torchvision.
        **kwargs: split, labels and loader options of ``InMemoryDataModule``.
    """

    name = "fashion_mnist"
    num_classes = 10
    input_shape = (1, 28, 28)
    mean = 0.2860
    std = 0.3530

    def __init__(self, root: str | None = None, download: bool = False,
                 download_dir: str | None = "data", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download
        self.download_dir = download_dir

    def prepare_data(self) -> None:
        if locate(self.root, self.download_dir) is None and self.download:
            from torchvision.datasets import FashionMNIST

            target = str(self.root or self.download_dir or "data")
            try:
                FashionMNIST(target, train=True, download=True)
                FashionMNIST(target, train=False, download=True)
            except Exception as e:  # no network, or the mirror is down
                raise KdlabError(
                    f"data.download=true could not download Fashion-MNIST into {target} "
                    f"({type(e).__name__}: {e}); install it offline with "
                    "`apt-get install dataset-fashion-mnist` or set data.root=FOLDER"
                ) from None

    def source(self) -> str:
        folder = locate(self.root, self.download_dir)
        return str(folder.resolve()) if folder is not None else f"missing:{self.root}"

    def load(self) -> tuple[torch.Tensor, ...]:
        self.prepare_data()
        folder = locate(self.root, self.download_dir)
        if folder is None and self.root is not None:  # never another folder than the one named
            problem = "does not exist" if not Path(self.root).exists() else \
                "holds no Fashion-MNIST idx files (nor its FashionMNIST/raw/)"
            raise KdlabError(
                f"data.root={self.root} {problem}: point it at the folder with the four idx "
                f"files, or data.root=null to search paths.data_dir ({self.download_dir}) and "
                f"Debian's {DEBIAN_DIR} (apt-get install dataset-fashion-mnist), or add "
                "data.download=true (needs internet)")
        if folder is None:
            raise KdlabError(
                f"Fashion-MNIST idx files not found in {self.download_dir} (paths.data_dir) nor "
                f"in {DEBIAN_DIR}: run `apt-get install dataset-fashion-mnist`, set "
                "data.root=FOLDER, or data.download=true (needs internet)"
            )
        log.info("Fashion-MNIST: the idx files in %s", folder.resolve())
        try:
            return _read(folder)
        except (ValueError, OSError, EOFError) as e:  # garbage, truncated, a broken .gz
            raise KdlabError(f"Fashion-MNIST in {folder} cannot be read: {e}; replace the "
                             "files (apt-get install --reinstall dataset-fashion-mnist, or "
                             "data.download=true into an empty data.root)") from None
