"""Finished runs read back: ``results.json`` files found, grouped by the config keys that differ
(:mod:`kdlab.compare.labels`), aggregated over seeds into table rows (mean ± std, n), each stage
paired with the baseline of its run (the gain), identical baselines shown once and runs of
different length flagged; the tables :mod:`kdlab.compare.cli` prints and writes.

**Baselines shown once.** A sweep over strategies trains (or, with the baseline store, reuses)
the same no-teacher baseline in every job, so the ``baseline`` rows of the groups are the same
numbers. Rows of the ``baseline`` stage whose runs hold the same set of baselines are one row,
labelled by the values of every group it serves (``distill=kd|dkd``). A baseline is identified
by the ``key`` of its ``results.json`` entry (the baseline store's identity); an entry without a
``key`` (older results) is identified by its run's flattened config — without the keys a
baseline never reads (every ``distill.``, ``teacher.``, ``teacher_cache.`` and ``compress.``
key), the label ``task_name``, and the bookkeeping keys that never define a group except the
seed — together with its metrics: two such entries are the same baseline only when both are
equal.

**Gain over the baseline.** For every stage but the teacher and the baseline, the gain of a run
is its metric minus the metric of the ``baseline`` stage of the same run, or, for a run that
trained none (``baseline=false``), of a run with the same seed whose baseline identity config
(above) is equal. The row's gain is the mean ± std of these per-seed gains over the runs that
have a pair (``gain n``).

**Length.** A stage's length is the number of epochs it trained (its ``epochs`` metric; the
config's ``trainer.max_epochs`` for a student or baseline entry without it) and the budget it
was given: ``trainer.max_epochs`` (a schedule follows it), ``trainer.max_steps`` and
``trainer.limit_train_batches``. Rows of the same stage whose lengths differ are flagged
(:attr:`Row.length_differs`, :func:`length_notes`)."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.compare.labels import ignored, label_keys, short_names
from kdlab.util.errors import KdlabError, close_matches

TEACHER, BASELINE = "teacher", "baseline"

#: columns of the comparison table after the group keys (their names are not label names)
COLUMNS = ("stage", "model", "n", "epochs", "params", "run", "runs", "seed")

#: a stage's length: (epochs trained, trainer.max_epochs, trainer.max_steps,
#: trainer.limit_train_batches), ``None`` where unset
Length = tuple[Any, Any, Any, Any]


@dataclass
class Run:
    """One finished run: its folder, its ``results.json`` and its flattened config."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def budget(self) -> tuple[Any, Any, Any]:
        """``trainer.max_epochs``, ``trainer.max_steps`` and ``trainer.limit_train_batches``
        where they limit training (``None`` for unset, -1 steps, or the float 1.0: all
        batches)."""
        epochs = self.config.get("trainer.max_epochs")
        steps = self.config.get("trainer.max_steps")
        batches = self.config.get("trainer.limit_train_batches")
        if isinstance(steps, (int, float)) and steps < 0:
            steps = None
        if isinstance(batches, float) and batches == 1.0:
            batches = None
        return epochs, steps, batches


