"""Packed sweeps: the offline-distillation jobs of a multirun that share a teacher and data run
as one cohort (:mod:`kdlab.engine.pack`), one teacher pass per batch for all of them.

``kdlab-train -m hydra/launcher=packed distill.kd.temperature=2,4 distill.kd.alpha=0.5,0.9``
composes the jobs as any multirun does; :func:`plan_packs` groups those that may share a pass — they
differ only in :data:`MEMBER_KEYS` (seed, strategy and its hyper-parameters, student, optimizer,
schedule …) — and :func:`run` trains each group, writing into every job's own folder what that
job would have written alone: checkpoints, logs and ``results.json``.

Members share the order of the training batches. When they differ by ``seed`` and
``data.shuffle_seed`` is left to follow it, the pack uses the first member's order and writes
``data.shuffle_seed`` into every member's config, so each member's ``results.json`` says the
order it saw and ``kdlab-train <its overrides> data.shuffle_seed=<that>`` reproduces it alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from kdlab.engine.fit import build_module
from kdlab.engine.fit_pack import fit_pack
from kdlab.engine.pack import MemberCheckpoint
from kdlab.models.transplant import init_from_teacher
from kdlab.modes.baseline import train_baseline
from kdlab.modes.build import (
    build_datamodule,
    build_model,
    build_strategy,
    head_replacing_members,
    is_target,
    stage_callbacks,
    strategy_name,
    to_container,
)
from kdlab.modes.offline import single_teacher
from kdlab.modes.resume import history_callback
from kdlab.modes.runner import latency_args, model_name, stage_entry, stage_spec
from kdlab.util.errors import KdlabError
from kdlab.util.runtime import capture_rng, restore_rng
from kdlab.util.tracking import is_wandb

log = logging.getLogger(__name__)

#: top-level keys the members of one pack may differ by (``paths.output_dir`` too)
MEMBER_KEYS = ("seed", "distill", "student", "optimizer", "scheduler", "task_name", "baseline",
               "baseline_store", "test_last", "logger")
#: callbacks a pack runs as a whole (checkpoints are per member, :class:`MemberCheckpoint`)
PACK_CALLBACKS = ("ModelCheckpoint", "BatchProgressBar", "TQDMProgressBar", "RichProgressBar",
                  "Throughput", "ModelSummary", "RichModelSummary")


def unpackable(cfg: DictConfig) -> str | None:
    """Why this job cannot join a pack (it then runs alone), or ``None``."""
    mode = str((cfg.get("mode") or {}).get("name", "offline"))
    if mode != "offline":
        return f"mode={mode} (packs run offline distillation)"
    if str((cfg.get("compress") or {}).get("name", "none")) != "none":
        return "compress is set (its stages run per job)"
    if cfg.get("ckpt_path"):
        return "ckpt_path is set"
    if (cfg.get("on_policy") or {}).get("fraction"):
        return "on_policy.fraction is set (each student generates its own batches)"
    if (cfg.get("sequence_kd") or {}).get("enabled"):
        return "sequence_kd.enabled (the student trains on the teacher's generated windows)"
    if any(node is not None and is_wandb(node) for node in (cfg.get("logger") or {}).values()):
        return "logger=wandb (one W&B run per process)"
    trainer = cfg.trainer
    if str(trainer.get("strategy", "auto")) != "auto" or trainer.get("devices", 1) not in \
            (1, "1", "auto") or int(trainer.get("num_nodes", 1)) > 1:
        return "a multi-device trainer (packs run on one device)"
    if str(trainer.get("precision", "32-true")).startswith("16"):
        return f"trainer.precision={trainer.precision} (no loss scaler per member)"
    for name, node in (cfg.get("callbacks") or {}).items():
        target = str((node or {}).get("_target_", ""))
        if target and not target.endswith(PACK_CALLBACKS):
            return f"callbacks.{name} ({target}) is not one a pack runs"
    if str((cfg.get("optimizer") or {}).get("_target_", "")).endswith("DOT"):
        return "optimizer=dot (two backward passes per member)"
    if head_replacing_members(cfg):
        return (f"distill={strategy_name(cfg)} replaces the student's head (a pack runs bare "
                "students)")
    strategy = build_strategy(cfg)
    if strategy is None or not strategy.needs_teacher:
        return f"distill={strategy_name(cfg)} has no teacher pass to share"
    if strategy.views > 1:
        return (f"distill={strategy_name(cfg)} shows the teacher a second, strongly augmented "
                "view of every batch, which the pack's one shared teacher pass does not cover")
    return None


def pack_key(cfg: DictConfig, order_swept: bool) -> str:
    """What the members of one pack must agree on: the config without :data:`MEMBER_KEYS`,
    the output folder and (unless swept) the data order."""
    config = to_container(cfg)
    for key in (*MEMBER_KEYS, "hydra"):
        config.pop(key, None)
    config.get("paths", {}).pop("output_dir", None)
    if not order_swept:
        config.get("data", {}).pop("shuffle_seed", None)
    return json.dumps(config, sort_keys=True, default=str)


def plan_packs(cfgs: Sequence[DictConfig], overrides: Sequence[Sequence[str]],
               max_members: int) -> tuple[list[list[int]], dict[int, str]]:
    """The jobs (positions in ``cfgs``) grouped into packs of 2 to ``max_members``, and the
    jobs that run alone with the reason."""
    if int(max_members) < 2:
        raise KdlabError(f"hydra.launcher.max_members={max_members} must be >= 2")
    alone: dict[int, str] = {}
    groups: dict[str, list[int]] = {}
    for i, (cfg, over) in enumerate(zip(cfgs, overrides)):
        try:
            reason = unpackable(cfg)
        except KdlabError as e:  # a bad strategy config: its job reports it alone
            reason = str(e)
        if reason is not None:
            alone[i] = reason
            continue
        swept = any(o.lstrip("+~").startswith("data.shuffle_seed=") for o in over)
        groups.setdefault(pack_key(cfg, swept), []).append(i)
    packs: list[list[int]] = []
    for jobs in groups.values():
        chunks = [jobs[k:k + int(max_members)] for k in range(0, len(jobs), int(max_members))]
        for chunk in chunks:
            if len(chunk) == 1:
                alone[chunk[0]] = "no other job of the sweep shares its teacher, data and trainer"
            else:
                packs.append(chunk)
    return packs, alone


def align_data_order(cfgs: Sequence[DictConfig]) -> None:
    """Give every member the first member's ``data.shuffle_seed`` (written into its config)."""
    order = cfgs[0].data.get("shuffle_seed")
    for cfg in cfgs[1:]:
        if cfg.data.get("shuffle_seed") != order:
            log.info("pack: job %s (seed %s) trains on the pack's data order, "
                     "data.shuffle_seed=%s", cfg.paths.output_dir, cfg.get("seed"), order)
            with open_dict(cfg):
                cfg.data.shuffle_seed = order


