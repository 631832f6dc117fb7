"""Files shared between runs: exclusive locks, atomic writes, content hashes, verified entries."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)


class ReadOnlyFolder(KdlabError):
    """A store folder in which no lock (and so no entry) can be written."""

    reason = ""  #: the operating system's words (``Read-only file system``)


#: seconds between "still waiting" lines (doubling) while another process holds a lock
WAIT_NOTE_S = 30.0


class LockHeld(KdlabError):
    """A lock that another process holds (:func:`locked` with ``wait=False``)."""

    holder = ""  #: who holds it (``pid … on … since …``)


@contextmanager
def locked(path: Path, what: str = "it", wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block, so
    concurrent runs that build the same file build it once. The holder writes who it is in
    the file; a process that has to wait says what it waits for (``what``), for whom and,
    every while, for how long — or, with ``wait=False``, raises :class:`LockHeld`. A folder
    where the lock cannot be created (read-only) raises :class:`ReadOnlyFolder`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 - closed below; "w" would erase the holder
    except OSError as e:
        error = ReadOnlyFolder(f"{path.parent} is not writable ({e.strerror})")
        error.reason = str(e.strerror)
        raise error from None
    try:
        if wait:
            _acquire(handle, what)
        elif not _try_lock(handle):
            held = LockHeld(f"{path} is held by {_holder(handle)}")
            held.holder = _holder(handle)
            raise held
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def lock_holder(path: Path) -> str | None:
    """Who holds the lock ``path`` now (``pid … since …``), or ``None`` when nobody does."""
    try:
        with open(path) as handle:
            if not _try_lock(handle):
                return _holder(handle)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:  # no lock file (or unreadable): nobody holds it
        pass
    return None


def _try_lock(handle: Any) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(handle: Any) -> str:
    handle.seek(0)
    return handle.read().strip() or "another process"


def _acquire(handle: Any, what: str) -> None:
    """``flock`` ``handle``, saying so when another process holds it."""
    if _try_lock(handle):
        return
    holder = _holder(handle)
    log.info("Waiting for %s: another process (%s) is building it", what, holder)
    start, note = time.monotonic(), WAIT_NOTE_S
    while not _try_lock(handle):
        time.sleep(0.2)
        waited = time.monotonic() - start
        if waited >= note:
            log.info("Still waiting for %s (held by %s): %.0f s so far", what, holder, waited)
            note *= 2
    log.info("Done waiting for %s (%.0f s)", what, time.monotonic() - start)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the complete new one, never a partial write (:func:`write_atomic`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getbuffer())


#: the one function that puts bytes on disk for :func:`write_atomic` (tests replace it to
#: simulate a full disk half-way through a write)
def _write_all(handle: BinaryIO, data: memoryview | bytes) -> None:
    handle.write(data)


def write_atomic(path: Path, data: memoryview | bytes) -> None:
    """Write ``data`` to a temporary file in ``path``'s folder (never the system's temporary
    folder: a rename within one filesystem is atomic, a copy across two is not), flush it to
    the disk, then rename it over ``path``. On any write error (a full disk, a quota, a file
    size limit) the temporary file is removed, ``path`` keeps its previous content, and the
    error is one :class:`KdlabError` line naming ``path``, the bytes it needed and the space
    left there."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            _write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise KdlabError(write_failure(path, len(data), e)) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_failure(path: Path, needed: int, error: OSError) -> str:
    """The line for a failed write: the path, why, the space it needed and the space left."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MB free there"
    except OSError:
        free = "the free space there is unknown"
    kept = f"the previous {path.name} is intact" if path.exists() else "nothing was left there"
    return (f"could not write {path} ({error.strerror or type(error).__name__}): it needs "
            f"{needed / 2**20:.1f} MB, {free}; {kept}. Free some space (or point paths.log_dir "
            "at another disk) and run the same command again to continue")


def tensor_digest(*tensors: torch.Tensor, extra: str = "") -> str:
    """A hex digest of tensors' shapes, dtypes and bytes (and of ``extra``): what a dataset's
    or a network's content is, for keys of stored results."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(extra.encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():  # the tensor's own buffer: no copy of a 170 MB training set
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_safely(path: Path, key: str, missing: str, folder: str) -> Any:
    """``torch.load(weights_only=True)`` of a file a user named with ``key``: a folder, a missing
    file, or a file that does not load safely (another format, damaged, or a pickle that would
    run code) is one :class:`KdlabError` line naming it, ending in ``missing`` / ``folder``."""
    path = Path(path)
    if path.is_dir():
        raise KdlabError(f"{key}={path} is a folder: {folder}")
    if not path.is_file():
        raise KdlabError(f"{key}={path} does not exist: {missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch says, the line is the same
        detail = str(e).splitlines()[0][:150] if str(e) else ""
        raise KdlabError(f"{key}={path} could not be loaded with weights_only=True "
                         f"({type(e).__name__}: {detail})") from None


def sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (to detect damaged files)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class VerifiedFile:
    """A file saved with a JSON sidecar that records its size and SHA-256 (and any metadata):
    the one way kdlab keeps results that later runs reuse (stored teachers, teacher-output
    caches). Reading checks the file against its sidecar; an entry that cannot be proven
    intact (missing sidecar, other size or hash, unreadable) is moved aside and reported, and
    the caller rebuilds it. Writing goes through a temporary file in the same folder and a
    rename, the sidecar last, so a crash leaves the old entry, or a new file without a sidecar
    (which the next read moves aside).

    Args:
        path: the file (``teacher.pt``, ``<key>.pt``).
        sidecar: its metadata file (default: ``path`` with a ``.json`` suffix).
    """

    def __init__(self, path: Path, sidecar: Path | None = None) -> None:
        self.path = Path(path)
        self.sidecar = Path(sidecar) if sidecar is not None else self.path.with_suffix(".json")

    def metadata(self) -> dict[str, Any] | None:
        """The sidecar's content, or ``None`` when it is missing or unreadable."""
        try:
            meta = json.loads(self.sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return meta if isinstance(meta, dict) else None

    def problem(self) -> str | None:
        """What is wrong with the entry (``None``: intact). A missing file is no problem of
        the entry's: check :meth:`exists` first."""
        meta = self.metadata()
        if meta is None or "bytes" not in meta or "sha256" not in meta:
            return "no readable record of its size and SHA-256 (its .json), so it cannot be " \
                   "verified"
        size = self.path.stat().st_size
        if size != meta["bytes"]:
            return f"{size} bytes instead of {meta['bytes']} (truncated)"
        if sha256(self.path) != meta["sha256"]:
            return "a SHA-256 that differs from the one recorded when it was saved (corrupted)"
        return None

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, obj: Any, meta: dict[str, Any] | None = None) -> None:
        """``torch.save(obj)`` atomically, then the sidecar with size, SHA-256 and ``meta``."""
        save_atomic(obj, self.path)
        record = {**(meta or {}), "bytes": self.path.stat().st_size, "sha256": sha256(self.path)}
        write_json(self.sidecar, record)

    def move_aside(self, reason: str, label: str) -> Path:
        """Rename the damaged file to ``<name>.corrupt-<time>`` and log ``reason``."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(self.path, aside)
        log.warning("%s: the stored file %s has %s; moved it to %s and building it again",
                    label, self.path, reason, aside)
        return aside


def finite_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every NaN or infinite float replaced by ``None`` (strict JSON has no NaN),
    and the dotted keys where that happened."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [where or "."]
    if isinstance(obj, dict):
        out, keys = {}, []
        for k, v in obj.items():
            out[k], found = finite_json(v, f"{where}.{k}" if where else str(k))
            keys += found
        return out, keys
    if isinstance(obj, (list, tuple)):
        items = [finite_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in items], [k for _, found in items for k in found]
    return obj, []


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict, indented JSON (a non-finite float becomes ``null``:
    :func:`finite_json`) atomically (:func:`write_atomic`): readers see the old file or the
    complete new one."""
    text = json.dumps(finite_json(obj)[0], indent=2, default=str, allow_nan=False)
    write_atomic(Path(path), text.encode())
