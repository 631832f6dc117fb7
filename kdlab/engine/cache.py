"""The teacher-output cache: a frozen teacher's outputs computed once per training sample.

Offline distillation runs the same frozen teacher on the same training images every epoch. When
the student's batches are not randomly augmented, the teacher's outputs for sample ``j`` never
change, so kdlab computes them once (logits, plus the tapped features a strategy reads when they
fit in ``teacher_cache.max_mb``), keeps them in memory, and looks them up by sample index in
every step. The tensors are also saved beside the teacher store
(``<paths.teacher_store>/cache/<key>.pt``) and memory-mapped by later runs, so every run of a
sweep with that teacher and that data reuses them.

The key hashes the teacher's weights, the training split's tensors (dataset, split and
normalisation all change them), the tapped module paths and the stored dtype; a run that changes
any of them computes a new entry. With random augmentation (``data.augment=true``) the teacher
must see each step's augmented view (and each mixed batch with ``data.mix``), so
``teacher_cache.enabled=auto`` runs it live (and says
so), and ``teacher_cache.enabled=true`` fails with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.engine.spec import CacheOptions
from kdlab.engine.taps import Taps
from kdlab.strategies.base import Outputs
from kdlab.util.errors import KdlabError
from kdlab.util.files import ReadOnlyFolder, VerifiedFile, locked, tensor_digest
from kdlab.util.runtime import release_free_memory

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class TeacherCache:
    """Teacher outputs by training-sample index: ``logits`` ``(N, C)`` and ``features``
    ``{path: (N, ...)}``, stored in a compact dtype and returned as float32."""

    def __init__(self, logits: torch.Tensor, features: dict[str, torch.Tensor] | None = None,
                 path: Path | None = None) -> None:
        self.logits = logits
        self.features = dict(features or {})
        self.path = path
        #: logits as float32 in memory (small: N × classes) so a lookup is a single gather
        self._logits32 = logits.float()
        self._log_probs: dict[float, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        tensors = [self.logits, *self.features.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device) -> TeacherCache:
        """Move the tensors to ``device`` (a no-op when they are there)."""
        if self.logits.device != device:
            self.logits = self.logits.to(device)
            self._logits32 = self._logits32.to(device)
            self._log_probs = {}
            self.features = {k: v.to(device) for k, v in self.features.items()}
        return self

    def lookup(self, index: torch.Tensor) -> Outputs:
        """The teacher's :class:`Outputs` for the samples ``index`` (positions in the split);
        each field is gathered when a strategy first reads it."""
        if self.logits.device != index.device:
            self.to(index.device)
        return CachedOutputs(self, index)

    def log_probs_table(self, temperature: float) -> torch.Tensor:
        """``log_softmax(logits / T)`` of every sample, computed once per temperature."""
        table = self._log_probs.get(temperature)
        if table is None:
            table = torch.log_softmax(self._logits32 / temperature, dim=1)
            self._log_probs[temperature] = table
        return table


class CachedOutputs(Outputs):
    """:class:`Outputs` looked up in a :class:`TeacherCache`, gathered lazily: a strategy that
    reads only ``log_probs`` (KD) pays one gather from the cache's per-temperature table, not a
    gather of the logits and a softmax per batch."""

    def __init__(self, cache: TeacherCache, index: torch.Tensor) -> None:  # noqa: D107
        self._cache, self._index = cache, index
        self._logits: torch.Tensor | None = None
        self._features: dict[str, torch.Tensor] | None = None

    @property
    def logits(self) -> torch.Tensor:  # type: ignore[override]
        if self._logits is None:
            self._logits = self._cache._logits32.index_select(0, self._index)
        return self._logits

    @property
    def features(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if self._features is None:
            self._features = {k: v.index_select(0, self._index).float()
                              for k, v in self._cache.features.items()}
        return self._features

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        return self._cache.log_probs_table(float(temperature)).index_select(0, self._index)


#: batch size of inference passes outside the trainer (cache, test accuracy). On the CPU,
#: 256 Fashion-MNIST images keep the teacher's largest activation (25 MB) under glibc's tuned
#: 32 MiB mmap threshold, so its memory is reused from batch to batch; at 1,000 images every
#: activation is a fresh mapping, faulted in page by page: the cache pass took 3x as long
#: (17 s vs 5.6 s) and its peak memory was 3-7x higher (+260..620 MB vs +83 MB).
INFERENCE_BATCH = 256


def compute_outputs(teacher: nn.Module, taps: Taps | None, x: torch.Tensor,
                    batch_size: int = INFERENCE_BATCH, channels_last: bool = False
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``teacher`` (eval mode, no gradients) over ``x``; returns float32 logits and the
    tapped features, in the order of ``x``, on the CPU.

    The outputs are written into tensors allocated once, before the pass: keeping each
    batch's small outputs alive between the batches' large, freed activations fragments
    glibc's heap (on the main job it grew by 0.8 GB of free but unreturnable memory)."""
    logits: torch.Tensor | None = None
    features: dict[str, torch.Tensor] = {}
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters(), torch.empty(0)).device
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            if channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out = teacher(xb)
            if logits is None:
                logits = torch.empty((len(x), *out.shape[1:]), dtype=torch.float32)
            logits[start : start + len(out)] = out
            for name, value in (taps.pop() if taps is not None else {}).items():
                if name not in features:
                    features[name] = torch.empty((len(x), *value.shape[1:]),
                                                 dtype=torch.float32)
                features[name][start : start + len(value)] = value
    teacher.train(was_training)
    if logits is None:  # no samples
        return torch.empty(0), {}
    return logits, features


