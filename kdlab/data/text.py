"""Text for language-model distillation, offline: a folder of text files (by default the Python
standard library's own source, which every machine that runs kdlab has) or the rows of a
Hugging Face dataset (``hf_dataset``, :mod:`kdlab.data.hf_datasets`), a byte-level or Hugging
Face tokenizer, a split by file and fixed-length windows of next-token targets.

**Why the standard library.** Language-model runs need a sizeable corpus that exists without a
download, on every machine, with no licence question: the ``.py`` files of the interpreter's
standard library (about 12 MB of real, varied text — code, docstrings, comments — in CPython
3.11; test suites, ``site-packages`` and caches left out) fit. Its content depends on the Python
version, so the corpus is identified by a digest of its files (:meth:`TextDataModule.identity`),
never by its path: two machines share a stored teacher only when their corpora are the same
bytes.

**Tokens.** ``tokenizer=bytes`` (the default, :class:`ByteTokenizer`) maps text to its UTF-8
bytes (vocabulary 256, no unknown token, nothing to download); ``tokenizer=hf:<name-or-path>``
reads a Hugging Face tokenizer (:mod:`kdlab.data.tokenizers`, the ``llm`` extra). Files are
joined by a separator (a NUL byte, which text files do not contain; a Hugging Face tokenizer's
end-of-text token). The tokenizer also says how many bytes of the text each token stands for,
so every window knows the bytes its targets cover (:attr:`TextDataModule.target_bytes`) and
bits per byte are exact for any tokenizer: summed nats over ``ln 2`` times those bytes.

**Splits.** Each file goes to train, validation or test by a seeded hash of its path relative to
the root (``split_seed``; fractions ``val_fraction`` / ``test_fraction``), so no file is seen in
two splits and a file keeps its split when others are added. Each split is cut into windows of
``context + 1`` tokens with stride ``context``: a window's first ``context`` tokens are the
input, its last ``context`` the next-token targets.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from kdlab.data.hf_datasets import documents
from kdlab.data.loader import BatchLoader
from kdlab.data.tokenizers import SEPARATOR, ByteTokenizer, get_tokenizer
from kdlab.util.errors import KdlabError
from kdlab.util.inputs import TokenShape

__all__ = ["SEPARATOR", "ByteTokenizer", "TextDataModule", "corpus_files", "split_of",
           "stdlib_root", "windows", "window_sums"]

#: folders of the standard library left out of the default corpus
_SKIPPED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
def stdlib_root() -> Path:
    """The folder of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path, pattern: str) -> list[Path]:
    """The files under ``root`` matching ``pattern`` (a glob, ``**`` recursive), sorted by
    relative path, without test suites, installed packages and caches."""
    if not root.is_dir():
        raise KdlabError(f"data.root={root} is not a folder of text files")
    files = sorted(p for p in root.glob(pattern) if p.is_file()
                   and not _SKIPPED.intersection(p.relative_to(root).parts[:-1]))
    if not files:
        raise KdlabError(f"data.root={root} holds no file matching data.pattern={pattern!r}")
    return files


