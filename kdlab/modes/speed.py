"""``trainer.precision=auto``: measured once per run, before any stage, and kept with the run.

The choice (:func:`kdlab.engine.speed.probe_precision`) replaces ``auto`` in the run's config
before anything reads it, so the teacher store's key, the baseline store's, the checkpoints'
hyper-parameters and ``results.json`` all hold the precision the run trained in. It is written to
``<run folder>/precision.json``; a resumed run reads it back instead of measuring again (a
measurement may choose otherwise, and a run must not change precision half way).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from kdlab.engine.speed import describe_probe, device_type, probe_precision
from kdlab.modes.build import build_datamodule, build_model, is_distributed
from kdlab.util.errors import KdlabError
from kdlab.util.files import write_json
from kdlab.util.inputs import example_inputs

log = logging.getLogger(__name__)

#: the file in a run's folder that keeps what ``trainer.precision=auto`` chose
CHOICE = "precision.json"


def wants_auto_precision(cfg: DictConfig) -> bool:
    return str((cfg.get("trainer") or {}).get("precision", "32-true")) == "auto"


def resolve_precision(cfg: DictConfig, run_dir: Path, resuming: bool) -> dict[str, Any] | None:
    """Replace ``trainer.precision=auto`` in ``cfg`` (in place) by a measured choice, or by the
    one this run made when it started (``resuming``); returns what was chosen and measured
    (``None`` when the precision is not ``auto``)."""
    if not wants_auto_precision(cfg):
        return None
    if is_distributed(cfg.trainer):
        raise KdlabError("trainer.precision=auto measures on one device, and each process of "
                         "a multi-device run could choose differently: set trainer.precision "
                         "(32-true or bf16-mixed)")
    kept = run_dir / CHOICE
    if resuming and kept.is_file():
        probe = json.loads(kept.read_text())
        log.info("precision: %s, as chosen when this run started (%s)", probe["choice"], kept)
    else:
        probe = measure(cfg)
        log.info(describe_probe(probe))
        write_json(kept, probe)
    set_precision(cfg, probe["choice"])
    return probe


def measure(cfg: DictConfig) -> dict[str, Any]:
    """:func:`probe_precision` on the run's student, data shape, batch size and device."""
    data = build_datamodule(cfg)
    data.prepare_data()
    data.setup()
    student = build_model(cfg.student.model, data, "student.model")
    kind = device_type(str(cfg.trainer.get("accelerator", "auto")))
    if kind == "cuda" and not torch.cuda.is_available():
        raise KdlabError("trainer.precision=auto on trainer.accelerator="
                         f"{cfg.trainer.accelerator}, but torch sees no CUDA device")
    return probe_precision(student, lambda n: example_inputs(data.input_shape, n),
                           int(cfg.data.batch_size), torch.device(kind),
                           channels_last=bool(cfg.get("channels_last", False)))


def set_precision(cfg: DictConfig, precision: str) -> None:
    with open_dict(cfg):
        cfg.trainer.precision = precision
