"""What the command-line entry points share: the config folder and one-line errors."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdlab.util.config import CONF_DIR, config_groups, group_options
from kdlab.util.errors import KdlabError, close_matches

_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "--config-path", "-cp",
                     "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_MULTIRUN = ("-m", "--multirun")


def split_top_level(value: str, separator: str = ",") -> list[str]:
    """``value`` split at the ``separator``s outside brackets, parentheses and quotes:
    ``"[kd,at],kd"`` gives ``["[kd,at]", "kd"]``."""
    parts, depth, quote, start = [], 0, "", 0
    for k, char in enumerate(value):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(value[start:k])
            start = k + 1
    parts.append(value[start:])
    return parts


def overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], bool, list[Path]]:
    """The ``key=value`` overrides of a command line, whether it is a multirun, and the
    folders of a user's own configs it adds (``--config-dir DIR``,
    ``hydra.searchpath=[file://DIR,…]``)."""
    pairs: list[tuple[str, str]] = []
    dirs: list[Path] = []
    multirun = any(arg in _MULTIRUN for arg in argv)
    skip = None
    for arg in argv:
        if skip is not None:
            if skip in ("--config-dir", "-cd"):
                dirs.append(Path(arg))
            skip = None
            continue
        if arg in _FLAGS_WITH_VALUE:
            skip = arg
            continue
        if arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
            continue
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        pairs.append((key, value))
        if key.lstrip("+~") == "hydra.searchpath":
            for entry in split_top_level(value.strip("[]")):
                entry = entry.strip().strip("'\"")
                if entry.startswith("file://"):
                    dirs.append(Path(entry[len("file://"):]))
                elif entry.startswith("pkg://"):
                    dirs.extend(_package_dir(entry[len("pkg://"):]))
                elif entry:
                    dirs.append(Path(entry))
        elif key == "hydra.mode" and value == "MULTIRUN":
            multirun = True
    return pairs, multirun, dirs


def _package_dir(name: str) -> list[Path]:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name.replace("/", "."))
    except ModuleNotFoundError:
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def check_overrides(argv: Sequence[str]) -> None:
    """Fail early, in one line, on ``group=option`` overrides naming an option that does not
    exist (in kdlab's configs or the user's ``--config-dir`` / ``hydra.searchpath``), and on a
    comma list given without ``-m`` (Hydra's own messages are several lines)."""
    pairs, multirun, dirs = overrides(argv)
    groups = config_groups(dirs)
    # a sweeper chosen in the config (hparams_search=…) runs comma lists as a multirun
    sweeping = multirun or any(k.lstrip("+~") in ("hparams_search", "hydra/sweeper")
                               for k, _ in pairs)
    for key, value in pairs:
        plain = key.lstrip("+~").split("@", 1)[0]
        items = split_top_level(value)
        if len(items) > 1 and not sweeping:
            raise KdlabError(_comma_message(plain, value, items, plain in groups))
        if plain not in groups:
            continue
        options = group_options(plain, dirs)
        if value == "null" and not key.startswith("~"):
            alternative = f"{plain}=none" if "none" in options else f"~{plain}"
            raise KdlabError(f"{plain}=null selects no option of the '{plain}' group, which Hydra "
                             f"refuses: write {alternative}")
        for item in items:
            item = item.strip()
            if "(" in item:  # a sweep function: choice(kd,dkd), glob(*) …
                continue
            choices = split_top_level(item[1:-1]) if item.startswith("[") else [item]
            for choice in (c.strip() for c in choices):
                if choice not in options and choice != "":
                    raise KdlabError(f"{plain}={choice} is not an option of the '{plain}' group"
                                     f"{close_matches(choice, options)}; choose one of: "
                                     f"{', '.join(options)}{_zoo_hint(plain, choice)}")


