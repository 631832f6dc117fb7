"""Find or train the teacher of a run.

``teacher.ckpt=PATH`` loads given weights. Without it, the teacher is looked up in the teacher
store (``paths.teacher_store``) under a hash of everything that defines it — architecture, data
split, training recipe, seed — and trained by the same machinery as students
(``distill=none``) if it is not there yet, then stored. A sweep of many students therefore
trains its teacher once; concurrent jobs serialise on a file lock and reuse the first result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdlab.engine.build import build_datamodule, build_model
from kdlab.engine.fit import fit_stage
from kdlab.engine.module import freeze
from kdlab.util.distributed import is_rank_zero
from kdlab.util.errors import KdlabError
from kdlab.util.files import locked, save_atomic, sha256
from kdlab.util.report import write_json

log = logging.getLogger(__name__)

STORE_FORMAT = 3  # bumped when model code changes what a stored state dict means
#: data options that change what a teacher is trained on (loader-only options are left out)
_DATA_KEYS = ("_target_", "val_size", "split_seed", "batch_size", "shift", "flip", "classes",
              "input_shape", "num_classes", "train_size", "test_size", "noise", "seed",
              "image_size", "train_dir")
#: data keys left out of the identity while unset, so teachers stored before they existed keep
#: their keys (a teacher of a class subset is another teacher than the full task's; synthetic
#: data of another shape, size or seed is other data)
_DATA_KEYS_IF_SET = ("classes", "input_shape", "num_classes", "train_size", "test_size", "noise",
                     "seed", "image_size", "train_dir")


def teacher_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that defines a trained teacher, as plain containers."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {
        "format": STORE_FORMAT,
        "model": OmegaConf.to_container(cfg.teacher.model, resolve=True),
        "data": {k: data.get(k) for k in _DATA_KEYS
                 if k not in _DATA_KEYS_IF_SET or data.get(k) is not None},
        "recipe": OmegaConf.to_container(cfg.teacher.train, resolve=True),
        "seed": cfg.teacher.seed,
        "trainer": {k: trainer.get(k) for k in ("precision", "limit_train_batches", "max_steps")},
    }


def teacher_key(cfg: DictConfig) -> str:
    """``<model>-<hash12>``: the teacher's folder name in the store."""
    identity = json.dumps(teacher_identity(cfg), sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    model = str(cfg.teacher.model.get("name") or cfg.teacher.model._target_.rsplit(".", 1)[-1])
    model = model.lower().replace("/", "_")
    return f"{model}-{digest}"


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a store file, a kdlab Lightning checkpoint (the student's weights)
    or a plain state dict — always with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise KdlabError(f"teacher.ckpt={path} does not exist: give an existing file, or "
                         "teacher.ckpt=null to train (or reuse) a teacher from the store")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KdlabError(f"teacher.ckpt={path} could not be loaded with weights_only=True "
                         f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise KdlabError(f"teacher.ckpt={path} holds no state dict")
    if any(k.startswith("student.") for k in state):  # a kdlab run's checkpoint
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return dict(state)


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Strictly load ``state`` into ``model``; mismatches are listed in one line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label}: {', '.join(keys[:4])}{more}")
        raise KdlabError(f"{source} does not fit teacher.model — {'; '.join(parts)}: "
                         "use the teacher.model it was trained with")
    model.load_state_dict(state)
    return model


def get_teacher(cfg: DictConfig, run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher model, frozen (eval mode, no gradients), and a dict saying where it came
    from: ``{"source": "ckpt" | "store" | "trained", "path": …, "key": …}``."""
    model, info = _find_or_train(cfg, run_dir)
    return freeze(model), info


def _find_or_train(cfg: DictConfig, run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    data = build_datamodule(cfg, transfer=False, num_labels=None)
    L.seed_everything(int(cfg.teacher.seed), workers=True, verbose=False)  # the initial weights
    model = build_model(cfg.teacher.model, data, "teacher.model")
    if cfg.teacher.ckpt == "pretrained":  # weights the model config loads itself
        log.info("Teacher: pretrained weights of teacher.model (%s), not trained",
                 cfg.teacher.model.get("weights") or "given by its constructor")
        return model, {"source": "pretrained", "weights": cfg.teacher.model.get("weights")}
    if cfg.teacher.ckpt:
        load_into(model, load_weights(cfg.teacher.ckpt), f"teacher.ckpt={cfg.teacher.ckpt}")
        log.info("Teacher: loaded %s", cfg.teacher.ckpt)
        return model, {"source": "ckpt", "path": str(cfg.teacher.ckpt)}

    key = teacher_key(cfg)
    if not cfg.teacher.train_if_missing and not (Path(cfg.paths.teacher_store) / key /
                                                 "teacher.pt").is_file():
        raise KdlabError(f"no stored teacher {key} in paths.teacher_store="
                         f"{cfg.paths.teacher_store} and teacher.train_if_missing=false: "
                         "set teacher.ckpt=PATH or allow training")

    def train() -> dict[str, float]:
        log.info("Teacher: %s not in the store, training it (%d epochs)", key,
                 cfg.teacher.train.max_epochs)
        return train_teacher(cfg, model, run_dir / "teacher")

    info = stored_model(cfg, key, teacher_identity(cfg), model, train, "Teacher")
    return model, info


def stored_model(cfg: DictConfig, key: str, identity: dict[str, Any], model: nn.Module,
                 train: Callable[[], dict[str, float]], label: str) -> dict[str, Any]:
    """Fill ``model`` from the store entry ``key`` of ``paths.teacher_store``, or train it with
    ``train()`` (which returns its metrics) and store it with ``identity``; concurrent runs
    serialise on a lock and the first one trains. Returns where the weights came from."""
    store = Path(cfg.paths.teacher_store)
    weights = store / key / "teacher.pt"
    # under DDP only rank 0 locks and writes: the other ranks train in step with it (or read
    # the stored entry); waiting on its lock would deadlock the process group
    rank_zero = is_rank_zero()
    with locked(store / f".{key}.lock") if rank_zero else contextlib.nullcontext():
        saved = _load_entry(weights, rank_zero, label)
        if saved is not None:
            load_into(model, saved["state_dict"], f"teacher store entry {weights}")
            log.info("%s: reusing %s from the store (trained once, %s)", label, key,
                     _accuracy(saved.get("metrics", {})))
            return {"source": "store", "key": key, "path": str(weights),
                    "metrics": saved.get("metrics", {})}
        result = train()
        if not rank_zero:
            return {"source": "trained", "key": key, "stored": False, "metrics": result}
        if cfg.trainer.get("fast_dev_run"):
            log.warning("%s: trained with trainer.fast_dev_run, so not stored", label)
            return {"source": "trained", "key": key, "stored": False, "metrics": result}
        save_atomic({"state_dict": model.state_dict(), "identity": identity,
                     "metrics": result}, weights)
        write_json(store / key / "teacher.json",
                   {"key": key, "identity": identity, "metrics": result,
                    "bytes": weights.stat().st_size, "sha256": sha256(weights)})
        log.info("%s: stored as %s (%s)", label, weights, _accuracy(result))
        return {"source": "trained", "key": key, "path": str(weights), "stored": True,
                "metrics": result}


def _load_entry(weights: Path, rank_zero: bool, label: str) -> dict[str, Any] | None:
    """A store entry's content, or ``None`` when there is none. An entry whose size or hash
    differs from its ``teacher.json``, or that cannot be read, is reported by path, moved
    aside (``teacher.pt.corrupt-<time>``) and trained again."""
    if not weights.is_file():
        return None
    problem = None
    try:
        meta = json.loads((weights.parent / "teacher.json").read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    if "bytes" in meta and weights.stat().st_size != meta["bytes"]:
        problem = f"{weights.stat().st_size} bytes instead of {meta['bytes']} (truncated)"
    elif "sha256" in meta and sha256(weights) != meta["sha256"]:
        problem = "a SHA-256 that differs from teacher.json's (corrupted)"
    if problem is None:
        try:
            return torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if rank_zero:
        aside = weights.with_name(f"teacher.pt.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(weights, aside)
        log.warning("%s: the store entry %s has %s; moved it to %s and training it again",
                    label, weights, problem, aside)
    return None


def train_teacher(cfg: DictConfig, model: nn.Module, stage_dir: Path) -> dict[str, float]:
    """Train ``model`` in place with the teacher's recipe; it ends with its best-val weights."""
    recipe = cfg.teacher.train
    data = build_datamodule(cfg, transfer=False, num_labels=None, augment=bool(recipe.augment),
                            shuffle_seed=int(cfg.teacher.seed), mix="none")  # never mixed
    result = fit_stage(cfg, "teacher", stage_dir, model, data, recipe.optimizer,
                       recipe.get("scheduler"), max_epochs=int(recipe.max_epochs))
    # fit_stage tested the best checkpoint, which left its weights in the module's student
    best = result.module.student
    if best is not model:
        model.load_state_dict(best.state_dict())
    return result.metrics


def _accuracy(metrics: Mapping[str, Any]) -> str:
    acc = metrics.get("test/acc")
    return f"test/acc {acc:.4f}" if isinstance(acc, (int, float)) else "no test metric"