def member_callbacks(cfg: DictConfig, folder: Path, member: int) -> list[Callback]:
    """Member ``member``'s checkpoint callbacks: those of ``cfg.callbacks`` as
    :class:`MemberCheckpoint`, writing into ``<folder>/checkpoints``."""
    callbacks: list[Callback] = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node or not is_target(node, ModelCheckpoint):
            continue
        args = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                if k != "_target_"}
        args["dirpath"] = str(folder / "checkpoints")
        try:
            callbacks.append(MemberCheckpoint(member=member, **args))
        except (TypeError, ValueError) as e:
            raise KdlabError(f"callbacks.{name}: {e}") from None
    return callbacks


def shared_callbacks(cfg: DictConfig, folder: Path) -> list[Callback]:
    """The pack's callbacks other than checkpoints (progress bar, throughput)."""
    return [c for c in stage_callbacks(cfg, folder) if not isinstance(c, ModelCheckpoint)]


def pack_checkpoint(folder: Path, members: list[dict[str, Any]]) -> str | None:
    """The pack's ``last.ckpt`` in ``folder`` when it is this pack's (the same members' configs,
    in order), else ``None`` (said in the log when it belongs to another pack)."""
    path = folder / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if (saved.get("hyper_parameters") or {}).get("members") != members:
        log.warning("pack: %s holds another pack's checkpoint; this pack starts over", path)
        return None
    log.info("Resuming the pack from %s (epoch %s)", path, saved.get("epoch"))
    return str(path)


