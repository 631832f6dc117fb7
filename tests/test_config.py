"""Every option of every config group composes; bad overrides fail in one clear line."""

import subprocess
import sys

import pytest
from hydra.utils import instantiate

from kdlab.cli import check_overrides
from kdlab.modes.build import build_datamodule, build_model, build_strategy
from kdlab.util.config import CONF_DIR, group_options
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
CASES = [(group, option) for group in GROUPS for option in group_options(group)]


def test_the_required_groups_and_options_exist():
    assert {"data", "teacher", "student", "distill", "trainer", "logger", "callbacks", "paths",
            "experiment"} <= set(GROUPS)
    assert {"none", "kd"} <= set(group_options("distill"))
    assert {"cpu", "gpu", "ddp"} <= set(group_options("trainer"))
    assert {"csv", "tensorboard", "wandb"} <= set(group_options("logger"))
    assert {"mlp", "cnn"} <= set(group_options("teacher")) & set(group_options("student"))


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_builds(group, option, tmp_path):
    """Each option is composed and built into what kdlab runs with it, not only composed."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from kdlab.engine.fit import build_trainer
    from kdlab.modes import mode_runner
    from kdlab.modes.build import recipe, stage_callbacks
    from kdlab.modes.compress import Compression
    from kdlab.modes.runner import stage_spec

    text = group in ("teacher", "student") and option == "gpt"  # a language model: text data
    cfg = make_cfg(tmp_path, [f"{group}={option}", *(
        ["data=text", "data.max_bytes=200000", "data.context=16"] if text else [])])
    assert cfg.seed == 0
    if group in ("teacher", "student"):
        data = build_datamodule(cfg)
        model = build_model(cfg[group].model, data, f"{group}.model")
        if text:
            from kdlab.util.inputs import example_inputs

            assert model(example_inputs(data.input_shape, 2)).shape == (2, 16, 256)
        else:
            assert model(data_batch()).shape == (2, 10)
    elif group == "distill":
        strategy = build_strategy(cfg)
        assert (strategy is None) == (option == "none")
        if strategy is not None:
            assert strategy.names == [option]
    elif group in ("optimizer", "scheduler"):
        built = recipe(cfg.optimizer, cfg.scheduler, 3)
        optimizer = built.optimizer(params=[torch.nn.Parameter(torch.zeros(3))])
        assert isinstance(optimizer, torch.optim.Optimizer)
        if group == "scheduler":
            if option == "none":
                assert built.scheduler is None
            else:  # total_steps / T_max are filled in by the module with the run's steps
                keywords = {k: 10 for k in ("total_steps", "T_max")
                            if k in built.scheduler.func.__init__.__code__.co_varnames}
                assert isinstance(built.scheduler(optimizer, **keywords),
                                  torch.optim.lr_scheduler.LRScheduler)
    elif group == "callbacks":
        callbacks = stage_callbacks(cfg, tmp_path)
        assert callbacks and all(isinstance(c, Callback) for c in callbacks)
    elif group == "logger":
        for node in (cfg.logger or {}).values():
            if option == "wandb":  # constructing it would start a run; check the target
                assert node._target_.endswith("WandbLogger")
            else:
                instantiate(node, save_dir=str(tmp_path))
    elif group == "trainer":
        data = build_datamodule(cfg)
        spec = stage_spec(cfg, "student", tmp_path, torch.nn.Linear(2, 2), data, cfg.optimizer,
                          cfg.scheduler)
        if option == "gpu" and not torch.cuda.is_available():
            assert spec.trainer["accelerator"] == "gpu"  # no GPU here to build it on
        else:
            from kdlab.engine.module import DistillationModule

            module = DistillationModule(spec.student, 10, spec.recipe.optimizer, loop=spec.loop)
            assert isinstance(build_trainer(spec, module)[0], L.Trainer)
    elif group == "compress":
        Compression(cfg)
    elif group == "mode":
        assert callable(mode_runner(cfg.mode.name))
    elif group == "data":
        try:
            data = build_datamodule(cfg)
        except KdlabError as e:  # a dataset that is not on this machine is named as such
            assert "data.root" in str(e)
        else:
            assert data.num_classes > 1


def data_batch():
    import torch

    return torch.zeros(2, 1, 28, 28)


def test_cli_leaves_are_overridable(tmp_path):
    cfg = make_cfg(tmp_path, ["seed=7", "distill.kd.temperature=2.5", "trainer.max_epochs=3",
                              "trainer.fast_dev_run=true", "data.num_labels=null",
                              "student.model.hidden=64", "optimizer.lr=0.01"])
    assert (cfg.seed, cfg.distill.kd.temperature, cfg.trainer.max_epochs) == (7, 2.5, 3)
    assert cfg.trainer.fast_dev_run is True and cfg.data.num_labels is None
    assert cfg.data.label_seed == 7 and cfg.scheduler.max_lr == 0.01


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(KdlabError, match=r"distill=kdd is not an option .*did you mean kd.*"
                                         r"choose one of: .*\bkd, .*\bnone\b"):
        check_overrides(["distill=kdd"])
    with pytest.raises(KdlabError, match="trainer=tpu"):
        check_overrides(["-m", "trainer=cpu,tpu"])
    check_overrides(["-m", "distill=none,kd", "seed=1,2", "--cfg", "job"])  # all fine


def test_a_comma_list_without_m_explains_a_sweep_against_a_list():
    with pytest.raises(KdlabError, match=r"^distill=kd,dkd is a comma list, which Hydra runs as "
                       r"a sweep: add -m .*kdlab-train -m distill=kd,dkd.*; distill=\[kd,dkd\] "
                       r"is one run that uses both \(their losses summed\)$"):
        check_overrides(["distill=kd,dkd"])
    with pytest.raises(KdlabError, match=r"^seed=1,2 is a comma list.*add -m"):
        check_overrides(["seed=1,2"])
    check_overrides(["-m", "distill=kd,dkd", "seed=1,2"])
    check_overrides(["distill=[kd,dkd]", "data.classes=[0,1]", "+tags='a,b'"])
    check_overrides(["hparams_search=kd_optuna", "seed=1,2"])  # a sweeper in the config


def test_a_group_set_to_null_names_the_option_to_use(tmp_path):
    from kdlab.modes.build import has_target

    with pytest.raises(KdlabError, match=r"^scheduler=null selects no option .*write "
                                         r"scheduler=none$"):
        check_overrides(["scheduler=null"])
    with pytest.raises(KdlabError, match=r"write ~experiment$"):
        check_overrides(["experiment=null"])
    assert not has_target(make_cfg(tmp_path, ["scheduler=none"]).scheduler)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kdlab.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path):
    bad_option = _cli("distill=fitnet", cwd=tmp_path)
    assert bad_option.returncode == 2
    (line,) = bad_option.stderr.strip().splitlines()
    assert line.startswith("kdlab: error: distill=fitnet is not an option of the 'distill' "
                           "group") and "choose one of: " in line and ", kd, " in line
    missing = _cli(f"teacher.ckpt={tmp_path}/missing.pt", f"paths.log_dir={tmp_path}",
                   cwd=tmp_path)
    assert missing.returncode == 2
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("kdlab: error: teacher.ckpt=") and "does not exist" in last
    assert "Traceback" not in missing.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_class_count_mismatch_between_student_and_data_is_reported(tmp_path):
    cfg = make_cfg(tmp_path, ["+student.model.num_classes=5"])
    data = build_datamodule(cfg)
    with pytest.raises(KdlabError, match=r"student.model outputs 5 classes but "
                                         r"data=fashion_mnist has 10"):
        build_model(cfg.student.model, data, "student.model")


def test_unknown_model_argument_names_the_key(tmp_path):
    cfg = make_cfg(tmp_path, ["+student.model.width=3"])
    with pytest.raises(KdlabError, match=r"student.model: .*width.*check the keys"):
        build_model(cfg.student.model, build_datamodule(cfg), "student.model")


def test_wandb_without_api_key_logs_offline_instead_of_prompting(tmp_path, monkeypatch):
    from kdlab.modes.build import stage_loggers

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = make_cfg(tmp_path, ["logger=wandb"])
    assert cfg.logger.wandb.mode == "online"
    (logger,) = stage_loggers(cfg, tmp_path / "stage", "student")
    assert logger.experiment.settings.mode == "offline"
    assert logger.experiment.name == "kdlab-kd-seed0"
    logger.experiment.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # one per job, not stage
