"""``hydra/launcher=packed``: the jobs of a ``kdlab-train -m`` sweep that share a teacher, data
and trainer run as packed cohorts — one teacher pass per batch for all of them — and the others
one by one, as Hydra's basic launcher runs them (:mod:`kdlab.packed`)::

    kdlab-train -m hydra/launcher=packed distill.kd.temperature=2,4 distill.kd.alpha=0.5,0.9

``hydra.launcher.max_members`` caps a pack's size (8); ``hydra.launcher.stack`` runs students
of one architecture as one vectorised pass (``auto``: on a GPU; ``true``; ``false``).
"""


import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.kdlab_packed_launcher.packed_launcher.PackedLauncher"
    #: the most jobs trained together in one pack
    max_members: int = 8
    #: students of one architecture as one vectorised pass: auto (on a GPU) | true | false
    stack: Any = "auto"


ConfigStore.instance().store(group="hydra/launcher", name="packed_base", node=PackedLauncherConf,
                             provider="kdlab")


def _resolved(cfg: DictConfig) -> DictConfig:
    """The job's config with every interpolation resolved while Hydra describes this job (its
    output folder, its ``${now:}``)."""
    resolved = copy.deepcopy(cfg)
    OmegaConf.resolve(resolved)
    return resolved


class PackedLauncher(Launcher):
    """Prepares every job as Hydra's basic launcher does, then runs them packed where they can
    share a teacher pass (:func:`kdlab.packed.launch`)."""

    def __init__(self, max_members: int = 8, stack: Any = "auto") -> None:
        super().__init__()
        self.max_members = max_members
        self.stack = stack
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from kdlab.packed import check_options, launch

        check_options(self.max_members, self.stack)
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs, packed where they share a teacher", len(job_overrides))
        jobs: list[dict[str, Any]] = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                        list(overrides))
            with open_dict(config):
                config.hydra.job.id = idx
                config.hydra.job.num = idx
            ret = run_job(hydra_context=self.hydra_context, task_function=_resolved,
                          config=config, job_dir_key="hydra.sweep.dir",
                          job_subdir_key="hydra.sweep.subdir")
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            jobs.append({"num": idx, "overrides": list(overrides), "config": config,
                         "cfg": ret.return_value, "return": ret})

        def run_alone(pos: int) -> JobReturn:
            ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                          config=jobs[pos]["config"], job_dir_key="hydra.sweep.dir",
                          job_subdir_key="hydra.sweep.subdir")
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            return ret

        return launch(jobs, run_alone, self.max_members, sweep_dir, self.stack)