def run(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path], folder: Path,
        resume: bool = False, stack: bool | str = "auto") -> list[dict[str, Any] | Exception]:
    """Train the jobs ``cfgs`` (in their folders ``run_dirs``) as one pack with its own
    checkpoint in ``folder``: each job's ``results.json`` content, or the error that stopped
    that job. ``resume``: every job continues the unfinished run in its folder, so the pack
    continues from its own ``last.ckpt`` when that is this pack's. ``stack``: students of one
    architecture as one vectorised pass (:func:`kdlab.engine.fit_pack.fit_pack`)."""
    align_data_order(cfgs)
    first = cfgs[0]
    outcome: list[dict[str, Any] | Exception | None] = [None] * len(cfgs)
    strategies = []
    for i, cfg in enumerate(cfgs):
        strategy = None
        try:
            strategy = build_strategy(cfg)
        except KdlabError as e:
            outcome[i] = e
        strategies.append(strategy)
    data = build_datamodule(first, transfer=True)
    data.setup()
    latency = latency_args(first, data)
    teacher, entries = single_teacher(first, run_dirs[0], data, latency)

    specs, members, states, jobs = [], [], [], []
    caches: dict[tuple[str, ...], Any] = {}
    for i, cfg in enumerate(cfgs):
        if outcome[i] is not None:
            continue
        try:
            L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # as a run alone
            student = build_model(cfg.student.model, data, "student.model")
            init = cfg.student.get("init_from_teacher")
            report_init = None
            if init:
                init = OmegaConf.to_container(init) if isinstance(init, DictConfig) else init
                report_init = init_from_teacher(student, teacher, init)
            spec = stage_spec(cfg, "student", run_dirs[i], student, data, cfg.optimizer,
                              cfg.get("scheduler"), teacher=teacher, strategy=strategies[i])
            spec = dataclasses.replace(spec, ckpt_path=None,
                                       callbacks=member_callbacks(cfg, run_dirs[i], len(specs)))
            member = build_module(spec, caches, compile_teacher=not specs)
            member.make_optimizer()  # a config its optimizer rejects fails this job alone
        except KdlabError as e:
            outcome[i] = e
            continue
        states.append(capture_rng())  # where its fit would start alone
        specs.append(spec)
        members.append(member)
        jobs.append((i, report_init))
    if not members:
        return [o if o is not None else KdlabError("not run") for o in outcome]
    restore_rng(states[0])  # member 0 runs on the global stream
    log.info("Packed cohort: %d members share one teacher pass per batch (%s)", len(members),
             ", ".join(f"{strategy_name(cfgs[i])} seed {cfgs[i].seed}" for i, _ in jobs))
    ckpt_path = pack_checkpoint(folder, [s.hparams for s in specs]) if resume else None
    history = [history_callback(list(s.loggers), ckpt_path, own=True) for s in specs]
    results = fit_pack(specs, members, states, folder,
                       [*shared_callbacks(first, folder), *(h for h in history if h)],
                       ckpt_path=ckpt_path, stack=stack)

    for k, ((i, report_init), result) in enumerate(zip(jobs, results)):
        cfg = cfgs[i]
        if isinstance(result, str):
            outcome[i] = KdlabError(result)
            continue
        entry = {"mode": "offline", "strategy": strategy_name(cfg), "stages": list(entries),
                 "teacher": entries[-1]}
        if report_init is not None:
            entry["student_init"] = report_init
        entry["student"] = stage_entry("student", model_name(cfg.student.model),
                                       members[k].student, result, latency,
                                       packed={"members": len(members), "member": k,
                                               "folder": str(folder)})
        entry["stages"].append(entry["student"])
        try:
            if cfg.baseline:
                entry["baseline"] = train_baseline(cfg, run_dirs[i], latency)
                entry["stages"].append(entry["baseline"])
        except KdlabError as e:
            outcome[i] = e
            continue
        outcome[i] = entry
    return [o if o is not None else KdlabError("not run") for o in outcome]
