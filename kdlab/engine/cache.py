"""The teacher-output cache: a frozen teacher's outputs computed once per training input.

Offline distillation runs the same frozen teacher on the same training images every epoch. When
the student's batches are not randomly augmented, the teacher's outputs for sample ``j`` never
change, so kdlab computes them once (logits, plus the tapped features a strategy reads when they
fit in ``teacher_cache.max_mb``), keeps them in memory, and looks them up by sample index in
every step. The tensors are also saved beside the teacher store
(``<paths.teacher_store>/cache/<key>.pt``) and memory-mapped by later runs, so every run of a
sweep with that teacher and that data reuses them.

Under random augmentation (``data.augment``, ``data.mix``) the cache is *exact-view*: a
:class:`~kdlab.data.views.ViewBank` draws ``teacher_cache.views`` augmented views of every
training sample up front (their random parameters, not their images), the teacher's outputs
are computed once per view, and the student trains on exactly the view whose outputs it reads
(the datamodule renders it from the same parameters; each appearance of a sample shows its next
view). The build shows a progress bar and, with ``disk``, saves its progress (``<key>.partial.pt``)
so an interrupted build continues where it stopped. ``teacher_cache.views=0`` runs the teacher
live on fresh random views instead.

**Language models.** A training window of token ids ``[T]`` is a sample whose outputs are one
distribution per token, ``(T, V)``: the cache stores them per window (``(N, T, V)``, or with
``teacher_cache.topk`` the ``k`` largest logits of every token, their token ids and one fill
value: ``T·(4k + 2)`` bytes per window in float16 instead of ``T·2V``) and a lookup returns one
row per token, ``(B·T, V)``, as the live teacher's outputs are read (a token is a row). Full
rows are converted to float32 per batch rather than held as a float32 copy of the whole split.

The key hashes the teacher's weights, the training split's tensors (dataset, split and
normalisation all change them), the tapped module paths, the stored dtype and, for a view bank,
its drawn parameters; a run that changes any of them computes a new entry.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.data.views import ViewBank
from kdlab.engine.spec import CacheOptions
from kdlab.engine.taps import Taps
from kdlab.engine.topk import compress, expand
from kdlab.strategies.base import Outputs
from kdlab.util.errors import KdlabError
from kdlab.util.files import ReadOnlyFolder, VerifiedFile, locked, tensor_digest
from kdlab.util.runtime import release_free_memory

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 2: rows are (sample, view) pairs; 3: named tensors, optional top-k
#: seconds between two saves of a view-bank build's progress (``<key>.partial.pt``)
PARTIAL_EVERY_S = 30.0
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class TeacherCache:
    """Teacher outputs by training-sample index: ``logits`` ``(N·V, C)`` and ``features``
    ``{path: (N·V, ...)}``, stored in a compact dtype and returned as float32. Row
    ``j·V + v`` holds view ``v`` of sample ``j`` (``views`` ``V``; ``bank`` draws them), or
    sample ``j`` itself without a bank (``V = 1``). With ``topk`` (``(index, fill)``, see
    :mod:`kdlab.engine.topk`) ``logits`` holds the ``k`` largest logits of each row, expanded
    to ``classes`` logits when looked up."""

    def __init__(self, logits: torch.Tensor, features: dict[str, torch.Tensor] | None = None,
                 path: Path | None = None, bank: ViewBank | None = None,
                 topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                 classes: int | None = None) -> None:
        self.logits = logits
        self.bank = bank
        self.views = bank.views if bank is not None else 1
        self.features = dict(features or {})
        self.path = path
        self.topk = topk
        self.classes = classes if classes is not None else logits.shape[-1]
        #: a language model's cache: ``(N, T, ·)`` per window, looked up as one row per token
        self.tokens = logits.dim() == 3
        #: full logits as float32 in memory (N × classes) so a lookup is a single gather;
        #: top-k rows and token windows are expanded / converted per batch instead
        self._logits32 = logits.float() if topk is None and not self.tokens else None
        self._log_probs: dict[float, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        tensors = [self.logits, *self.features.values(), *(self.topk or ())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device) -> TeacherCache:
        """Move the tensors to ``device`` (a no-op when they are there)."""
        if self.logits.device != device:
            self.logits = self.logits.to(device)
            if self._logits32 is not None:
                self._logits32 = self._logits32.to(device)
            if self.topk is not None:
                self.topk = (self.topk[0].to(device), self.topk[1].to(device))
            self._log_probs = {}
            self.features = {k: v.to(device) for k, v in self.features.items()}
        return self

    def lookup(self, index: torch.Tensor, view: torch.Tensor | None = None) -> Outputs:
        """The teacher's :class:`Outputs` for the samples ``index`` (positions in the split)
        shown as views ``view`` of the bank (``None`` without one); each field is gathered
        when a strategy first reads it."""
        if self.logits.device != index.device:
            self.to(index.device)
        if self.bank is not None:
            if view is None:
                raise KdlabError("the teacher cache holds augmented views but the batch did not "
                                 "say which views it shows (a datamodule without view support)")
            index = index * self.views + view
        return CachedOutputs(self, index)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits of ``rows`` (top-k rows expanded to every class); for token windows
        one row per token, ``(len(rows)·T, V)``."""
        if self.topk is None:
            if self._logits32 is not None:
                return self._logits32.index_select(0, rows)
            out = self.logits.index_select(0, rows).float()
        else:
            index, fill = self.topk
            out = expand(self.logits.index_select(0, rows), index.index_select(0, rows),
                         fill.index_select(0, rows), self.classes)
        return out.flatten(0, 1) if self.tokens else out

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
            self._logits = self._cache.rows(self._index)
        return self._logits

    @property
    def features(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if self._features is None:
            self._features = {k: v.index_select(0, self._index).float()
                              for k, v in self._cache.features.items()}
        return self._features

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        if self._cache._logits32 is None:  # top-k or token rows: per batch
            return torch.log_softmax(self.logits / float(temperature), dim=1)
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


def cache_key(teacher: nn.Module, x_train: torch.Tensor, paths: list[str], dtype: str,
              bank: ViewBank | None = None, topk: int | None = None) -> str:
    """``<teacher hash>-<data hash>-<outputs hash>``: what makes cached outputs valid (the
    outputs hash covers the stored dtype, the tapped paths and a view bank's parameters)."""
    state = teacher.state_dict()
    weights = tensor_digest(*state.values(), extra=",".join(state))
    data = tensor_digest(x_train)
    views = bank.digest() if bank is not None else "none"
    outputs = tensor_digest(extra=f"{CACHE_FORMAT}|{dtype}|{','.join(paths)}|{views}|{topk}")
    return f"{weights[:12]}-{data[:12]}-{outputs[:8]}"


def _per_sample_bytes(teacher: nn.Module, taps: Taps | None, x: torch.Tensor,
                      channels_last: bool, itemsize: int, topk: int | None
                      ) -> tuple[int, bool, int]:
    """Bytes per stored input of logits (or their top-``k``) + features, whether features are
    read at all, and the number of classes."""
    logits, features = compute_outputs(teacher, taps, x[:2], channels_last=channels_last)
    classes = logits.shape[-1]
    rows = logits[0].numel() // classes  # distributions per input: 1, or a window's tokens
    features_bytes = sum(v[0].numel() for v in features.values()) * itemsize
    if topk and topk < classes:  # values and the fill in the dtype, indices in int16/32
        index_bytes = 2 if classes <= torch.iinfo(torch.int16).max else 4
        return rows * (topk * (itemsize + index_bytes) + itemsize) + features_bytes, \
            bool(features), classes
    return logits[0].numel() * itemsize + features_bytes, bool(features), classes


def prepare_cache(options: CacheOptions, teacher: nn.Module | None, taps: Taps | None,
                  data: Any, channels_last: bool, quick: bool = False) -> TeacherCache | None:
    """The cache for this stage per ``options`` (``teacher_cache.*``), or ``None`` (a live
    teacher). ``data`` is the stage's datamodule: its in-memory training split (``x_train``)
    and, when its batches are randomly augmented or mixed (``augmented``), its view support
    (``draw_views`` / ``render_views``, :mod:`kdlab.data.views`) make the cache exact. A
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

    x_train = getattr(data, "x_train", None)
    if quick and enabled != True:  # noqa: E712 - auto, not required
        log.info("Teacher cache: off under trainer.fast_dev_run (a few batches): the teacher "
                 "runs live instead of over all %s training samples",
                 len(x_train) if x_train is not None else "the")
        return None
    if x_train is None:
        live("the data is read from disk batch by batch (the cache needs an in-memory dataset)")
        return None
    bank = None
    if getattr(data, "augmented", False):
        what = "data.mix" if getattr(data, "mix", "none") != "none" else "data.augment"
        if options.views == 0:
            live(f"{what} gives the student a new random view every step and "
                 "teacher_cache.views=0 asks for no stored views")
            return None
        if not hasattr(data, "draw_views"):
            live(f"{what} is applied by a datamodule ({type(data).__name__}) that cannot "
                 "replay stored views")
            return None
        bank = data.draw_views(options.views, options.view_seed)
    rows = len(x_train) * (bank.views if bank is not None else 1)
    per_sample, has_features, classes = _per_sample_bytes(teacher, taps, x_train, channels_last,
                                                          dtype.itemsize, options.topk)
    topk = options.topk if options.topk and options.topk < classes else None
    size_mb = per_sample * rows / 2**20
    if size_mb > options.max_mb:
        views = f" for {bank.views} views per sample" if bank is not None else ""
        hint = (f" (teacher_cache.topk=k keeps k of the {classes} logits per row)"
                if topk is None and classes > 2 else "")
        live(f"its {'logits and features' if has_features else 'logits'}{views} would take "
             f"{size_mb:,.0f} MB > teacher_cache.max_mb={options.max_mb:g}{hint}")
        return None

    paths = sorted(taps.paths) if taps is not None else []
    key = cache_key(teacher, x_train, paths, dtype_name, bank, topk)
    build = _Build(teacher, taps, data, bank, channels_last, dtype, options.progress, topk)
    if options.folder is None:
        return build.run(None)
    entry = VerifiedFile(Path(options.folder) / f"{key}.pt")
    cache = _load(entry, len(x_train), bank, repair=False)  # an intact file needs no lock
    if cache is not None:
        return cache
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(locked(entry.path.with_name(f".{key}.lock"),
                                      f"the teacher-output cache {key}"))
        except ReadOnlyFolder as e:
            log.info("Teacher cache: %s, so the teacher's outputs are computed for this run "
                     "only", e)
            return build.run(None)
        cache = _load(entry, len(x_train), bank)
        if cache is None:
            cache = build.run(entry.path)
            tensors = {"logits": cache.logits,
                       **{f"{FEATURE}{k}": v for k, v in cache.features.items()}}
            if cache.topk is not None:
                tensors.update(topk_index=cache.topk[0], topk_fill=cache.topk[1])
            entry.save({"format": CACHE_FORMAT, "views": cache.views, "classes": cache.classes,
                        "tensors": tensors},
                       {"key": key, "samples": len(x_train), "views": cache.views,
                        "topk": options.topk,
                        **({"bank": bank.describe()} if bank is not None else {})})
            build.done(entry.path)
            log.info("Teacher cache: saved %s for reuse by later runs", entry.path)
    return cache


class _Build:
    """Computing a cache: the teacher over the training split, or over every view of a bank,
    in chunks, view by view, with a progress bar; with a file, progress is saved every
    :data:`PARTIAL_EVERY_S` seconds to ``<key>.partial.pt`` and picked up by the next build.
    Outputs are stored as named tensors ``(N, V, ...)``: ``logits`` (or, with ``topk``, the
    top-k ``logits`` with ``topk_index`` and ``topk_fill``) and ``feature:<path>``."""

    def __init__(self, teacher: nn.Module, taps: Taps | None, data: Any, bank: ViewBank | None,
                 channels_last: bool, dtype: torch.dtype, progress: bool,
                 topk: int | None = None) -> None:
        self.teacher, self.taps, self.data, self.bank = teacher, taps, data, bank
        self.channels_last, self.dtype, self.progress = channels_last, dtype, progress
        self.topk = topk
        self.classes = 0  # known from the first chunk's logits

    def run(self, file: Path | None) -> TeacherCache:
        start = time.perf_counter()
        n = len(self.data.x_train)
        tensors = {k: v.flatten(0, 1) for k, v in self._compute(file).items()}
        cache = _cache_from(tensors, file, self.bank, self.classes)
        views = f" × {self.bank.views} augmented views" if self.bank is not None else ""
        if cache.tokens:
            views += f" (windows of {cache.logits.shape[1]} tokens)"
        topk = f", top-{self.topk} of {self.classes} logits" if self.topk else ""
        log.info("Teacher cache: computed the teacher's outputs for %d training samples%s "
                 "(%s%s, %.1f MB %s) in %.1f s; the teacher will not run during training",
                 n, views, ", ".join(["logits", *cache.features]), topk,
                 cache.nbytes / 2**20, str(self.dtype)[6:], time.perf_counter() - start)
        return cache

    def _stored(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` in the cache's dtype; a value out of its range fails naming it."""
        if self.dtype != torch.float32 and len(value) and \
                value.abs().max() > torch.finfo(self.dtype).max:
            raise KdlabError(f"teacher output {name} exceeds the range of "
                             f"teacher_cache.dtype={str(self.dtype)[6:]}: use float32")
        return value.to(self.dtype)

    def _named(self, logits: torch.Tensor, features: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
        """One chunk's outputs as the stored named tensors."""
        self.classes = logits.shape[-1]
        if self.topk:
            values, index, fill = compress(logits, self.topk)
            out = {"logits": self._stored("logits", values), "topk_index": index,
                   "topk_fill": self._stored("logits", fill)}
        else:
            out = {"logits": self._stored("logits", logits)}
        out.update({f"{FEATURE}{k}": self._stored(k, v) for k, v in features.items()})
        return out

    def _images(self, index: torch.Tensor, view: int) -> torch.Tensor:
        if self.bank is None:
            return self.data.x_train.index_select(0, index)
        return self.data.render_views(self.bank, index, torch.full_like(index, view))

    def _compute(self, file: Path | None) -> dict[str, torch.Tensor]:
        n = len(self.data.x_train)
        views = self.bank.views if self.bank is not None else 1
        partial = VerifiedFile(file.with_name(f"{file.stem}.partial.pt")) if file else None
        done, stored = self._resume(partial, n, views)
        bar = _progress_bar(n * views, done * n, self.progress and self.bank is not None)
        last_save = time.perf_counter()
        chunk = INFERENCE_BATCH * 4
        try:
            for v in range(done, views):
                for start in range(0, n, chunk):
                    index = torch.arange(start, min(start + chunk, n))
                    named = self._named(*compute_outputs(self.teacher, self.taps,
                                                         self._images(index, v),
                                                         channels_last=self.channels_last))
                    if stored is None:
                        stored = {k: torch.empty((n, views, *t.shape[1:]), dtype=t.dtype)
                                  for k, t in named.items()}
                    for k, t in named.items():
                        stored[k][start : start + len(index), v] = t
                    bar(len(index))
                if partial is not None and v + 1 < views and \
                        time.perf_counter() - last_save >= PARTIAL_EVERY_S:
                    partial.save({"format": CACHE_FORMAT, "done": v + 1, "tensors": stored},
                                 {"done": v + 1, "views": views})
                    last_save = time.perf_counter()
        finally:
            bar(None)
        release_free_memory()  # the pass's freed activations
        return stored

    def _resume(self, partial: VerifiedFile | None, n: int, views: int
                ) -> tuple[int, dict[str, torch.Tensor] | None]:
        """Views already computed by an interrupted build (0 and nothing without one)."""
        if partial is None or not partial.exists():
            return 0, None
        problem = partial.problem()
        if problem is None:
            try:
                obj = torch.load(partial.path, map_location="cpu", weights_only=True)
                stored, done = dict(obj["tensors"]), int(obj["done"])
                logits = stored["logits"]
                if obj.get("format") != CACHE_FORMAT or logits.shape[:2] != (n, views) or \
                        logits.dtype != self.dtype or ("topk_index" in stored) != bool(
                        self.topk):
                    problem = "the progress of another build"
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
                problem = f"unreadable content ({type(e).__name__})"
        if problem is not None:
            partial.move_aside(problem, "Teacher cache")
            return 0, None
        log.info("Teacher cache: continuing an interrupted build at view %d of %d (%s)",
                 done + 1, views, partial.path)
        return done, stored

    def done(self, file: Path) -> None:
        """Remove the build's progress file once the entry is saved."""
        partial = VerifiedFile(file.with_name(f"{file.stem}.partial.pt"))
        for path in (partial.path, partial.sidecar):
            path.unlink(missing_ok=True)


#: prefix of a tapped feature's name among a cache's stored tensors
FEATURE = "feature:"


def _cache_from(tensors: dict[str, torch.Tensor], path: Path | None, bank: ViewBank | None,
                classes: int) -> TeacherCache:
    """A :class:`TeacherCache` of stored named tensors (rows ``j·V + v``)."""
    features = {k[len(FEATURE):]: v for k, v in tensors.items() if k.startswith(FEATURE)}
    topk = (tensors["topk_index"], tensors["topk_fill"]) if "topk_index" in tensors else None
    return TeacherCache(tensors["logits"], features, path, bank, topk, classes)


def _progress_bar(total: int, initial: int, enabled: bool) -> Callable[[int | None], None]:
    """``update(n)`` of a tqdm bar over ``total`` images (``update(None)`` closes it); a no-op
    when disabled."""
    if not enabled:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc="Teacher cache (views)", unit="img",
               dynamic_ncols=True, leave=False)

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)

    return update


