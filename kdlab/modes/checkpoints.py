"""Networks rebuilt from a kdlab checkpoint: the config stored in it, its student (or a cohort
member), and the teacher its run distilled from. Used by ``kdlab-eval`` and ``kdlab-export``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.teachers import load_into, load_weights
from kdlab.modes.build import build_model, strategy_configs
from kdlab.modes.mutual import member_configs
from kdlab.modes.teacher import get_teacher
from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)


def load_run_config(ckpt_path: str) -> DictConfig:
    """The resolved config stored in a kdlab checkpoint."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise KdlabError(f"ckpt_path={ckpt_path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    config = ckpt.get("hyper_parameters", {}).get("config")
    if not config:
        raise KdlabError(f"ckpt_path={ckpt_path} is not a kdlab checkpoint (no stored config)")
    return OmegaConf.create(config)


def checkpoint_student(run_cfg: DictConfig, ckpt_path: str, data: InMemoryDataModule,
                       member: int | None = None) -> tuple[nn.Module, DictConfig]:
    """The network a kdlab checkpoint holds, rebuilt from its stored config, and its model
    config: the student, or member ``member`` (default 0) of a ``mode=mutual`` cohort, whose
    checkpoints hold every member under ``student.<i>.``."""
    mode = str((run_cfg.get("mode") or {}).get("name", "offline"))
    if mode != "mutual":
        if member not in (None, 0):
            raise KdlabError(f"member={member}: {ckpt_path} is a {mode} run's checkpoint, not a "
                             "cohort's; drop member")
        model = build_model(run_cfg.student.model, data, "student.model")
        load_into(model, load_weights(ckpt_path), f"ckpt_path={ckpt_path}")
        return model, run_cfg.student.model
    configs = member_configs(run_cfg)
    index = 0 if member is None else int(member)
    if not 0 <= index < len(configs):
        raise KdlabError(f"member={index}: the cohort of {ckpt_path} has members "
                         f"0..{len(configs) - 1}")
    model = build_model(configs[index], data, f"member {index}")
    prefix = f"{index}."  # load_weights has already dropped the checkpoint's "student."
    state = {k[len(prefix):]: v for k, v in load_weights(ckpt_path).items()
             if k.startswith(prefix)}
    load_into(model, state, f"ckpt_path={ckpt_path} (member {index})")
    return model, configs[index]


def run_teacher(run_cfg: DictConfig, want: str) -> tuple[nn.Module | None, str]:
    """The teacher the checkpoint's run distilled from (its ``teacher.ckpt`` or its stored
    teacher; never trained here) and where it came from, or ``None`` when ``want`` is
    ``false``, or ``auto`` and there is no single stored teacher for this run."""
    if want in ("false", "False", "none"):
        return None, "not asked for (with_teacher=false)"
    mode = str((run_cfg.get("mode") or {}).get("name", "offline"))
    problem = None
    if mode != "offline":
        problem = f"the run's mode is {mode}, not offline (no single teacher)"
    elif not strategy_configs(run_cfg):
        problem = "the run distilled nothing (distill=none)"
    if problem is None:
        cfg = run_cfg.copy()
        with open_dict(cfg):
            cfg.teacher.train_if_missing = False
        try:
            model, info = get_teacher(cfg, Path(cfg.paths.output_dir))
            return model, str(info.get("path") or info.get("key") or info["source"])
        except KdlabError as e:
            problem = str(e)
    if want in ("true", "True"):
        raise KdlabError(f"with_teacher=true but the teacher cannot be evaluated: {problem}")
    log.info("kdlab-eval: no teacher row (%s)", problem)
    return None, problem


