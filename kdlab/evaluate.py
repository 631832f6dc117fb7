"""Evaluate a network on the validation and test splits; ``kdlab-eval ckpt_path=…``.

A kdlab checkpoint stores its run's resolved config, so ``kdlab-eval`` rebuilds the student and
the data from it; any key can still be overridden (``data.root=…``, ``trainer=gpu``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdlab.build import build_datamodule, build_model
from kdlab.cli import CONF_DIR, friendly_errors, guard_argv
from kdlab.data.memory import InMemoryDataModule
from kdlab.errors import KdlabError
from kdlab.module import DistillationModule
from kdlab.report import describe_model, print_table, write_json
from kdlab.teachers import load_into, load_weights

log = logging.getLogger(__name__)


def evaluate_model(
    model: nn.Module, data: InMemoryDataModule, cfg: DictConfig, splits=("val", "test")
) -> dict[str, float]:
    """Accuracy and loss of ``model`` on the given splits (``val/acc``, ``test/acc`` …)."""
    module = DistillationModule(
        student=model,
        num_classes=data.num_classes,
        optimizer=torch.optim.SGD,
        channels_last=bool(cfg.get("channels_last", False)),
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        precision=cfg.trainer.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics: dict[str, float] = {}
    if "val" in splits:
        metrics.update(trainer.validate(module, datamodule=data, verbose=False)[0])
    if "test" in splits:
        metrics.update(trainer.test(module, datamodule=data, verbose=False)[0])
    return {k: float(v) for k, v in metrics.items()}


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


@friendly_errors
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the checkpoint's student and data, evaluate them, write ``eval.json``."""
    run_cfg = load_run_config(cfg.ckpt_path)
    for key in ("data", "trainer"):  # command-line overrides of the eval config win
        if cfg.get(key):
            run_cfg[key] = OmegaConf.merge(run_cfg[key], cfg[key])
    run_cfg.channels_last = run_cfg.get("channels_last", False)
    data = build_datamodule(run_cfg, transfer=False)
    model = build_model(run_cfg.student.model, data, "student.model")
    load_into(model, load_weights(cfg.ckpt_path), f"ckpt_path={cfg.ckpt_path}")
    metrics = evaluate_model(model, data, run_cfg)
    entry = {"model": run_cfg.student.model._target_.rsplit(".", 1)[-1], "metrics": metrics,
             **describe_model(model, data.input_shape, cfg.latency, run_cfg.channels_last)}
    result = {"ckpt_path": str(cfg.ckpt_path), "student": entry}
    print_table(result, title=f"kdlab-eval {cfg.ckpt_path}")
    out = Path(cfg.paths.output_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    log.info("Wrote %s", out)
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _main(cfg: DictConfig) -> None:
    evaluate(cfg)


def cli() -> None:
    """``kdlab-eval ckpt_path=PATH [overrides]``."""
    guard_argv()
    _main()