@dataclass
class Entry:
    """One stage of one run: the numbers a row aggregates."""

    run: Run
    info: dict[str, Any]
    value: float
    baseline: float | None = None  # the metric of the baseline paired with this entry

    @property
    def stage(self) -> str:
        return str(self.info.get("stage", "student"))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.info.get("metrics") or {})

    @property
    def gain(self) -> float | None:
        return None if self.baseline is None else self.value - self.baseline

    @property
    def stage_dir(self) -> Path | None:
        """The folder of the stage's checkpoints and logs; the run's folder for a student
        entry without checkpoints; ``None`` for a network this stage did not train (a stored
        teacher, a quantised copy)."""
        ckpt = self.info.get("best_ckpt") or self.info.get("last_ckpt")
        if ckpt:
            return Path(ckpt).parent.parent
        return self.run.path if self.stage == "student" else None

    def teacher_identity(self) -> str:
        """Which network a teacher entry is: the store key or the file of its ``source``,
        else its model and metric."""
        source = self.info.get("source")
        if isinstance(source, Mapping) and (source.get("key") or source.get("path")):
            return f"source:{source.get('key') or source.get('path')}"
        return json.dumps([self.info.get("model"), self.value], default=str)

    @property
    def length(self) -> Length | None:
        """(epochs trained, max epochs, max steps, batches per epoch) of this stage's training;
        ``None`` unknown."""
        epochs = self.metrics.get("epochs")
        if epochs is None and self.stage in ("student", BASELINE):
            epochs = self.run.config.get("trainer.max_epochs")
        if epochs is None:
            return None
        return (int(epochs), *self.run.budget())

    def identity(self) -> str:
        """The baseline this entry is: its store ``key``, else its run's baseline config and
        its metrics (module docstring)."""
        if self.info.get("key"):
            return f"key:{self.info['key']}"
        return "config:" + json.dumps([baseline_config(self.run), self.metrics],
                                      sort_keys=True, default=str)


