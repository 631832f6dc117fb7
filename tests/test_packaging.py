"""kdlab installs as a wheel: configs inside the package, ``kdlab-train`` from any folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for folder in ("kdlab",
               "hydra_plugins") for p in (ROOT / folder).rglob("__init__.py")} | {"kdlab.conf"}
    assert listed == on_disk


def test_the_config_folder_is_found_from_the_package():
    from kdlab.util.config import CONF_DIR, group_options

    assert (CONF_DIR / "train.yaml").is_file()
    assert "kd" in group_options("distill")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with kdlab installed from a wheel built from this checkout
    (kdlab's dependencies come from the system site-packages: nothing is downloaded)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("kdlab-*.whl"))
    env = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env)
    python = env / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                              "--no-deps", "--no-index", str(wheel)] if _pip_has_python_flag()
                             else [str(python), "-m", "pip", "install", "--no-deps",
                                   "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    return env


def _pip_has_python_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                         text=True).stdout.split()
    major, minor = (int(x) for x in out[1].split(".")[:2])
    return (major, minor) >= (22, 3)


def test_the_wheel_runs_kdlab_train_from_any_folder(wheel_venv, tmp_path):
    python = wheel_venv / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import kdlab, kdlab.util.config as c; "
                            "print(kdlab.__file__); print(c.CONF_DIR)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    package, conf = where.stdout.split()
    assert Path(package).is_relative_to(wheel_venv), "kdlab was not imported from the wheel"
    assert Path(conf) == Path(package).parent / "conf"
    env = {**os.environ, "PYTHONPATH": ""}
    run = subprocess.run([str(wheel_venv / "bin" / "kdlab-train"), "distill=none",
                          "baseline=false", "trainer.fast_dev_run=true", "latency.repeats=1",
                          "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}/out",
                          f"hydra.run.dir={tmp_path}/out/run"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "run" / "results.json").read_text())
    assert results["student"]["metrics"]["test/acc"] >= 0


def test_the_wheel_ships_the_packed_launcher(wheel_venv, tmp_path):
    """``hydra/launcher=packed`` works from the wheel: Hydra's plugin scan finds the launcher
    that the wheel installed, and its config option resolves."""
    code = ("from kdlab.cli import expose_packed_launcher; expose_packed_launcher(); "
            "from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher; "
            "import hydra_plugins.kdlab_packed_launcher as p; "
            "print([c.__name__ for c in Plugins.instance().discover(Launcher)]); print(p.__file__)")
    found = subprocess.run([str(wheel_venv / "bin" / "python"), "-c", code], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": ""})
    assert found.returncode == 0, found.stderr[-2000:]
    launchers, where = found.stdout.strip().splitlines()
    assert "PackedLauncher" in launchers
    assert Path(where).is_relative_to(wheel_venv)
    cfg = subprocess.run([str(wheel_venv / "bin" / "kdlab-train"), "hydra/launcher=packed",
                          "--cfg", "hydra", "-p", "hydra.launcher"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    assert "PackedLauncher" in cfg.stdout and "max_members: 8" in cfg.stdout