def check_keys(argv: Sequence[str], config_name: str = "train") -> None:
    """Fail in one line, with the close matches, on an override of a key that does not exist
    (``distill.kd.temprature=2``) in the command's config ``conf/<config_name>.yaml``: Hydra's
    own message is several lines and suggests ``+key``, which would add the misspelt key.
    Composes the config once (a multirun's sweeps are left to Hydra, and so is any other
    composition error)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    pairs, multirun, dirs = overrides(argv)
    if multirun or any(k.lstrip("+~") in ("hparams_search", "hydra/sweeper") for k, _ in pairs):
        return
    task = [f"{k}={v}" for k, v in pairs if not k.lstrip("+~").startswith("hydra")]
    if dirs:
        task.insert(0, "hydra.searchpath=[" + ",".join(f"file://{Path(d).resolve()}"
                                                       for d in dirs) + "]")
    key = None
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            try:
                compose(config_name, overrides=task)
                return
            except ConfigCompositionException as e:
                match = re.search(r"Could not override '([^']+)'", str(e))
                if match is None:
                    return
                key = match.group(1)
            base = compose(config_name, overrides=[o for o in task
                                                   if o.split("=", 1)[0].lstrip("~") != key])
    except Exception:  # noqa: BLE001 - anything else is Hydra's to report, as it would
        return
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    siblings = [str(k) for k in node] if isinstance(node, DictConfig) else []
    where = f"under {parent}" if parent else "at the top level"
    raise KdlabError(f"{key}: no such key {where}{close_matches(leaf, siblings)}; the keys "
                     f"there: {', '.join(siblings) or 'none'} (+{key}=… adds a key, only for a "
                     "class that takes it)")


def _comma_message(key: str, value: str, items: list[str], group: bool) -> str:
    first, second = items[0].strip(), items[1].strip()
    if group:
        return (f"{key}={value} is a comma list, which Hydra runs as a sweep: add -m for one run "
                f"per option (kdlab-train -m {key}={value}); {key}=[{first},{second}] is one run "
                f"that uses both" + (" (their losses summed)" if key == "distill" else ""))
    return (f"{key}={value} is a comma list, which Hydra runs as a sweep: add -m for one run per "
            f"value (kdlab-train -m {key}={value}), or quote it for a string "
            f"({key}='{value}')")


def _zoo_hint(group: str, choice: str) -> str:
    """For ``student=resnet8x4``: how to pick that zoo model instead."""
    if group not in ("teacher", "student"):
        return ""
    from kdlab.models.zoo import available

    if choice in available():
        return f" ({choice} is a zoo model: {group}=zoo {group}.model.name={choice})"
    return ""


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


#: this process's jobs of a multirun: how many ran, and the failed ones (job number, overrides,
#: folder, error line), for the summary at the end of the sweep (:func:`kdlab.train.sweep_summary`;
#: here, in a module never run as ``__main__``, so that ``python -m kdlab.train`` and the packed
#: launcher, :mod:`kdlab.packed`, share it)
SWEEP: dict[str, Any] = {"jobs": [], "failed": []}


def expose_packed_launcher() -> None:
    """Let Hydra's plugin scan find ``hydra/launcher=packed`` (:mod:`kdlab.packed`) in an
    editable install too: setuptools maps the package there through an import hook that the
    scan (``pkgutil``) does not list, so its folder is added to the ``hydra_plugins`` namespace
    and Hydra's plugin registry is built at once, while that path holds."""
    try:
        import hydra_plugins
        import hydra_plugins.kdlab_packed_launcher as ours
    except ImportError:  # hydra_plugins missing: Hydra's own error applies
        return
    folder = str(Path(ours.__file__).resolve().parent.parent)
    if folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)
    from hydra.core.plugins import Plugins

    Plugins.instance()


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


def check_run_folder(argv: Sequence[str]) -> None:
    """``kdlab-train``: the folder Hydra will create for the run (``hydra.run.dir``, or
    ``hydra.sweep.dir`` with ``-m``) can be created — else one line naming it, instead of
    Hydra's traceback from ``mkdir``. A probe folder is made and removed in its nearest
    existing parent."""
    import tempfile

    from hydra import compose, initialize_config_dir

    pairs, multirun, dirs = overrides(argv)
    wanted = ("hydra.run.", "hydra.sweep.", "paths.")
    task = [f"{k}={v}" for k, v in pairs if k.lstrip("+~").startswith(wanted) and "," not in v]
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=task, return_hydra_config=True)
            folder = Path(str(OmegaConf.select(cfg, key)))
    except Exception:  # noqa: BLE001 - what cannot be composed here is Hydra's to report
        return
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".kdlab-probe-").cleanup()
    except OSError as e:
        raise KdlabError(f"{key}={folder} cannot be created: {parent} is not writable "
                         f"({e.strerror}); set paths.log_dir (or {key}) to a writable folder"
                         ) from None


def guard_argv(config_name: str = "train") -> None:
    """Check the command line's overrides before Hydra reads them (:func:`check_overrides`,
    :func:`check_keys` against ``conf/<config_name>.yaml``, :func:`check_plugins`); quiet
    Lightning's ads. The command line itself is left as it is."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in str(record.msg)
    )
    expose_packed_launcher()  # before anything builds Hydra's plugin registry
    try:
        check_overrides(sys.argv[1:])
        check_keys(sys.argv[1:], config_name)
        if config_name == "train":
            check_run_folder(sys.argv[1:])
        check_plugins(sys.argv[1:])
    except KdlabError as e:
        fail(str(e))
