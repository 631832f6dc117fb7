"""What kdlab does differently when Lightning runs a stage on several processes (DDP).

Lightning's default DDP launcher starts the other ranks by running the same command again, so
every rank runs all of ``kdlab-train`` and meets each stage's ``Trainer.fit`` in the same order.
Three things follow, handled here and in :mod:`kdlab.engine.teachers` / :mod:`kdlab.train`:

- only rank 0 locks and writes the teacher store (another rank waiting on the lock while rank 0
  waits for it in the process group would deadlock); the other ranks train the same teacher in
  step, or read the stored one;
- only rank 0 writes ``results.json`` and prints the table;
- inside a Hydra multirun, re-running the command would start the whole sweep again, so the
  other ranks get the job's own overrides as a single run in the job's folder instead
  (:func:`use_job_command_for_ddp`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (always true without DDP). Lightning reads the rank
    from the environment (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``) when it is imported."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def job_ddp_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and folder that start rank ``local_rank`` of the current Hydra job: the job's
    overrides as a single run writing to the job's output folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    command = [sys.executable, "-m", "kdlab.train", *hydra_cfg.overrides.task,
               f"hydra.run.dir={hydra_cfg.runtime.output_dir}",
               f"hydra.job.name=ddp_rank_{local_rank}", "hydra.output_subdir=null"]
    return command, get_original_cwd()


def use_job_command_for_ddp() -> bool:
    """In a Hydra multirun, make Lightning's DDP launcher start the other ranks with
    :func:`job_ddp_command` (its own would re-run ``kdlab-train -m …``, the whole sweep).
    Returns whether it applied."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return False
        from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
        from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher
    except ImportError:  # pragma: no cover - both are dependencies
        return False
    launchers = (fabric_launcher, trainer_launcher)  # the Trainer's imports the function
    if not all(hasattr(m, "_hydra_subprocess_cmd") for m in launchers):
        log.warning("this Lightning has no _hydra_subprocess_cmd: DDP inside a multirun may "
                    "re-run the sweep; run DDP jobs as single runs or with hydra/launcher=slurm")
        return False
    for module in launchers:
        module._hydra_subprocess_cmd = job_ddp_command
    return True
