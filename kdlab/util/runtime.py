"""Process-level settings of a run: allocator and NVML speed settings, memory handed back
between stages, and signals that stop a run (:class:`RunStopped`)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_tuned = False
_malloc_trim = None  # glibc's malloc_trim once looked up, False where there is none


def tune_allocator() -> bool:
    """Stop glibc from handing freed memory back to the OS after every large tensor is freed.

    By default glibc serves allocations above a (dynamic) threshold with fresh ``mmap`` pages
    and trims the heap whenever its free top exceeds a threshold, so every teacher forward pass
    page-faults its activations in again; on this project's CPU benchmark that cost about a
    third of a distillation step (docs/BENCHMARKS.md). This sets the equivalents of
    ``MALLOC_MMAP_THRESHOLD_=32MiB`` and ``MALLOC_TRIM_THRESHOLD_=256MiB`` with ``mallopt``.

    Does nothing (and returns ``False``) off glibc, or when the user set any ``MALLOC_*``
    variable themselves (their choice wins). Idempotent; returns whether the settings apply.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _ENV):
        return False
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _tuned = ok
    if ok:
        log.info("glibc allocator: mmap threshold 32 MiB, trim threshold 256 MiB "
                 "(tune_allocator=false, or any MALLOC_* variable, leaves it alone)")
    return ok


def release_free_memory() -> bool:
    """Hand the allocator's free memory back to the OS (glibc's ``malloc_trim(0)``, which also
    releases free pages inside the heap, not only at its top).

    With :func:`tune_allocator`'s thresholds, memory freed by a finished stage (teacher
    training, the teacher-output cache pass) otherwise stays in the process as free heap:
    300 MB after three teacher epochs on the main job. Called between stages; takes
    milliseconds. Returns whether it ran (``False`` off glibc)."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


def skip_failing_nvml_check() -> bool:
    """Drop Lightning's ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` where NVML cannot be loaded.

    Lightning sets the variable on import so that ``torch.cuda.is_available()`` asks NVML
    (which does not initialise CUDA). On a machine without the NVIDIA driver, a CUDA build of
    torch then tries to load ``libnvidia-ml.so.1`` on *every* call, fails, and falls back to the
    CUDA runtime check anyway; torch's optimizers make that call on every ``step()``, which cost
    ~0.2 ms per step here (docs/BENCHMARKS.md). Without NVML the answer is the same either way,
    so the variable is set to ``0``. Returns whether it changed anything.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return False  # NVML works: keep Lightning's fork-safe check
    except OSError:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
        log.debug("no NVML library: PYTORCH_NVML_BASED_CUDA_CHECK=0 (same answer, no retry)")
        return True


def apply_speed_settings(tune_malloc: bool = True) -> None:
    """What ``kdlab-train`` does at start-up: :func:`skip_failing_nvml_check` and, unless
    ``tune_malloc`` is false, :func:`tune_allocator`."""
    skip_failing_nvml_check()
    if tune_malloc:
        tune_allocator()


class RunStopped(BaseException):
    """The run was stopped by a signal before it finished: SIGTERM (a scheduler's stop,
    ``timeout``) or SIGINT (Ctrl-C). A ``BaseException``, like ``KeyboardInterrupt``, so that
    no ``except Exception`` on the way swallows it; the command line exits with
    ``128 + signal`` and the command that resumes the run (:mod:`kdlab.train`)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        """``128 + signal number``, as a shell reports a process killed by the signal."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise :class:`RunStopped` (in the main thread;
    elsewhere nothing changes). Lightning's own SIGTERM handler, installed while a Trainer fits,
    calls this one after noting the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        if _deferring:
            _pending.append(signum)
            return
        raise RunStopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_deferring = 0  # depth of signals_deferred blocks in the main thread
_pending: list[int] = []  # signals that came during them


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A block that a stop (:func:`stop_on_signals`) does not cut in two: a signal that comes
    while it runs is raised as :class:`RunStopped` when it ends. For writes that must not be
    left half done, such as a ``metrics.csv`` rewritten with a wider header. Elsewhere than
    in the main thread, or outside :func:`stop_on_signals`, it changes nothing."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        came = list(_pending) if not _deferring else []
        if not _deferring:
            _pending.clear()
    if came:  # an error of the block itself goes on instead (the run fails either way)
        raise RunStopped(came[0])


def capture_rng() -> dict[str, Any]:
    """The global random state (CPU, and CUDA once initialised)."""
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global random state to ``state`` (from :func:`capture_rng`)."""
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
