"""The run's teacher: weights given by hand (``teacher.ckpt``), pretrained, or from the teacher
store — trained once under its identity and reused by every later run and sweep.

A teacher's identity (:func:`training_identity`) is everything that defines the trained network
and nothing else: its model, the data's content and validation split, its class subset and
augmentation, its own recipe (``teacher.train.*``: epochs, batch size, optimizer, schedule —
written out, never taken from the student), its seed, and the Trainer settings that change how
it trains (precision, batch limits, accumulation, clipping, devices). Sweeping the student's
optimizer, epochs or batch size therefore reuses one stored teacher, and other data in the same
format (``data.root=…``) gets another one. The same identity keys the assistants of
``mode=takd``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.module import freeze
from kdlab.engine.teachers import TeacherStore, load_into, load_weights
from kdlab.models.zoo import source_digest
from kdlab.modes.build import build_datamodule, build_model
from kdlab.modes.runner import train_stage
from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)

#: bumped when what a stored teacher means changes (4: data content, the teacher's own recipe)
STORE_FORMAT = 4
#: Trainer settings that change how a network trains (the others say where and how it reports)
TRAINER_KEYS = ("precision", "limit_train_batches", "max_steps", "accumulate_grad_batches",
                "gradient_clip_val", "gradient_clip_algorithm", "devices", "num_nodes")
RECIPE_KEYS = ("max_epochs", "batch_size", "augment", "optimizer")


def plain(node: Any) -> Any:
    """A config node as resolved plain containers (other values as they are)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def teacher_recipe(cfg: DictConfig) -> DictConfig:
    """``teacher.train``, checked to be a complete recipe of its own."""
    recipe = cfg.teacher.get("train")
    missing = [k for k in RECIPE_KEYS if recipe is None or recipe.get(k) is None]
    if missing:
        raise KdlabError(f"teacher.train is missing {', '.join(missing)}: a teacher's recipe is "
                         "its own (see conf/teacher/cnn.yaml)")
    return recipe


def teacher_data(cfg: DictConfig) -> InMemoryDataModule:
    """The data a teacher trains on: every label of the training split (no transfer set), its
    recipe's batch size and augmentation, never mixed, shuffled with the teacher's seed."""
    recipe = teacher_recipe(cfg)
    return build_datamodule(cfg, transfer=False, num_labels=None, augment=bool(recipe.augment),
                            batch_size=int(recipe.batch_size),
                            shuffle_seed=int(cfg.teacher.seed), mix="none")


def trainer_identity(cfg: DictConfig) -> dict[str, Any]:
    """The Trainer settings that change how a network trains (:data:`TRAINER_KEYS`)."""
    trainer = plain(cfg.trainer)
    return {k: trainer.get(k) for k in TRAINER_KEYS}


def training_identity(cfg: DictConfig, data: InMemoryDataModule, model: DictConfig,
                      recipe: dict[str, Any], seed: int, **extra: Any) -> dict[str, Any]:
    """Everything that defines a network trained by kdlab, as plain containers: its model
    (and the content of the local files it is read from, for ``hf:<folder>``), the data
    (:meth:`~kdlab.data.memory.InMemoryDataModule.identity`: content digest, split, classes)
    and its augmentation, the recipe, the seed, the Trainer settings that matter, and
    ``extra`` (an assistant's teacher and strategies)."""
    identity = {"format": STORE_FORMAT, "model": plain(model), "data": data.identity(),
                "augmentation": data.augmentation(), "recipe": recipe, "seed": int(seed),
                "trainer": trainer_identity(cfg), **extra}
    files = source_digest(model.get("name"))
    if files is not None:  # a model read from local files (hf:<folder>): their content
        identity["model_files"] = files
    return identity


def identity_key(identity: dict[str, Any], label: str) -> str:
    """``<label>-<hash12>``: a store folder name for ``identity``."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    return f"{label.lower().replace('/', '_').replace(':', '_')}-{digest.hexdigest()[:12]}"


def model_label(model: DictConfig) -> str:
    """A model config's ``name`` (zoo) or the class name of its ``_target_``."""
    return str(model.get("name") or str(model._target_).rsplit(".", 1)[-1])


def teacher_identity(cfg: DictConfig, data: InMemoryDataModule | None = None) -> dict[str, Any]:
    """The identity of the run's teacher (see the module docstring)."""
    data = data if data is not None else teacher_data(cfg)
    return training_identity(cfg, data, cfg.teacher.model, plain(teacher_recipe(cfg)),
                             int(cfg.teacher.seed))


def teacher_key(cfg: DictConfig, data: InMemoryDataModule | None = None) -> str:
    """``<model>-<hash12>``: the teacher's folder in the store."""
    return identity_key(teacher_identity(cfg, data), model_label(cfg.teacher.model))


