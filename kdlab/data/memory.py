"""Datamodules for datasets that fit in memory: normalised tensors, batches fetched by index.

The training split is the training set minus a seeded, held-out validation split; the test set
is only used for the final evaluation. ``num_labels`` keeps labels for a stratified, seeded subset
of the training split. With ``transfer=True`` the other training images stay in the training set
as an unlabelled *transfer set* (target ``-1``), to be labelled by the teacher's soft targets
(Hinton et al. 2015, §3); with ``transfer=False`` only the labelled images are used.

An epoch is always ``len(training split)`` samples, whatever the mode, so runs that see only the
labelled subset take as many optimizer steps as runs that see the transfer set (same budget):
the labelled images are repeated, each pass reshuffled.

``classes`` restricts every split to a subset of the classes, relabelled ``0..k-1`` in the
given order (a source or target task for transfer learning). The validation split is the full
dataset's (same ``split_seed``) restricted to those classes, so two tasks built from the same
dataset never train on each other's validation images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from kdlab.data.augment import random_shift_flip
from kdlab.data.loader import BatchLoader
from kdlab.data.mix import check_mix, mix_batch
from kdlab.data.randaugment import StrongAugment
from kdlab.data.views import ViewBank, view_schedule
from kdlab.util.errors import KdlabError
from kdlab.util.files import tensor_digest

log = logging.getLogger(__name__)

UNLABELLED = -1  #: target value of a transfer-set sample whose label is hidden
#: the normalised splits of the last dataset set up, shared by datamodules (read-only tensors)
_SPLITS: dict[tuple, dict[str, Any]] = {}


def stratified_subset(
    labels: torch.Tensor, num_labels: int, num_classes: int, seed: int
) -> torch.Tensor:
    """Indices (sorted) of ``num_labels`` samples, as equal a number per class as possible."""
    generator = torch.Generator().manual_seed(seed)
    per_class = [num_labels // num_classes] * num_classes
    for k in range(num_labels % num_classes):
        per_class[k] += 1
    chosen = []
    for k in range(num_classes):
        members = (labels == k).nonzero().flatten()
        if len(members) < per_class[k]:
            raise KdlabError(
                f"data.num_labels={num_labels} asks for {per_class[k]} samples of class {k}, "
                f"but the training split has {len(members)}: lower data.num_labels"
            )
        perm = torch.randperm(len(members), generator=generator)[: per_class[k]]
        chosen.append(members[perm])
    return torch.cat(chosen).sort().values


def check_classes(classes: Sequence[int] | None, num_classes: int) -> list[int] | None:
    """``classes`` as a list of distinct class ids in ``[0, num_classes)`` (at least two), or
    ``None`` for every class; anything else fails naming ``data.classes``."""
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise KdlabError(f"data.classes={classes!r} must be a list of class ids or null")
    ids = list(classes)
    bad = [c for c in ids if isinstance(c, bool) or not isinstance(c, int)
           or not 0 <= c < num_classes]
    if bad:
        raise KdlabError(f"data.classes={ids} has unknown class ids {bad}: the dataset's "
                         f"classes are 0..{num_classes - 1}")
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise KdlabError(f"data.classes={ids} repeats class ids {duplicates}: list each once")
    if len(ids) < 2:
        raise KdlabError(f"data.classes={ids} keeps fewer than 2 classes: a classifier needs "
                         "at least two (or null for all)")
    return ids


def restrict_classes(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int],
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples of ``classes`` (in dataset order), their labels mapped to ``0..k-1`` in the
    order of ``classes``, and a boolean mask of the kept samples."""
    relabel = torch.full((num_classes,), -1, dtype=torch.long)
    relabel[torch.tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    keep = relabel[y] >= 0
    return x[keep].contiguous(), relabel[y[keep]], keep


def channel_stats(mean: float | Sequence[float], std: float | Sequence[float]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` (a number, or one per channel) as tensors of shape ``(C, 1, 1)``."""
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return m, s


class InMemoryDataModule(L.LightningDataModule):
    """Base for in-memory image classification datamodules.

    Subclasses set ``num_classes``, ``input_shape``, ``mean``, ``std`` (numbers, or one per
    channel) and implement
    :meth:`load` returning ``(x_train, y_train, x_test, y_test)`` with uint8 images ``(N, C, H,
    W)`` and integer labels.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test.
        val_size: images held out of the training set for validation (never trained on).
        split_seed: seed of the validation split; fixed so teacher and student share it.
        num_labels: labelled training images (stratified); ``None`` keeps every label.
        label_seed: seed choosing the labelled subset.
        transfer: keep the unlabelled training images as a transfer set (target ``-1``).
        augment: random shift (``shift`` pixels) and horizontal flip of training batches.
        shift: maximum translation in pixels when ``augment``.
        flip: horizontal flips when ``augment``.
        shuffle_seed: seed of the training order (epoch ``e`` is shuffled with ``(seed, e)``).
        classes: keep only these class ids, relabelled ``0..k-1`` in this order
            (``num_classes`` becomes ``k``); ``None`` keeps every class.
        mix: ``none``, ``mixup`` or ``cutmix`` of training batches, after shift/flip; the
            labels of a mixed batch are hidden (see :mod:`kdlab.data.mix`).
        mix_alpha: ``α`` of the ``Beta(α, α)`` mixing ratio.

    Batches come from :class:`~kdlab.data.loader.BatchLoader`: the tensors move to the
    training device once, and every batch is one indexing operation (no workers, no collate).
    """

    name = "in_memory"
    #: the whole split lives in memory (``steps_per_call: auto`` runs chunks of its batches)
    in_memory = True
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        val_size: int = 5000,
        split_seed: int = 0,
        num_labels: int | None = None,
        label_seed: int = 0,
        transfer: bool = False,
        augment: bool = False,
        shift: int = 2,
        flip: bool = True,
        shuffle_seed: int = 0,
        classes: Sequence[int] | None = None,
        mix: str = "none",
        mix_alpha: float = 1.0,
    ) -> None:
        super().__init__()
        self.mix, self.mix_alpha = check_mix(mix, mix_alpha)
        self.classes = check_classes(classes, self.num_classes)
        #: classes of the full dataset (``num_classes`` is the task's: ``len(classes)`` if set)
        self.dataset_classes = self.num_classes
        if self.classes is not None:
            self.num_classes = len(self.classes)
        if batch_size <= 0:
            raise KdlabError(f"data.batch_size={batch_size} must be positive")
        if val_size < 0:
            raise KdlabError(f"data.val_size={val_size} must be >= 0")
        if num_labels is not None and num_labels < self.num_classes:
            raise KdlabError(
                f"data.num_labels={num_labels} is below the number of classes "
                f"({self.num_classes}); use at least one label per class, or null for all"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.num_labels = num_labels
        self.label_seed = label_seed
        self.transfer = transfer
        self.augment = augment
        self.shift = shift
        self.flip = flip
        self.shuffle_seed = shuffle_seed
        #: stored augmented views (:mod:`kdlab.data.views`) the training batches show instead
        #: of fresh random ones; set by the engine when the teacher's outputs on them are
        #: cached, ``None`` otherwise
        self.view_bank: ViewBank | None = None
        #: the augmentation of a second, strong view of every training batch, for a strategy
        #: that reads two views (``Strategy.views = 2``, MLKD); set by the engine per stage,
        #: ``None`` otherwise. Training batches then are ``(x, y, index, None, strong)``.
        self.strong_view: StrongAugment | None = None
        self._ready = False

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- splits --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        key = (type(self), self.source(), self.split_seed, self.val_size)
        splits = _SPLITS.get(key)
        if splits is None:
            splits = self._split()
            _SPLITS.clear()  # keep one dataset's tensors, shared by the run's datamodules
            _SPLITS[key] = splits
        self.split_indices = splits["split_indices"]
        self.content = splits["content"]
        self.x_train, self.y_train = splits["x_train"], splits["y_train"]
        self.x_val, self.y_val = splits["x_val"], splits["y_val"]
        self.x_test, self.y_test = splits["x_test"], splits["y_test"]
        if self.classes is not None:  # copies: the shared full splits stay untouched
            self._restrict(self.classes)
        n_train = len(self.x_train)
        if self.batch_size > n_train:  # one batch per epoch: say so, never a larger tensor
            log.warning("data.batch_size=%d is more than the %d training samples: each epoch "
                        "is one batch of %d (full-batch training)", self.batch_size, n_train,
                        n_train)
            self.batch_size = n_train
        if self.num_labels is None:
            self.labelled = torch.arange(n_train)
        else:
            if self.num_labels > n_train:
                raise KdlabError(
                    f"data.num_labels={self.num_labels} exceeds the {n_train} training images"
                )
            self.labelled = stratified_subset(
                self.y_train, self.num_labels, self.num_classes, self.label_seed
            )
        self.targets = self.y_train
        if self.transfer and len(self.labelled) < n_train:
            self.targets = torch.full_like(self.y_train, UNLABELLED)
            self.targets[self.labelled] = self.y_train[self.labelled]
            self.train_indices = torch.arange(n_train)
        else:  # labelled images only, repeated to fill an epoch of n_train samples
            reps = -(-n_train // len(self.labelled))
            self.train_indices = self.labelled.repeat(reps)[:n_train]
        self._ready = True

    def _restrict(self, classes: list[int]) -> None:
        """Keep the samples of ``classes`` in every split (the validation split stays the full
        dataset's, restricted), relabelled in the order of ``classes``."""
        n = self.dataset_classes
        self.x_train, self.y_train, keep = restrict_classes(self.x_train, self.y_train, classes, n)
        self.x_val, self.y_val, keep_val = restrict_classes(self.x_val, self.y_val, classes, n)
        self.x_test, self.y_test, _ = restrict_classes(self.x_test, self.y_test, classes, n)
        self.split_indices = {"train": self.split_indices["train"][keep],
                              "val": self.split_indices["val"][keep_val]}

    def source(self) -> str:
        """What :meth:`load` reads (e.g. a folder); datamodules of the same class, source and
        split share their tensors instead of holding a copy each."""
        return ""

    def _check_loaded(self, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                      y_test: torch.Tensor) -> None:
        """What :meth:`load` read is a dataset of this module's shape and classes: as many
        labels as images, images of ``input_shape``, labels in ``0..classes-1``; anything else
        is one line naming the data's source."""
        source = self.source() or self.name
        for split, x, y in (("training", x_train, y_train), ("test", x_test, y_test)):
            if len(x) != len(y):
                raise KdlabError(f"{self.name} ({source}): the {split} split has {len(x)} images "
                                 f"but {len(y)} labels: its image and label files do not belong "
                                 "together")
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise KdlabError(f"{self.name} ({source}): {split} images of shape "
                                 f"{list(x.shape[1:])}, not {list(self.input_shape)}")
            bad = y[(y < 0) | (y >= self.dataset_classes)]
            if len(bad):
                raise KdlabError(f"{self.name} ({source}): {len(bad)} {split} labels outside "
                                 f"0..{self.dataset_classes - 1}, e.g. "
                                 f"{sorted({int(v) for v in bad[:100]})[:5]}")

    def _split(self) -> dict[str, Any]:
        x_train, y_train, x_test, y_test = self.load()
        self._check_loaded(x_train, y_train, x_test, y_test)
        n = len(x_train)
        if self.val_size >= n:
            raise KdlabError(f"data.val_size={self.val_size} leaves no training images (of {n})")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        val_idx = perm[: self.val_size].sort().values
        train_idx = perm[self.val_size :].sort().values
        return {
            #: a digest of the training images and labels as read (before the split): what
            #: the data is, for the keys of stored teachers (:meth:`identity`)
            "content": tensor_digest(x_train, y_train),
            #: positions in the original training set of the training and validation splits
            "split_indices": {"train": train_idx, "val": val_idx},
            "x_train": self._normalise(x_train[train_idx]), "y_train": y_train[train_idx].long(),
            "x_val": self._normalise(x_train[val_idx]), "y_val": y_train[val_idx].long(),
            "x_test": self._normalise(x_test), "y_test": y_test.long(),
        }

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().div_(255.0)
        if isinstance(self.mean, (int, float)) and isinstance(self.std, (int, float)):
            return images.sub_(self.mean).div_(self.std).contiguous()
        mean, std = channel_stats(self.mean, self.std)
        return images.sub_(mean).div_(std).contiguous()

    @property
    def black(self) -> float | torch.Tensor:
        """The normalised value of a black pixel: a number, or one per channel."""
        if isinstance(self.mean, (int, float)) and isinstance(self.std, (int, float)):
            return (0.0 - self.mean) / self.std
        mean, std = channel_stats(self.mean, self.std)
        return ((0.0 - mean) / std).flatten()

    def identity(self) -> dict[str, Any]:
        """What defines the data a network is trained and validated on, for the key of a
        stored teacher: the dataset, a digest of its training images and labels (so other files
        in the same format are other data), the validation split and the class subset.
        Loader options (batch sizes, order) and the labelled subset are not part of it."""
        self.setup()
        return {"dataset": type(self).__name__, "content": self.content,
                "val_size": self.val_size, "split_seed": self.split_seed,
                "classes": self.classes, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape)}

    @property
    def augmented(self) -> bool:
        """Whether training batches are randomly augmented or mixed (a new view every step)."""
        return bool(self.augment) or self.mix != "none"

    def draw_views(self, views: int, seed: int) -> ViewBank:
        """A :class:`~kdlab.data.views.ViewBank` of ``views`` views of every training sample
        with this module's augmentation (shift, flip, mix), drawn from ``seed``."""
        self.setup()
        _, _, h, w = self.x_train.shape
        return ViewBank.draw(len(self.x_train), views, h, w,
                             self.shift if self.augment else 0, bool(self.augment and self.flip),
                             self.mix, self.mix_alpha, seed)

    def render_views(self, bank: ViewBank, index: torch.Tensor, view: torch.Tensor,
                     images: torch.Tensor | None = None) -> torch.Tensor:
        """The training images of ``bank``'s views ``view`` of samples ``index`` (``images``:
        ``x_train[index]``, when the caller has them), on the device ``x_train`` is on."""
        return bank.render(self.x_train, index, view, self.black, images)

    def augmentation(self) -> dict[str, Any]:
        """The random augmentation of training batches (``{"augment": False}`` without)."""
        if not self.augment:
            return {"augment": False}
        return {"augment": True, "shift": self.shift, "flip": self.flip}

    def example_input(self, n: int = 2) -> torch.Tensor:
        """``n`` training images (for probing feature shapes); loads the splits if needed."""
        self.setup()
        return self.x_train[:n]

    @property
    def has_unlabelled(self) -> bool:
        """Whether the training split holds transfer-set samples without a label."""
        return bool((self.targets == UNLABELLED).any())

    @property
    def num_train_samples(self) -> int:
        """Size of the training split (labelled or not): the memory-bank size for CRD."""
        return len(self.x_train)

    # -- loaders -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _on_device(self, name: str) -> torch.Tensor:
        """``self.<name>`` moved to the training device (once; the move is kept)."""
        tensor = getattr(self, name)
        device = self._device()
        if tensor.device != device:
            tensor = tensor.to(device)
            setattr(self, name, tensor)
        return tensor

    def train_dataloader(self) -> BatchLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        views = None
        bank = self.view_bank
        if bank is not None and self.augmented:
            # the bank's parameters go to the training device once, with the split
            bank = self.view_bank = bank.to(self._device())
            n, seed = len(self.x_train), self.shuffle_seed

            def views(order: torch.Tensor, epoch: int) -> torch.Tensor:
                return view_schedule(order, epoch, bank.views, n, seed)

        return BatchLoader(self._on_device("x_train"), self._on_device("targets"),
                           self.train_indices.to(self._device()), self.batch_size, shuffle=True,
                           seed=self.shuffle_seed, rank=rank, world_size=world, views=views)

    def _eval_loader(self, x: str, y: str) -> BatchLoader:
        xs, ys = self._on_device(x), self._on_device(y)
        return BatchLoader(xs, ys, torch.arange(len(xs), device=xs.device), self.eval_batch_size)

    def val_dataloader(self) -> BatchLoader:
        return self._eval_loader("x_val", "y_val")

    def test_dataloader(self) -> BatchLoader:
        return self._eval_loader("x_test", "y_test")

    def strong_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The strong view of the unaugmented normalised images ``x``: their own random
        shift/flip (``data.shift``/``data.flip`` when ``data.augment``), then
        :attr:`strong_view` (RandAugment + Cutout) in pixel space."""
        if self.augment:
            x = random_shift_flip(x, self.shift, self.black, self.flip)
        mean, std = channel_stats(self.mean, self.std)
        return self.strong_view(x, mean, std)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.strong_view is not None and len(batch) == 3 and trainer is not None \
                and trainer.training:  # a weak and a strong view (no mixing: refused)
            x, y, idx = batch
            strong = self.strong_batch(x)
            if self.augment:
                x = random_shift_flip(x, self.shift, self.black, self.flip)
            return (x, y, idx, None, strong)
        if len(batch) == 4 and trainer is not None and trainer.training:  # a stored view
            x, y, idx, view = batch
            x = self.render_views(self.view_bank, idx, view, images=x)
            if self.mix != "none":
                y = torch.full_like(y, UNLABELLED)
            return (x, y, idx, view)
        if self.augmented and trainer is not None and trainer.training:
            x, y, idx = batch
            if self.augment:
                fill = self.black  # a black pixel after normalisation
                x = random_shift_flip(x, self.shift, fill, self.flip)
            if self.mix != "none":  # a mixed image has no single label: hidden
                x = mix_batch(x, self.mix, self.mix_alpha)[0]
                y = torch.full_like(y, UNLABELLED)
            batch = (x, y, idx)
        return batch

    def describe(self) -> str:
        """One line for the log: sizes of the splits and of the labelled subset."""
        unlabelled = len(self.x_train) - len(self.labelled)
        subset = f" classes {self.classes}," if self.classes is not None else ""
        mixed = f", {self.mix} α={self.mix_alpha:g} (labels hidden)" if self.mix != "none" else ""
        if self.view_bank is not None and self.augmented:
            mixed += f", augmented views from a bank of {self.view_bank.views} per sample"
        if self.strong_view is not None:
            mixed += f", plus a strong view per sample ({self.strong_view.describe()})"
        return (
            f"{self.name}:{subset} train {len(self.x_train)} ({len(self.labelled)} labelled"
            + (f", {unlabelled} as transfer set" if self.transfer and unlabelled else "")
            + f"){mixed}, val {len(self.x_val)}, test {len(self.x_test)}"
        )
