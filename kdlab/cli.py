"""What the command-line entry points share: the config folder and one-line errors."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kdlab.util.config import CONF_DIR, group_options
from kdlab.util.errors import KdlabError, close_matches

_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "--config-path", "-cp",
                     "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def check_group_overrides(argv: Sequence[str]) -> None:
    """Fail early, in one line, on ``group=option`` overrides naming an option that does not
    exist (Hydra's own message is several lines plus a search path)."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _FLAGS_WITH_VALUE:
            skip = True
            continue
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or "(" in value or value.startswith("["):
            continue
        options = group_options(key)
        for choice in value.split(","):
            choice = choice.strip()
            if choice not in options and choice not in ("null", ""):
                raise KdlabError(f"{key}={choice} is not an option of the '{key}' group"
                                 f"{close_matches(choice, options)}; choose one of: "
                                 f"{', '.join(options)}{_zoo_hint(key, choice)}")


def _zoo_hint(group: str, choice: str) -> str:
    """For ``student=resnet8x4``: how to pick that zoo model instead."""
    if group not in ("teacher", "student"):
        return ""
    from kdlab.models.zoo import available

    if choice in available():
        return f" ({choice} is a zoo model: {group}=zoo {group}.model.name={choice})"
    return ""


_NOT_MEMBERS = ("none", "combo")
#: ``scheduler=null`` (a plain key before it became a group) means the group's ``none`` option
NULL_GROUPS = {"scheduler=null": "scheduler=none"}


def expand_strategy_lists(argv: Sequence[str]) -> list[str]:
    """Rewrite ``distill=[kd,at]`` into Hydra overrides composing :class:`Composite`:
    ``distill=combo +distill@distill.kd=kd +distill@distill.at=at``, so that each member's
    options are ``distill.<member>.<key>``."""
    out = []
    for arg in argv:
        match = re.fullmatch(r"distill=\[([\w\s,]+)\]", arg)
        if not match:
            out.append(arg)
            continue
        members = [m.strip() for m in match.group(1).split(",") if m.strip()]
        valid = [o for o in group_options("distill") if o not in _NOT_MEMBERS]
        for member in members:
            if member not in valid:
                raise KdlabError(f"distill=[...]: '{member}' is not a strategy"
                                 f"{close_matches(member, valid)}; choose from: "
                                 f"{', '.join(valid)}")
        if len(set(members)) != len(members):
            raise KdlabError(f"distill=[{','.join(members)}] names a strategy twice")
        out.append("distill=combo")
        out += [f"+distill@distill.{m}={m}" for m in members]
        out.append(f"distill.name={'+'.join(members)}")
    return out


#: Hydra plugins behind config options: (option prefix, plugin module, pip extra)
_PLUGINS = (("hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "sweep"),
            ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "sweep"),
            ("hydra/launcher=local_parallel", "hydra_plugins.hydra_joblib_launcher", "sweep"),
            ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher", "sweep"),
            ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "sweep"),
            ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "sweep"))


def check_plugins(argv: Sequence[str]) -> None:
    """Fail in one line when an override needs a Hydra plugin that is not installed (Hydra's
    own message lists its search path and does not say what to install)."""
    import importlib.util

    for arg in argv:
        for prefix, module, extra in _PLUGINS:
            if arg.startswith(prefix) and not arg.endswith("=null"):
                try:
                    found = importlib.util.find_spec(module) is not None
                except ModuleNotFoundError:  # no hydra_plugins namespace at all
                    found = False
                if not found:
                    package = module.split(".")[-1].replace("_", "-")
                    raise KdlabError(f"{arg} needs the Hydra plugin {package}: "
                                     f"pip install -e '.[{extra}]' (or pip install {package})")


def fail(message: str, code: int = 2) -> None:
    """Print ``kdlab: error: <message>`` on stderr and exit with ``code``."""
    logging.shutdown()
    print(f"kdlab: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def friendly_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`KdlabError` raised by ``task`` into one line on stderr and exit code 2."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except KdlabError as e:
            fail(str(e))

    return wrapper


def guard_argv() -> None:
    """Expand ``distill=[a,b]`` and check the command line's group overrides before Hydra
    sees them; quiet Lightning's ads."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in str(record.msg)
    )
    try:
        sys.argv[1:] = [NULL_GROUPS.get(arg, arg) for arg in expand_strategy_lists(sys.argv[1:])]
        check_group_overrides(sys.argv[1:])
        check_plugins(sys.argv[1:])
    except KdlabError as e:
        fail(str(e))
