"""Which config keys label the groups of ``kdlab-compare``, and their short names.

Every config key whose value differs between the runs labels the groups, except:

* keys that never define a group (:data:`IGNORED_PREFIXES`: where files went, the seed, the
  logger, progress bars, the resume switches, whether a baseline was also trained …);
* keys that follow the seed (their value is the run's seed in every run: ``data.label_seed:
  ${seed}``), since runs are aggregated over seeds;
* the options of a config-group choice that only change with that choice: under
  ``distill=kd`` vs ``distill=dkd`` the keys ``distill.kd.temperature`` or
  ``distill.dkd._target_`` add nothing, so they are shown only when they vary among the runs of
  one choice (a temperature sweep). A choice is a ``<prefix>.name`` key (``mode.name``; for
  ``distill`` and ``compress`` it is made from the members that are set: ``kd+at``,
  ``prune+quantize``, ``none``) or a ``<prefix>._target_`` key (``student.model._target_``).

A key is shown by the last part of its name where no other label key (or table column) has
the same last part, in full otherwise: ``trainer.max_epochs`` as ``max_epochs``, but
``trainer.max_epochs`` and ``teacher.train.max_epochs`` both in full; a choice key by its
prefix (``distill``, ``model``; ``student.model`` beside ``teacher.model``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: config keys that never define a group: where files went, the seed (aggregated over), the
#: resume switches, progress bars and summaries, the logger's folders, whether the run also
#: trained a baseline (it changes no stage's result)
IGNORED_PREFIXES = ("paths.", "hydra.", "seed", "ckpt_path", "resume", "baseline",
                    "trainer.enable_progress_bar", "trainer.enable_model_summary",
                    "tune_allocator", "logger.", "latency.", "callbacks.", "data.download")

#: the last part of a key that names a config-group choice
CHOICE_SUFFIXES = (".name", "._target_")

#: a config key that a run does not have
MISSING = object()


def ignored(key: str) -> bool:
    """Whether ``key`` never defines a group (:data:`IGNORED_PREFIXES`)."""
    return any(key == p.rstrip(".") or key.startswith(p) for p in IGNORED_PREFIXES)


def value_text(config: Mapping[str, Any], key: str) -> str:
    """``key``'s value in a flattened config, as JSON text (a missing key is distinct)."""
    value = config.get(key, MISSING)
    return "<missing>" if value is MISSING else json.dumps(value, default=str, sort_keys=True)


def follows_seed(configs: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Whether ``key`` holds the run's seed in every run (``data.label_seed: ${seed}``)."""
    return all(key in c and "seed" in c and value_text(c, key) == value_text(c, "seed")
               for c in configs)  # as JSON text: True is not the seed 1


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config keys (bookkeeping and seed followers aside) whose values are not the same in
    every run, sorted."""
    keys = sorted({k for config in configs for k in config})
    return [k for k in keys if not ignored(k)
            and len({value_text(c, k) for c in configs}) > 1
            and not follows_seed(configs, k)]


def choice_prefix(key: str) -> str | None:
    """``distill`` for ``distill.name``, ``student.model`` for ``student.model._target_``;
    ``None`` for a key that names no choice."""
    for suffix in CHOICE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def priority(key: str) -> tuple[int, int, str]:
    """Order of the label keys: the strategy, the other choices, then shallow keys first."""
    rank = 0 if key == "distill.name" else 1 if choice_prefix(key) or key == "task_name" else 2
    return (rank, key.count("."), key)


def _follows(configs: Sequence[Mapping[str, Any]], key: str, owner: str) -> bool:
    """Whether ``key`` has one value per value of ``owner``."""
    seen: dict[str, set[str]] = defaultdict(set)
    for config in configs:
        seen[value_text(config, owner)].add(value_text(config, key))
    return all(len(values) == 1 for values in seen.values())


def label_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys that label the groups (module docstring), in :func:`priority` order."""
    keys = differing_keys(configs)
    choices = {key: prefix for key in keys if (prefix := choice_prefix(key))}
    kept = []
    for key in sorted(keys, key=priority):
        owners = [c for c, prefix in choices.items()
                  if c != key and key.startswith(prefix + ".")]
        if not any(_follows(configs, key, owner) for owner in owners):
            kept.append(key)
    return kept


def short_names(keys: Iterable[str], reserved: Iterable[str] = ()) -> dict[str, str]:
    """``{key: name}``: the last part of each key (of its choice prefix for a choice key:
    ``distill`` for ``distill.name``) where no other key ends with the same part and it is not
    ``reserved`` (a table column); the full dotted key (prefix) otherwise."""
    keys = list(keys)
    bases = {key: choice_prefix(key) or key for key in keys}
    lasts = [base.rsplit(".", 1)[-1] for base in bases.values()]
    taken = set(reserved)
    return {key: last if lasts.count(last) == 1 and last not in taken else base
            for (key, base), last in zip(bases.items(), lasts)}
