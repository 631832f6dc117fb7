"""Where kdlab's Hydra configs are, and the options of a config group.

The configs live in the repository's top-level ``conf/`` folder, which the wheel ships as the
package data ``kdlab/conf`` (``pyproject.toml`` maps the folder into the package). So:

- an installed wheel (``pip install .`` or ``pip install kdlab-*.whl``) reads
  ``site-packages/kdlab/conf``;
- an editable install (``pip install -e .``) reads the checkout's ``conf/`` through the same
  package name (setuptools' editable finder maps ``kdlab.conf`` to it);
- a checkout imported from its own folder (``PYTHONPATH=<checkout>``, a git worktree, a copy on a
  lent GPU machine) reads ``<checkout>/conf``, before any installed copy.

A user's own config folder adds groups and options on top of these (``--config-dir DIR`` or
``hydra.searchpath=[file://DIR]``, see the README): :func:`group_options` lists them too.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import kdlab.util.resolvers  # noqa: F401 - registers ${scaled_lr:...} wherever configs are read
from kdlab.util.errors import KdlabError

_PRIMARY = "train.yaml"


def config_dir() -> Path:
    """The folder of kdlab's own configs (see the module docstring).

    A checkout (a folder holding kdlab's ``pyproject.toml``, ``kdlab/`` and ``conf/``) reads its
    own ``conf/`` first, so a second checkout put on ``PYTHONPATH`` (a git worktree, a copy on a
    lent GPU machine) never reads the configs of the checkout installed in editable mode.
    """
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / _PRIMARY).is_file():
        return checkout / "conf"
    try:
        spec = importlib.util.find_spec("kdlab.conf")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / _PRIMARY).is_file():
                return Path(location)
    raise KdlabError(f"kdlab's configs are missing: no kdlab/conf package data and no "
                     f"{checkout / 'conf'}; reinstall kdlab (pip install .) or run from a "
                     "complete checkout")


#: kdlab's config folder, found once at import
CONF_DIR = config_dir()


def group_options(group: str, extra_dirs: Sequence[Path] = ()) -> list[str]:
    """The option names of a config group (``<dir>/<group>/*.yaml``, nested ones as ``a/b``) in
    kdlab's configs and in ``extra_dirs`` (a user's ``--config-dir`` / ``hydra.searchpath``)."""
    options: set[str] = set()
    for root in (CONF_DIR, *extra_dirs):
        folder = Path(root) / group
        if folder.is_dir():
            options.update(str(p.relative_to(folder).with_suffix(""))
                           for p in folder.rglob("*.yaml"))
    return sorted(options)


def config_groups(extra_dirs: Sequence[Path] = ()) -> set[str]:
    """The config groups (folders) of kdlab's configs and of ``extra_dirs``."""
    groups: set[str] = set()
    for root in (CONF_DIR, *extra_dirs):
        if Path(root).is_dir():
            groups.update(p.name for p in Path(root).iterdir()
                          if p.is_dir() and p.name not in ("hydra", "__pycache__"))
    return groups