#: the data keys of the store's format 3 (before the data's content was part of a key)
_LEGACY_DATA_KEYS = ("_target_", "val_size", "split_seed", "batch_size", "shift", "flip",
                     "classes", "input_shape", "num_classes", "train_size", "test_size", "noise",
                     "seed", "image_size", "train_dir")
_LEGACY_IF_SET = _LEGACY_DATA_KEYS[6:]


def legacy_teacher_key(cfg: DictConfig) -> str:
    """The key an earlier kdlab (store format 3) gave this config's teacher, whose identity held
    the data's options but not its content."""
    data = plain(cfg.data)
    recipe = plain(teacher_recipe(cfg))
    data["batch_size"] = recipe.pop("batch_size")  # format 3 trained at data.batch_size
    trainer = plain(cfg.trainer)
    identity = {"format": 3, "model": plain(cfg.teacher.model),
                "data": {k: data.get(k) for k in _LEGACY_DATA_KEYS
                         if k not in _LEGACY_IF_SET or data.get(k) is not None},
                "recipe": recipe, "seed": cfg.teacher.seed,
                "trainer": {k: trainer.get(k) for k in ("precision", "limit_train_batches",
                                                         "max_steps")}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    return f"{model_label(cfg.teacher.model).lower().replace('/', '_')}-{digest.hexdigest()[:12]}"


def report_legacy_entry(cfg: DictConfig, store: TeacherStore) -> Path | None:
    """When the store holds this config's teacher under its format-3 key, say so once, with
    the command that reuses it; returns its path."""
    entry = store.entry(legacy_teacher_key(cfg))
    if not entry.exists():
        return None
    log.warning("Teacher: %s was stored by an earlier kdlab under a key that does not capture "
                "the training data's content, so it is not reused automatically. If it was "
                "trained on this data, reuse it with teacher.ckpt=%s (and delete the folder "
                "once you have moved on); otherwise a new teacher is trained and stored now.",
                entry.path, entry.path)
    return entry.path


def get_teacher(cfg: DictConfig, run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher model, frozen (eval mode, no gradients), and a dict saying where it came
    from: ``{"source": "ckpt" | "pretrained" | "store" | "trained", "path", "key", …}``."""
    data = teacher_data(cfg)
    L.seed_everything(int(cfg.teacher.seed), workers=True, verbose=False)  # the initial weights
    model = build_model(cfg.teacher.model, data, "teacher.model")
    ckpt = cfg.teacher.get("ckpt")
    if ckpt == "pretrained":  # weights the model config loads itself
        log.info("Teacher: pretrained weights of teacher.model (%s), not trained",
                 cfg.teacher.model.get("weights") or "given by its constructor")
        return freeze(model), {"source": "pretrained", "weights": cfg.teacher.model.get("weights")}
    if ckpt:
        load_into(model, load_weights(ckpt), f"teacher.ckpt={ckpt}")
        log.info("Teacher: loaded %s", ckpt)
        return freeze(model), {"source": "ckpt", "path": str(ckpt)}

    identity = teacher_identity(cfg, data)
    key = identity_key(identity, model_label(cfg.teacher.model))
    store = TeacherStore(cfg.paths.teacher_store)
    if not store.has(key):
        report_legacy_entry(cfg, store)
        if not cfg.teacher.train_if_missing:
            raise KdlabError(f"no stored teacher {key} in paths.teacher_store="
                             f"{cfg.paths.teacher_store} and teacher.train_if_missing=false: "
                             "set teacher.ckpt=PATH or allow training")
    quick = bool(cfg.trainer.get("fast_dev_run"))

    def train() -> dict[str, float]:
        log.info("Teacher: %s not in the store, training it (%d epochs)", key,
                 cfg.teacher.train.max_epochs)
        return train_teacher(cfg, model, run_dir / "teacher", data)

    info = store.get_or_train(key, identity, model, train, "Teacher", store=not quick)
    if quick and info["source"] == "trained":
        log.warning("Teacher: trained with trainer.fast_dev_run, so not stored")
    return freeze(model), info


def train_teacher(cfg: DictConfig, model: nn.Module, stage_dir: Path,
                  data: InMemoryDataModule) -> dict[str, float]:
    """Train ``model`` in place with the teacher's recipe on ``data`` (:func:`teacher_data`);
    it ends with its best-validation weights. Returns its metrics."""
    recipe = teacher_recipe(cfg)
    result = train_stage(cfg, "teacher", stage_dir, model, data, recipe.optimizer,
                         recipe.get("scheduler"), max_epochs=int(recipe.max_epochs),
                         optimizer_key="teacher.train.optimizer")
    # the stage tested the best checkpoint, which left its weights in the module's student
    best = result.module.student
    if best is not model:
        model.load_state_dict(best.state_dict())
    return result.metrics