def split_of(relative: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """``train``, ``val`` or ``test`` for the file at ``relative``: a seeded hash of its path."""
    digest = hashlib.sha256(f"{seed}:{relative}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def windows(tokens: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[N, context]`` and next-token targets ``[N, context]`` of the windows of
    ``context + 1`` tokens with stride ``context`` (the tail shorter than a window is
    dropped)."""
    n = (len(tokens) - 1) // context
    if n < 1:
        return (torch.empty(0, context, dtype=torch.long),
                torch.empty(0, context, dtype=torch.long))
    body = tokens[: n * context + 1].long()
    return body[:-1].view(n, context), body[1:].view(n, context)


def window_sums(per_token: torch.Tensor, context: int) -> torch.Tensor:
    """For the windows of :func:`windows`, the sum of ``per_token`` over each window's targets
    (``[N]``, ``int64``): with the bytes of each token, the bytes a window's targets cover."""
    n = (len(per_token) - 1) // context
    if n < 1:
        return torch.empty(0, dtype=torch.long)
    return per_token[1: n * context + 1].view(n, context).sum(1, dtype=torch.long)


class TextDataModule(L.LightningDataModule):
    """Byte-level language-modelling data from a folder of text files (see the module
    docstring).

    Args:
        root: folder of the corpus; ``None``: the Python standard library (``pattern`` then
            defaults to ``**/*.py``).
        pattern: glob of the files to read under ``root`` (``**`` is recursive).
        context: tokens per training window (the model's context).
        batch_size: training windows per batch.
        eval_batch_size: windows per validation/test batch.
        val_fraction, test_fraction: expected shares of the files in validation and test.
        split_seed: seed of the split by file.
        max_bytes: read at most this many bytes of the corpus (files in sorted order, the last
            one cut), for quick runs; ``None`` reads everything.
        shuffle_seed: seed of the training order (epoch ``e`` is shuffled with ``(seed, e)``).
        tokenizer: ``bytes`` or ``hf:<name-or-path>``
            (:func:`kdlab.data.tokenizers.get_tokenizer`); its vocabulary is the models'
            number of classes.
        hf_dataset: instead of a folder, a Hugging Face dataset by name or path
            (:mod:`kdlab.data.hf_datasets`; each row a document); ``hf_config`` its
            configuration, ``hf_split`` the split read, ``hf_column`` the text column.
    """

    name = "text"
    in_memory = True

    def __init__(self, root: str | None = None, pattern: str | None = None, context: int = 128,
                 batch_size: int = 64, eval_batch_size: int = 256, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, split_seed: int = 0, max_bytes: int | None = None,
                 shuffle_seed: int = 0, tokenizer: str = "bytes",
                 hf_dataset: str | None = None, hf_config: str | None = None,
                 hf_split: str = "train", hf_column: str = "text", transfer: bool = False,
                 num_labels: int | None = None, augment: bool = False,
                 mix: str = "none") -> None:
        super().__init__()
        # the options every kdlab datamodule takes from the modes: every token of a text is
        # its own label (the next token), so there is no transfer set and no labelled subset,
        # and text has no random augmentation
        if num_labels is not None:
            raise KdlabError(f"data.num_labels={num_labels}: every window of a text is labelled "
                             "by its next tokens; use data.max_bytes to train on less text")
        if augment:
            raise KdlabError("data=text has no augmentation: set teacher.train.augment=false "
                             "(and data.augment is not a key of data=text)")
        if mix != "none":
            raise KdlabError(f"data.mix={mix}: mixing is for images; data=text has none")
        self.transfer = bool(transfer)
        self.mix = "none"
        if context < 1:
            raise KdlabError(f"data.context={context} must be a positive number of tokens")
        if batch_size < 1 or eval_batch_size < 1:
            raise KdlabError(f"data.batch_size={batch_size} and data.eval_batch_size="
                             f"{eval_batch_size} must be positive")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1
                and val_fraction + test_fraction < 1):
            raise KdlabError(f"data.val_fraction={val_fraction} and data.test_fraction="
                             f"{test_fraction} must be in (0, 1) with a sum below 1")
        if max_bytes is not None and max_bytes < 1:
            raise KdlabError(f"data.max_bytes={max_bytes} must be positive or null")
        if hf_dataset is not None and root is not None:
            raise KdlabError(f"data.root={root} and data.hf_dataset={hf_dataset}: the text comes "
                             "from a folder or from a dataset; set one of them to null")
        self.hf_dataset, self.hf_config = hf_dataset, hf_config
        self.hf_split, self.hf_column = hf_split, hf_column
        self.root = Path(root).expanduser() if root is not None else None
        self.pattern = pattern or ("**/*.py" if root is None else "**/*")
        self.context = int(context)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed, self.shuffle_seed = int(split_seed), int(shuffle_seed)
        self.max_bytes = max_bytes
        #: where the training windows come from (:meth:`use_training_windows`)
        self.train_source = "the corpus"
        self.tokenizer = get_tokenizer(tokenizer)
        self.num_classes = self.tokenizer.vocab_size
        self.input_shape = TokenShape((self.context,), self.num_classes)
        self._ready = False

    @property
    def corpus_root(self) -> Path:
        return self.root if self.root is not None else stdlib_root()

    @property
    def where(self) -> str:
        """Where the text comes from, for messages."""
        if self.hf_dataset is not None:
            config = f", {self.hf_config}" if self.hf_config else ""
            return f"the dataset {self.hf_dataset}{config} ({self.hf_split})"
        return "the Python standard library" if self.root is None else str(self.root)

    def _documents(self) -> Iterator[tuple[str, bytes]]:
        """``(name, bytes)`` of each document: the corpus's files by relative path (sorted),
        or the dataset's rows."""
        if self.hf_dataset is not None:
            yield from documents(self.hf_dataset, self.hf_config, self.hf_split, self.hf_column)
            return
        root = self.corpus_root
        for path in corpus_files(root, self.pattern):
            yield path.relative_to(root).as_posix(), path.read_bytes()

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
        counts = {"train": 0, "val": 0, "test": 0}
        digest = hashlib.sha256()
        budget = self.max_bytes
        for relative, data in self._documents():
            data = data.replace(bytes([SEPARATOR]), b"")
            if budget is not None:
                data = data[:budget]
                budget -= len(data)
            digest.update(relative.encode() + b"\0" + hashlib.sha256(data).digest())
            split = split_of(relative, self.split_seed, self.val_fraction, self.test_fraction)
            parts[split].append(data)
            counts[split] += 1
            if budget is not None and budget <= 0:
                break
        self.content = digest.hexdigest()[:32]
        self.files = counts
        self.bytes: dict[str, int] = {}
        #: per split, the bytes of the text each window's targets cover (``[N]``, int64)
        self.target_bytes: dict[str, torch.Tensor] = {}
        for split, chunks in parts.items():
            tokens, per_token = self.tokenizer.encode_files(chunks)
            self.bytes[split] = int(per_token.sum())
            x, y = windows(tokens, self.context)
            if len(x) == 0:
                raise KdlabError(
                    f"data: the {split} split of {self.where} ({counts[split]} files, "
                    f"{self.bytes[split]} bytes, {len(tokens)} tokens) holds no window of "
                    f"data.context={self.context} tokens: use a larger corpus or "
                    "data.max_bytes, a smaller context, or other fractions")
            setattr(self, f"x_{split}", x)
            setattr(self, f"y_{split}", y)
            self.target_bytes[split] = window_sums(per_token, self.context)
        self._ready = True

    def training_windows(self) -> torch.Tensor:
        """The training split's windows of ``context + 1`` tokens ``[N, context + 1]``: each
        window's inputs followed by its last target."""
        self.setup()
        return torch.cat([self.x_train.cpu(), self.y_train[:, -1:].cpu()], dim=1)

    def use_training_windows(self, windows: torch.Tensor, source: str) -> None:
        """Train on ``windows`` ``[N, context + 1]`` (token ids) instead of the corpus's (e.g.
        a teacher's continuations, sequence-level KD); validation and test keep the corpus.
        ``source`` says where they come from in :meth:`describe`. The identity (a stored
        teacher's key) stays that of the corpus."""
        self.setup()
        if windows.dim() != 2 or windows.shape[1] != self.context + 1:
            raise KdlabError(f"training windows must be [N, data.context + 1 = "
                             f"{self.context + 1}] token ids, got {list(windows.shape)}")
        windows = windows.long()
        self.x_train, self.y_train = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        self.train_source = source

    def identity(self) -> dict[str, Any]:
        """What defines the text a network is trained and validated on, for the key of a stored
        teacher: a digest of the corpus's files (paths and bytes), the tokenizer's identity
        (``bytes``, or a digest of a Hugging Face tokenizer's definition), the context and the
        split."""
        self.setup()
        return {"dataset": type(self).__name__, "content": self.content,
                "tokenizer": self.tokenizer.identity, "context": self.context,
                "split_seed": self.split_seed, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape)}

    #: what the modes ask of every datamodule: no unlabelled samples, no augmentation
    has_unlabelled = False
    augmented = False
    classes = None
    view_bank = None

    def augmentation(self) -> dict[str, Any]:
        """The random augmentation of training batches: none for text."""
        return {"augment": False}

    @property
    def num_train_samples(self) -> int:
        """Training windows."""
        self.setup()
        return len(self.x_train)

    def example_input(self, n: int = 2) -> torch.Tensor:
        """``n`` training windows (for probing shapes)."""
        self.setup()
        return self.x_train[:n]

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def train_dataloader(self) -> BatchLoader:
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        device = self._device()
        self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)
        return BatchLoader(self.x_train, self.y_train,
                           torch.arange(len(self.x_train), device=device), self.batch_size,
                           shuffle=True, seed=self.shuffle_seed, rank=rank, world_size=world)

    def _eval_loader(self, split: str) -> BatchLoader:
        self.setup()
        device = self._device()
        x, y = getattr(self, f"x_{split}").to(device), getattr(self, f"y_{split}").to(device)
        setattr(self, f"x_{split}", x)
        setattr(self, f"y_{split}", y)
        return BatchLoader(x, y, torch.arange(len(x), device=device), self.eval_batch_size)

    def val_dataloader(self) -> BatchLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> BatchLoader:
        return self._eval_loader("test")

    def describe(self) -> str:
        """One line for the log: the corpus and the size of each split."""
        self.setup()
        where = self.where
        sizes = ", ".join(f"{s} {self.files[s]} files / {self.bytes[s] / 1e6:.2f} MB / "
                          f"{len(getattr(self, f'x_{s}'))} windows"
                          for s in ("train", "val", "test"))
        if self.hf_dataset is None:
            where = f"{where}, {self.pattern}"
        source = "" if self.train_source == "the corpus" else \
            f"; training windows from {self.train_source}"
        return (f"text ({where}, {self.tokenizer.name}, context "
                f"{self.context}): {sizes}{source}")
