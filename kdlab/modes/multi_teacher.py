"""Multi-teacher distillation: the student learns from several teachers' combined soft targets
(:class:`kdlab.modes.ensemble.TeacherEnsemble`), each teacher found or trained through the teacher
store like the single teacher of the offline mode; the report gives every teacher's own
accuracy, the combined teacher's, the student's and the baseline's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.module import freeze
from kdlab.modes import offline
from kdlab.modes.build import refuse_replaced_head, strategy_configs
from kdlab.modes.ensemble import TeacherEnsemble
from kdlab.modes.runner import evaluated_entry
from kdlab.util.errors import KdlabError


def teacher_configs(cfg: DictConfig) -> list[DictConfig]:
    """One full config per entry of ``mode.teachers``: ``teacher`` with the entry merged in
    (a ``model`` given in an entry replaces the teacher's model instead of merging into it)."""
    specs = cfg.mode.get("teachers") or []
    if len(specs) < 2:
        raise KdlabError(f"mode.teachers lists {len(specs)} teacher(s): give at least 2, e.g. "
                         "[{seed: 0}, {seed: 1}] (each merged into `teacher`)")
    configs = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, DictConfig):
            raise KdlabError(f"mode.teachers[{i}] must be a mapping merged into `teacher`")
        unknown = set(spec) - set(cfg.teacher)
        if unknown:
            raise KdlabError(f"mode.teachers[{i}] has keys {sorted(unknown)} that `teacher` "
                             f"does not have ({', '.join(cfg.teacher)})")
        one = cfg.copy()
        with open_dict(one):
            base = OmegaConf.to_container(cfg.teacher, resolve=True)
            if "model" in spec:
                base.pop("model")
            one.teacher = OmegaConf.merge(base, spec)
        configs.append(one)
    return configs


def soft_target_temperature(cfg: DictConfig) -> float:
    """The temperature the run's strategies compare soft targets at: the first member's
    ``temperature`` (1 when none has one), at which the ensemble averages its teachers."""
    for node in strategy_configs(cfg).values():
        if node.get("temperature") is not None:
            return float(node.temperature)
    return 1.0


def ensemble_teacher(cfg: DictConfig, run_dir: Path, data: InMemoryDataModule,
                     latency: tuple) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Every teacher of ``mode.teachers`` (from the store or trained) and their combination."""
    members, entries = [], []
    for i, one in enumerate(teacher_configs(cfg)):
        teacher, [entry] = offline.single_teacher(one, run_dir / f"teacher{i}", data, latency)
        entry["stage"] = f"teacher{i}"
        members.append(teacher)
        entries.append(entry)
    ensemble = freeze(TeacherEnsemble(
        members, combine=str(cfg.mode.combine),
        weights=list(cfg.mode.weights) if cfg.mode.get("weights") is not None else None,
        temperature=soft_target_temperature(cfg)))
    entries.append(evaluated_entry(cfg, "teacher",
                                   f"ensemble of {len(members)} ({cfg.mode.combine})", ensemble,
                                   data, members=[e["model"] for e in entries]))
    return ensemble, entries


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The offline flow with the combined teacher."""
    refuse_replaced_head(cfg, "mode=multi_teacher", "an ensemble of teachers has no single "
                         "final feature map and classifier to reuse")
    results = offline.run(cfg, run_dir, teachers=ensemble_teacher)
    results["mode"] = "multi_teacher"
    return results



