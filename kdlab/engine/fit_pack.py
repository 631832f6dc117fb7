"""Fit a packed cohort (:mod:`kdlab.engine.pack`) and report each member as its own stage.

:func:`fit_pack` takes one :class:`~kdlab.engine.spec.StageSpec` per member — what each job's
config would have run alone, with :class:`~kdlab.engine.pack.MemberCheckpoint` callbacks for
its checkpoints — and the members already built from them (:func:`kdlab.engine.fit.build_module`
after each member's own seeding). It fits them in one Trainer, then tests each member's
best-validation checkpoint with a Trainer of its own, logged to its own loggers, as
:func:`kdlab.engine.fit.fit_module` does for a run alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from kdlab.engine.callbacks import Throughput
from kdlab.engine.fit import (
    StageResult,
    build_trainer,
    finish_stage,
    showing_views,
    two_view_names,
)
from kdlab.engine.module import DistillationModule
from kdlab.engine.pack import (
    MemberCheckpoint,
    PackCheckpoint,
    PackCheckpointIO,
    PackedModule,
    PackLogger,
)
from kdlab.engine.spec import StageSpec
from kdlab.engine.speed import device_type
from kdlab.engine.stacked import stackable
from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)


def fit_pack(specs: Sequence[StageSpec], members: Sequence[DistillationModule],
             rng_states: Sequence[Mapping[str, Any] | None], folder: Path,
             callbacks: Sequence[Callback] = (), ckpt_path: str | None = None,
             stack: bool | str = "auto") -> list[StageResult | str]:
    """Train ``members`` together (one teacher pass per batch) and return each member's
    :class:`~kdlab.engine.fit.StageResult`, or the error that stopped it.

    Args:
        specs: each member's stage (folder, loggers, recipe, its ``MemberCheckpoint``
            callbacks); the Trainer settings, data and loop of ``specs[0]`` are the pack's
            (the members must agree on them).
        members: the members, built from ``specs``.
        rng_states: each member's random state after its construction
            (:func:`kdlab.util.runtime.capture_rng`).
        folder: the pack's own folder: its ``checkpoints/last.ckpt`` holds the whole pack.
        callbacks: callbacks of the pack as a whole (progress bar, throughput).
        ckpt_path: continue from this pack checkpoint.
        stack: run the students as one vectorised pass (:mod:`kdlab.engine.stacked`):
            ``True`` (fail with the reason when they cannot), ``False``, or ``auto`` (when
            they can and the pack trains on a GPU, where one kernel for all members pays).
    """
    first = specs[0]
    for spec in specs:  # one teacher pass on one view per batch: no strong views
        if spec.strategy is not None and spec.strategy.views > 1:
            raise KdlabError(f"a packed cohort shares one teacher pass on one view of each "
                             f"batch, but distill={two_view_names(spec.strategy)} also trains "
                             "on a strong view: run that job alone")
    stacked = use_stacked(members, stack, str(first.trainer.get("accelerator", "auto")),
                          compiled=first.compile.student)
    module = PackedModule(members, rng_states, stack=stacked,
                          hparams={"stage": "pack", "members": [s.hparams for s in specs]})
    checkpoints = [[c for c in s.callbacks if isinstance(c, MemberCheckpoint)] for s in specs]
    own = PackCheckpoint(dirpath=str(folder / "checkpoints"), filename="last", monitor=None,
                          save_top_k=1, enable_version_counter=False)
    folders = {Path(c.dirpath): i for i, cs in enumerate(checkpoints) for c in cs}
    router = PackLogger([s.loggers for s in specs], [m.hparams_initial for m in members])
    pack = dataclasses.replace(first, folder=folder, loggers=[router],
                               callbacks=[*callbacks, *(c for cs in checkpoints for c in cs), own])
    trainer, data = build_trainer(pack, module, PackCheckpointIO(module, folders))
    bank = next((getattr(m.teacher_cache, "bank", None) for m in members
                 if m.teacher_cache is not None), None)
    with showing_views(first.data, bank, f"pack of {len(members)}"):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    speed = next((c.history for c in trainer.callbacks if isinstance(c, Throughput)), [])
    results: list[StageResult | str] = []
    for i, (spec, member) in enumerate(zip(specs, members)):
        if i in module.failed:
            results.append(module.failed[i])
            continue
        # its checkpoint callbacks as a run alone has them: the test restores their state
        tester, _ = build_trainer(dataclasses.replace(
            spec, callbacks=[c.alone() for c in checkpoints[i]]), member)
        results.append(finish_stage(spec, member, tester, data, checkpoints[i],
                                    trainer.current_epoch, list(speed)))
    return results


def use_stacked(members: Sequence[DistillationModule], stack: bool | str,
                accelerator: str, compiled: bool = False) -> bool:
    """Whether the pack runs its students as one vectorised pass (see :func:`fit_pack`); the
    decision and its reason are logged. ``compiled``: the students are ``torch.compile``d
    (``compile.student=true``), which a vectorised pass of their modules would bypass."""
    if stack not in (True, False, "auto"):
        raise KdlabError(f"hydra.launcher.stack={stack} must be auto, true or false")
    why_not = stackable([m.student for m in members],
                        [bool(m.student_taps and m.student_taps.paths) for m in members])
    if why_not is None and compiled:
        why_not = "compile.student=true (each compiled student runs its own graph)"
    if stack is True and why_not:
        raise KdlabError(f"hydra.launcher.stack=true but the students cannot run as one "
                         f"vectorised pass: {why_not}; use stack=auto or false")
    gpu = device_type(accelerator) == "cuda"
    use = stack is True or (stack == "auto" and why_not is None and gpu)
    if use:
        log.info("pack: the %d students run as one vectorised pass (torch.func.vmap)",
                 len(members))
    else:
        reason = why_not or ("hydra.launcher.stack=false" if stack is False else
                             "stack=auto stacks on a GPU only (on a CPU the loop is as fast)")
        log.info("pack: the %d students run one after another (%s)", len(members), reason)
    return use

