"""What kdlab does differently when Lightning runs a stage on several processes (DDP).

Lightning's default DDP launcher starts the other ranks by running the same command again, so
every rank runs all of ``kdlab-train`` and meets each stage's ``Trainer.fit`` in the same order.
Three things follow, handled here and in :mod:`kdlab.engine.teachers` / :mod:`kdlab.train`:

- only rank 0 locks and writes the teacher store (another rank waiting on the lock while rank 0
  waits for it in the process group would deadlock); the other ranks train the same teacher in
  step, or read the stored one;
- only rank 0 writes ``results.json`` and prints the table;
- inside a Hydra multirun, running the command again would start the whole sweep again. So for
  each job of a multirun kdlab starts the other ranks itself, as single runs of the job's own
  overrides in the job's folder, with the environment ``torchrun`` gives its processes
  (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``): Lightning
  then sees processes created outside it and launches nothing (its documented behaviour under
  ``torchrun``), with no change to Lightning itself (:func:`ddp_ranks_for_multirun_job`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)

_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK")
#: seconds rank 0 waits for the other ranks to exit after its job ended
CHILD_TIMEOUT = 120


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (always true without DDP). Lightning reads the rank
    from the environment (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``) when it is imported."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _multirun_job() -> Any:
    """The Hydra config of the current multirun job, or ``None``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def job_rank_command(hydra_cfg: Any, local_rank: int) -> list[str]:
    """The command that runs rank ``local_rank`` of a multirun job: the job's overrides as a
    single run writing to the job's output folder."""
    return [sys.executable, "-m", "kdlab.train", *hydra_cfg.overrides.task,
            f"hydra.run.dir={hydra_cfg.runtime.output_dir}",
            f"hydra.job.name=ddp_rank_{local_rank}", "hydra.output_subdir=null"]


def processes_per_node(strategy: str, devices: Any, num_nodes: int) -> int:
    """How many DDP processes a multirun job needs on this machine (1: kdlab starts none)."""
    if not str(strategy).startswith("ddp") or int(num_nodes) != 1:
        return 1
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    return int(devices) if str(devices).isdigit() else 1


@contextlib.contextmanager
def ddp_ranks_for_multirun_job(strategy: str, devices: Any, num_nodes: int = 1
                               ) -> Iterator[list[subprocess.Popen]]:
    """Inside a Hydra multirun job that trains with DDP on this machine, start ranks 1…n-1
    of the job (see the module docstring) for the ``with`` block, which this process runs as
    rank 0; afterwards wait for them, end the process group and restore the environment, so
    the next job of the sweep starts its own. A rank that failed makes the job fail. Outside a
    multirun, or already a rank started this way, it does nothing."""
    hydra_cfg = _multirun_job()
    n = processes_per_node(strategy, devices, num_nodes)
    if hydra_cfg is None or n < 2 or "LOCAL_RANK" in os.environ:
        yield []
        return
    from hydra.utils import get_original_cwd

    saved = {k: os.environ.get(k) for k in _ENV}
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
              "WORLD_SIZE": str(n), "NODE_RANK": "0"}
    children = [subprocess.Popen(job_rank_command(hydra_cfg, rank), cwd=get_original_cwd(),
                                 env={**os.environ, **shared, "LOCAL_RANK": str(rank)})
                for rank in range(1, n)]
    log.info("DDP in a multirun job: started ranks 1-%d of job %s (pids %s)", n - 1,
             hydra_cfg.job.num, ", ".join(str(c.pid) for c in children))
    os.environ.update(shared, LOCAL_RANK="0")
    failed = True
    try:
        yield children
        failed = False
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _end_process_group()
        codes = _wait(children, terminate=failed)
    if not failed and any(codes):
        raise KdlabError(f"DDP rank(s) {[i + 1 for i, c in enumerate(codes) if c]} of multirun "
                         f"job {hydra_cfg.job.num} exited with codes {codes}: see their log in "
                         f"{hydra_cfg.runtime.output_dir}")


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _wait(children: list[subprocess.Popen], terminate: bool) -> list[int]:
    codes = []
    for child in children:
        if terminate and child.poll() is None:
            child.terminate()
        try:
            codes.append(child.wait(timeout=CHILD_TIMEOUT))
        except subprocess.TimeoutExpired:
            child.kill()
            codes.append(child.wait())
    return codes
