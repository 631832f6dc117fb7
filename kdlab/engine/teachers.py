"""The teacher store: trained networks kept under a key, reused by every later run and sweep.

A mode computes what defines a teacher (its identity, :mod:`kdlab.modes.teacher`) and asks
:class:`TeacherStore` for the entry under that identity's key: the stored weights when the
entry is there and intact, or it trains the network (a function the mode gives) and stores it.
Concurrent runs serialise on a file lock and the first one trains. Each entry is
``<store>/<key>/teacher.pt`` (state dict, identity, metrics) with ``teacher.json`` recording its
identity, metrics, size and SHA-256 (:class:`~kdlab.util.files.VerifiedFile`): an entry that
cannot be proven intact is moved aside and trained again.

Weights given by hand (``teacher.ckpt``) are read by :func:`load_weights` and
:func:`load_into`: store files, kdlab checkpoints or plain state dicts, always with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.util.distributed import is_rank_zero
from kdlab.util.errors import KdlabError
from kdlab.util.files import ReadOnlyFolder, VerifiedFile, load_safely, locked

log = logging.getLogger(__name__)


def load_weights(path: str | Path, key: str = "teacher.ckpt") -> dict[str, torch.Tensor]:
    """Model weights from a store file, a kdlab Lightning checkpoint (the student's weights)
    or a plain state dict — always with ``torch.load(weights_only=True)``; errors name
    ``key``."""
    path = Path(path)
    obj = load_safely(path, key, missing="give an existing file, or teacher.ckpt=null to train "
                      "(or reuse) a teacher from the store",
                      folder="give the teacher.pt, checkpoint or state dict inside it")
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise KdlabError(f"{key}={path} holds no state dict")
    if any(k.startswith("student.") for k in state):  # a kdlab run's checkpoint
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return dict(state)


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Strictly load ``state`` into ``model``; mismatches are listed in one line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label}: {', '.join(keys[:4])}{more}")
        raise KdlabError(f"{source} does not fit teacher.model — {'; '.join(parts)}: "
                         "use the teacher.model it was trained with")
    model.load_state_dict(state)
    return model


class TeacherStore:
    """Trained networks by key under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path, name: str = "teacher") -> None:
        self.root = Path(root)
        self.name = name  #: the entries' file name (the baseline store's: ``baseline``)

    def entry(self, key: str) -> VerifiedFile:
        """The entry of ``key``: ``<root>/<key>/<name>.pt`` and its ``<name>.json``."""
        return VerifiedFile(self.root / key / f"{self.name}.pt",
                            self.root / key / f"{self.name}.json")

    def has(self, key: str) -> bool:
        """Whether an entry is stored under ``key`` (not checked for damage)."""
        return self.entry(key).exists()

    def get_or_train(self, key: str, identity: dict[str, Any], model: nn.Module,
                     train: Callable[[], dict[str, float]], label: str = "Teacher",
                     store: bool = True) -> dict[str, Any]:
        """Fill ``model`` from the entry ``key``, or train it with ``train()`` (which returns
        its metrics) and, when ``store``, keep it with ``identity``. Returns where the weights
        came from: ``{"source": "store" | "trained", "key", "path", "metrics", …}``.

        Under DDP only rank 0 locks and writes: the other ranks train in step with it (or read
        the stored entry); waiting on its lock would deadlock the process group."""
        entry = self.entry(key)
        rank_zero = is_rank_zero()
        # an intact entry is read without the lock (entries are renamed into place, their
        # record last): a read-only store of trained teachers is usable as it is
        saved = self._read(entry)
        if saved is not None:
            return self._reuse(entry, saved, model, key, label)
        with contextlib.ExitStack() as held:
            if rank_zero:  # DDP: the other ranks would deadlock the group waiting on it
                self._lock(key, label, held)
            saved = self._load(entry, rank_zero, label)
            if saved is not None:
                return self._reuse(entry, saved, model, key, label)
            metrics = train()
            if not rank_zero or not store:
                return {"source": "trained", "key": key, "stored": False, "metrics": metrics}
            entry.save({"state_dict": model.state_dict(), "identity": identity,
                        "metrics": metrics}, {"key": key, "identity": identity,
                                              "metrics": metrics})
            log.info("%s: stored as %s (%s)", label, entry.path, _accuracy(metrics))
            return {"source": "trained", "key": key, "path": str(entry.path), "stored": True,
                    "metrics": metrics}

    def _lock(self, key: str, label: str, held: contextlib.ExitStack) -> None:
        """Take the entry's lock into ``held``; a store where it cannot be written is one line."""
        try:
            held.enter_context(locked(self.root / f".{key}.lock",
                                      f"{label.lower()} {key} (its training)"))
        except ReadOnlyFolder as e:
            entry = self.entry(key)
            state = (f"its entry {entry.path} has {entry.problem()}" if entry.exists()
                     else f"it holds no {label.lower()} {key}")
            raise KdlabError(f"paths.teacher_store={self.root} cannot be written ({e.reason}) and "
                             f"{state}: point paths.teacher_store at a writable folder to "
                             "train and store it there, or give teacher.ckpt=<weights>") from None

    @staticmethod
    def _read(entry: VerifiedFile) -> dict[str, Any] | None:
        """An intact entry's content without locking, or ``None`` (missing, or not proven
        intact: then the locked path decides, so a concurrent rewrite is never moved aside)."""
        if not entry.exists() or entry.problem() is not None:
            return None
        try:
            return torch.load(entry.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - reported by _load, under the lock
            return None

    @staticmethod
    def _reuse(entry: VerifiedFile, saved: dict[str, Any], model: nn.Module, key: str,
               label: str) -> dict[str, Any]:
        load_into(model, saved["state_dict"], f"teacher store entry {entry.path}")
        log.info("%s: reusing %s from the store (trained once, %s)", label, key,
                 _accuracy(saved.get("metrics", {})))
        return {"source": "store", "key": key, "path": str(entry.path),
                "metrics": saved.get("metrics", {})}

    @staticmethod
    def _load(entry: VerifiedFile, rank_zero: bool, label: str) -> dict[str, Any] | None:
        """An entry's content, or ``None`` when there is none. An entry that cannot be proven
        intact, or read, is reported by path, moved aside (``teacher.pt.corrupt-<time>``)
        and trained again."""
        if not entry.exists():
            return None
        problem = entry.problem()
        if problem is None:
            try:
                return torch.load(entry.path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same
                problem = f"unreadable content ({type(e).__name__}: " \
                          f"{str(e).splitlines()[0][:120]})"
        if rank_zero:
            entry.move_aside(problem, label)
        return None


def _accuracy(metrics: Mapping[str, Any]) -> str:
    acc = metrics.get("test/acc", (metrics.get("metrics") or {}).get("test/acc"))
    return f"test/acc {acc:.4f}" if isinstance(acc, (int, float)) else "no test metric"