def _load(entry: VerifiedFile, samples: int, bank: ViewBank | None,
          repair: bool = True) -> TeacherCache | None:
    """A saved cache, memory-mapped; ``None`` when missing. A file that cannot be proven intact
    (:class:`~kdlab.util.files.VerifiedFile`), cannot be read or holds another number of
    samples or views is reported and rebuilt (``repair``, under the lock), or just not used."""
    if not entry.exists():
        return None
    views = bank.views if bank is not None else 1
    rows = samples * views
    problem = entry.problem()
    if problem is None:
        try:
            obj: Any = torch.load(entry.path, map_location="cpu", weights_only=True, mmap=True)
            tensors = dict(obj["tensors"])
            if obj.get("format") != CACHE_FORMAT or obj.get("views") != views or \
                    "logits" not in tensors or any(len(v) != rows for v in tensors.values()):
                problem = (f"outputs of another format or size (not {samples} samples × "
                           f"{views} views)")
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            problem = f"unreadable content ({type(e).__name__})"
    if problem is not None:
        if repair:
            entry.move_aside(problem, "Teacher cache")
        return None
    what = f"{samples} samples × {views} views" if bank is not None else f"{samples} samples"
    log.info("Teacher cache: reusing %s (%s, memory-mapped)", entry.path, what)
    return _cache_from(tensors, entry.path, bank, int(obj["classes"]))