def cache_key(teacher: nn.Module, x_train: torch.Tensor, paths: list[str], dtype: str) -> str:
    """``<teacher hash>-<data hash>-<outputs hash>``: what makes cached outputs valid."""
    state = teacher.state_dict()
    weights = tensor_digest(*state.values(), extra=",".join(state))
    data = tensor_digest(x_train)
    outputs = tensor_digest(extra=f"{CACHE_FORMAT}|{dtype}|{','.join(paths)}")
    return f"{weights[:12]}-{data[:12]}-{outputs[:8]}"


def _per_sample_bytes(teacher: nn.Module, taps: Taps | None, x: torch.Tensor,
                      channels_last: bool, itemsize: int) -> tuple[int, bool]:
    """Bytes per sample of logits + features, and whether features are read at all."""
    logits, features = compute_outputs(teacher, taps, x[:2], channels_last=channels_last)
    numel = logits[0].numel() + sum(v[0].numel() for v in features.values())
    return numel * itemsize, bool(features)


def prepare_cache(options: CacheOptions, teacher: nn.Module | None, taps: Taps | None,
                  x_train: torch.Tensor | None, augment: bool, channels_last: bool,
                  mix: str = "none", quick: bool = False) -> TeacherCache | None:
    """The cache for this stage per ``options`` (``teacher_cache.*``), or ``None`` (a live
    teacher). Random augmentation (``augment``) and batch mixing (``mix`` other than ``none``,
    see :mod:`kdlab.data.mix`) change the student's input every step, so they rule it out. A
    ``quick`` stage (``trainer.fast_dev_run``: a few batches) runs the teacher live rather than
    over the whole training split, unless the cache is required."""
    enabled = options.enabled
    if teacher is None:
        return None
    if enabled is False:
        log.info("Teacher cache: off (teacher_cache.enabled=false), the teacher runs every step")
        return None
    dtype_name = options.dtype
    if dtype_name not in DTYPES:
        raise KdlabError(f"teacher_cache.dtype={dtype_name} must be one of {', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]

    def live(reason: str) -> None:
        if enabled is True:
            raise KdlabError(f"teacher_cache.enabled=true but {reason}: set "
                             "teacher_cache.enabled=auto to run the teacher live instead")
        log.info("Teacher cache: off, the teacher runs every step (%s)", reason)

    if quick and enabled != True:  # noqa: E712 - auto, not required
        log.info("Teacher cache: off under trainer.fast_dev_run (a few batches): the teacher "
                 "runs live instead of over all %s training samples",
                 len(x_train) if x_train is not None else "the")
        return None
    if mix not in (None, "none"):
        live(f"data.mix={mix} gives the student a new mixed view every step, which the "
             "teacher must see too (consistent teaching)")
        return None
    if augment:
        live("data.augment=true gives the student a new random view every step, which the "
             "teacher must see too")
        return None
    if x_train is None:
        live("the data is read from disk batch by batch (the cache needs an in-memory dataset)")
        return None
    per_sample, has_features = _per_sample_bytes(teacher, taps, x_train, channels_last,
                                                 dtype.itemsize)
    size_mb = per_sample * len(x_train) / 2**20
    if size_mb > options.max_mb:
        live(f"its {'logits and features' if has_features else 'logits'} would take "
             f"{size_mb:,.0f} MB > teacher_cache.max_mb={options.max_mb:g}")
        return None

    paths = sorted(taps.paths) if taps is not None else []
    key = cache_key(teacher, x_train, paths, dtype_name)
    if options.folder is None:
        return _build(teacher, taps, x_train, channels_last, dtype, None)
    entry = VerifiedFile(Path(options.folder) / f"{key}.pt")
    cache = _load(entry, len(x_train), repair=False)  # an intact file needs no lock
    if cache is not None:
        return cache
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(locked(entry.path.with_name(f".{key}.lock"),
                                      f"the teacher-output cache {key}"))
        except ReadOnlyFolder as e:
            log.info("Teacher cache: %s, so the teacher's outputs are computed for this run "
                     "only", e)
            return _build(teacher, taps, x_train, channels_last, dtype, None)
        cache = _load(entry, len(x_train))
        if cache is None:
            cache = _build(teacher, taps, x_train, channels_last, dtype, entry.path)
            entry.save({"format": CACHE_FORMAT, "logits": cache.logits,
                        "features": cache.features}, {"key": key, "samples": len(x_train)})
            log.info("Teacher cache: saved %s for reuse by later runs", entry.path)
    return cache


def _build(teacher: nn.Module, taps: Taps | None, x: torch.Tensor, channels_last: bool,
           dtype: torch.dtype, file: Path | None) -> TeacherCache:
    start = time.perf_counter()
    logits, features = compute_outputs(teacher, taps, x, channels_last=channels_last)
    release_free_memory()  # the pass's freed activations
    stored = {"logits": logits, **features}
    if dtype != torch.float32:
        for name, value in stored.items():
            if value.abs().max() > torch.finfo(dtype).max:
                raise KdlabError(f"teacher output {name} exceeds the range of "
                                 f"teacher_cache.dtype={str(dtype)[6:]}: use float32")
    logits = logits.to(dtype)
    features = {k: v.to(dtype) for k, v in features.items()}
    cache = TeacherCache(logits, features, file)
    log.info("Teacher cache: computed the teacher's outputs for %d training samples "
             "(%s, %.1f MB %s) in %.1f s; the teacher will not run during training",
             len(x), ", ".join(["logits", *features]), cache.nbytes / 2**20,
             str(dtype)[6:], time.perf_counter() - start)
    return cache


def _load(entry: VerifiedFile, samples: int, repair: bool = True) -> TeacherCache | None:
    """A saved cache, memory-mapped; ``None`` when missing. A file that cannot be proven intact
    (:class:`~kdlab.util.files.VerifiedFile`), cannot be read or holds another number of
    samples is reported and rebuilt (``repair``, under the lock), or just not used."""
    if not entry.exists():
        return None
    problem = entry.problem()
    if problem is None:
        try:
            obj: Any = torch.load(entry.path, map_location="cpu", weights_only=True, mmap=True)
            logits, features = obj["logits"], dict(obj["features"])
            if obj.get("format") != CACHE_FORMAT or len(logits) != samples or any(
                    len(v) != samples for v in features.values()):
                problem = f"outputs of another format or size (not {samples} samples)"
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            problem = f"unreadable content ({type(e).__name__})"
    if problem is not None:
        if repair:
            entry.move_aside(problem, "Teacher cache")
        return None
    log.info("Teacher cache: reusing %s (%d samples, memory-mapped)", entry.path, samples)
    return TeacherCache(logits, features, entry.path)