@dataclass
class Row:
    """One (group, stage) of the comparison, aggregated over the group's runs."""

    group: dict[str, str]
    stage: str
    model: str
    entries: list[Entry]
    params: int | None
    #: the groups whose identical rows this one stands for (shared baselines); empty if none
    shared_by: list[dict[str, str]] = field(default_factory=list)
    #: whether rows of this stage have a different length (epochs, steps) than this one
    length_differs: bool = False

    @property
    def n(self) -> int:
        return len(self.entries)

    @property
    def runs(self) -> list[Path]:
        return [e.run.path for e in self.entries]

    @property
    def seeds(self) -> list[Any]:
        return [e.run.seed for e in self.entries]

    @property
    def test_acc(self) -> list[float]:
        """The aggregated metric of every run (``test/acc`` unless ``--metric``)."""
        return [e.value for e in self.entries]

    @property
    def val_acc(self) -> list[float]:
        return [float(e.metrics["val/acc"]) for e in self.entries
                if e.metrics.get("val/acc") is not None]

    @property
    def latencies(self) -> list[float]:
        return [float(e.info["latency_ms"]) for e in self.entries
                if e.info.get("latency_ms") is not None]

    @property
    def latency_ms(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None

    @property
    def stage_dirs(self) -> list[Path]:
        return [e.stage_dir for e in self.entries if e.stage_dir is not None]

    @property
    def gains(self) -> list[float]:
        """The per-seed gains over the baseline, of the runs that have one."""
        return [e.gain for e in self.entries if e.gain is not None]

    @property
    def lengths(self) -> list[Length]:
        return [e.length for e in self.entries if e.length is not None]

    @property
    def epochs(self) -> list[int]:
        return sorted({length[0] for length in self.lengths})

    @property
    def label(self) -> str:
        """``distill=kd, max_epochs=3``: the group's keys and values (``all runs`` if none)."""
        return ", ".join(f"{k}={v}" for k, v in self.group.items()) or "all runs"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become their JSON text."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, list):
        return {prefix[:-1]: json.dumps(node)}
    return {prefix[:-1]: node}


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` given or below the given folders, in a stable order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.name == "results.json":
            found.append(path)
        elif path.is_dir():
            hits = sorted(path.rglob("results.json"))
            if not hits:
                raise KdlabError(f"{path}: no results.json below this folder (is the run "
                                 "finished? kdlab-train writes it at the end of a run)")
            found += hits
        else:
            raise KdlabError(f"{path}: not a folder or a results.json file")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """The runs of :func:`find_results`; an unreadable file is named in the error."""
    runs = []
    for path in find_results(paths):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise KdlabError(f"{path}: not a readable results.json ({e})") from None
        if "student" not in results and not results.get("stages"):
            raise KdlabError(f"{path}: no student or stages in it; is it a kdlab results.json?")
        runs.append(Run(path.parent, results, run_config(results.get("config") or {})))
    return runs


def run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's config flattened (:func:`flatten`), with the choices that the config holds only
    as members: ``distill.name``, the label of its strategies (``kd``, ``kd+at``, ``none``;
    they sit under their names, ``distill.<name>.<key>``), and ``compress.name``, the parts
    that are on (``prune+quantize``, ``quantize``, ``none``)."""
    flat = flatten(config)
    distill = config.get("distill")
    if isinstance(distill, Mapping) and "name" not in distill:
        flat["distill.name"] = "+".join(str(k) for k, v in distill.items()
                                        if isinstance(v, Mapping)) or "none"
    compress = config.get("compress")
    if isinstance(compress, Mapping) and "name" not in compress:
        flat["compress.name"] = "+".join(str(k) for k, v in compress.items()
                                         if v not in (None, False, "none", {})) or "none"
    return flat


#: keys a baseline never reads: they do not enter its identity (module docstring)
NOT_BASELINE = ("distill.", "teacher.", "teacher_cache.", "compress.", "task_name")


def baseline_config(run: Run) -> dict[str, Any]:
    """The part of a run's config that defines its baseline (module docstring)."""
    return {k: v for k, v in run.config.items()
            if not (k.startswith(NOT_BASELINE) or (ignored(k) and k != "seed"))}


def group_keys(runs: Sequence[Run]) -> list[str]:
    """The config keys that label the groups (:func:`kdlab.compare.labels.label_keys`)."""
    return label_keys([run.config for run in runs])


def _stages(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    if results.get("stages"):
        return list(results["stages"])
    return [{"stage": role, **results[role]} for role in ("teacher", "student", "baseline")
            if results.get(role)]


def _check_keys(runs: Sequence[Run], keys: Sequence[str]) -> None:
    for key in keys:
        if not any(key in run.config for run in runs):
            options = sorted({k for run in runs for k in run.config})
            raise KdlabError(f"--by {key}: no run has this config key"
                             f"{close_matches(key, options)}")


def aggregate(runs: Sequence[Run], keys: Sequence[str] | None = None,
              metric: str = "test/acc") -> tuple[list[str], list[Row]]:
    """Group ``runs`` by ``keys`` (default :func:`group_keys`) and aggregate every stage: the
    rows, each stage paired with its baseline, shared baselines merged and lengths flagged.
    Returns the keys' short names (:func:`kdlab.compare.labels.short_names`) and the rows."""
    keys = list(group_keys(runs) if keys is None else keys)
    _check_keys(runs, keys)
    names = short_names(keys, reserved=COLUMNS)
    rows: dict[tuple, Row] = {}
    for run in runs:
        group = {names[k]: _short(run.config[k]) for k in keys if k in run.config}
        for info in _stages(run.results):
            value = (info.get("metrics") or {}).get(metric)
            if value is None:
                continue
            entry = Entry(run, info, float(value))
            ident = (tuple(group.items()), entry.stage)
            if ident not in rows:
                rows[ident] = Row(group, entry.stage, str(info.get("model", "")), [],
                                  info.get("params"))
            rows[ident].entries.append(entry)
    pair_baselines(list(rows.values()))
    merged = merge_shared(list(rows.values()))
    flag_lengths(merged)
    return [names[k] for k in keys], merged


def pair_baselines(rows: Sequence[Row]) -> None:
    """Set every entry's :attr:`Entry.baseline` (module docstring)."""
    own: dict[Path, float] = {}
    alike: dict[str, float] = {}
    for row in rows:
        if row.stage != BASELINE:
            continue
        for entry in row.entries:
            own.setdefault(entry.run.path, entry.value)
            alike.setdefault(_alike(entry.run), entry.value)
    for row in rows:
        if row.stage in (TEACHER, BASELINE):
            continue
        for entry in row.entries:
            entry.baseline = own.get(entry.run.path, alike.get(_alike(entry.run)))


def _alike(run: Run) -> str:
    return json.dumps(baseline_config(run), sort_keys=True, default=str)


def merge_shared(rows: Sequence[Row]) -> list[Row]:
    """The rows with every ``baseline`` row whose runs hold the same baselines as an earlier
    one folded into it (module docstring)."""
    kept: list[Row] = []
    first: dict[frozenset[str], Row] = {}
    for row in rows:
        ident = frozenset(e.identity() for e in row.entries) if row.stage == BASELINE else None
        if ident is None or ident not in first:
            if ident is not None:
                first[ident] = row
            kept.append(row)
            continue
        shared = first[ident]
        shared.shared_by = shared.shared_by or [shared.group]
        shared.shared_by.append(row.group)
    for row in kept:
        if row.shared_by:
            row.group = _joined(row.shared_by)
    return kept


def _joined(groups: Sequence[dict[str, str]]) -> dict[str, str]:
    """One group for several: each key's distinct values joined by ``|`` (``—`` where a
    group lacks the key)."""
    keys = list(dict.fromkeys(k for group in groups for k in group))
    return {k: "|".join(dict.fromkeys(group.get(k, "—") for group in groups)) for k in keys}


def flag_lengths(rows: Sequence[Row]) -> None:
    """Set :attr:`Row.length_differs` where rows of one stage (the teacher aside) have trained
    for different lengths: on every row whose length is not the one most rows of the stage
    share (on all of them when no length is the most common), and on a row whose own runs
    differ in length."""
    for stage in dict.fromkeys(row.stage for row in rows if row.stage != TEACHER):
        members = [row for row in rows if row.stage == stage and row.lengths]
        if len({length for row in members for length in row.lengths}) < 2:
            continue
        single = [row.lengths[0] if len(set(row.lengths)) == 1 else None for row in members]
        counts = Counter(length for length in single if length is not None).most_common()
        common = counts[0][0] if counts and (len(counts) == 1 or counts[0][1] > counts[1][1]) \
            else None
        for row, length in zip(members, single):
            row.length_differs = length is None or length != common


def length_text(length: Length, parts: Sequence[int] = (0, 1, 2, 3)) -> str:
    """``3 epochs``, ``1 epoch of max_epochs=2``, ``2 epochs, max_steps=500``: the ``parts``
    of the length (epochs trained, then the budget's keys) that are set; ``max_epochs`` only
    where it is not the number of epochs trained."""
    epochs, max_epochs = length[:2]
    text = f"{epochs} epoch{'s' * (epochs != 1)}"
    if 1 in parts and max_epochs is not None and max_epochs != epochs:
        text += f" of max_epochs={max_epochs}"
    names = {2: "max_steps", 3: "limit_train_batches"}
    return ", ".join([text, *(f"{names[i]}={length[i]}" for i in parts
                              if i in names and length[i] is not None)])


def length_notes(rows: Sequence[Row]) -> list[str]:
    """One line per stage whose rows differ in length: each length (the parts that differ)
    and the groups that have it; empty when every stage's rows have the same length."""
    notes = []
    for stage in dict.fromkeys(row.stage for row in rows if row.length_differs):
        by_length: dict[Length, list[str]] = {}
        for row in rows:
            if row.stage == stage:
                for length in dict.fromkeys(row.lengths):
                    by_length.setdefault(length, []).append(row.label)
        differ = [i for i in range(4) if len({length[i] for length in by_length}) > 1]
        texts = [f"{length_text(length, differ)} ({'; '.join(labels)})"
                 for length, labels in by_length.items()]
        notes.append(f"{stage} rows of different length side by side: " + " vs ".join(texts))
    return notes


def _short(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text.rsplit(".", 1)[-1] if text.count(".") > 1 and " " not in text else text


def is_percent(metric: str) -> bool:
    """Whether ``metric`` is a fraction shown in % (accuracies: ``test/acc``, ``val/acc``…);
    others (``test/bits_per_token``, ``test/loss``, ``test/teacher_kl``) are shown as they
    are, in their own units."""
    return metric.rsplit("/", 1)[-1].startswith("acc")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` for one value)."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan
