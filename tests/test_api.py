"""``import kdlab``: the small Python API a notebook uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdlab
from tests.conftest import FAST


def test_run_returns_the_results_and_writes_them(tmp_path):
    results = kdlab.run([*FAST, "distill=none", "baseline=false", f"paths.log_dir={tmp_path}"])
    assert results["student"]["metrics"]["test/acc"] > 0.3  # it learned (chance: 0.1)
    run_dir = Path(results["run_dir"])
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "results.json").is_file()


def test_a_mistake_raises_instead_of_exiting(tmp_path):
    with pytest.raises(kdlab.KdlabError, match=r"^distill\.kd\.temperature=0 must be > 0"):
        kdlab.run([*FAST, "distill.kd.temperature=0"], output_dir=tmp_path / "run")


def test_compose_gives_the_config_to_edit_before_running(tmp_path):
    cfg = kdlab.compose(["distill=[kd,at]", "seed=3"], output_dir=tmp_path / "out")
    assert list(cfg.distill) == ["kd", "at"] and cfg.seed == 3
    assert cfg.paths.output_dir == str(tmp_path / "out")


def test_the_parts_are_reachable_from_the_package():
    model = kdlab.models.create("resnet8x4", input_shape=[3, 32, 32], num_classes=100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert issubclass(kdlab.data.FashionMNISTDataModule, kdlab.data.InMemoryDataModule)
    assert issubclass(kdlab.Strategy, torch.nn.Module)
    assert {"Batch", "Outputs", "Strategy", "run", "compose"} <= set(kdlab.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        kdlab.nothing  # noqa: B018
