"""The README's table of config groups, generated from ``conf/``: one row per option
(``conf/<group>/<option>.yaml``), described by the first comment line of its file that is not a
Hydra directive (``# @package …``); each group's default is the option ``conf/train.yaml`` picks.

    python scripts/config_table.py            # print the table
    python scripts/config_table.py --write    # rewrite it in README.md, between the markers

``tests/test_readme_table.py`` fails when the README's table is not what this script prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"
#: folders of conf/ that are not option groups a user picks
SKIP_GROUPS = {"hydra", "__pycache__"}
HEADERS = ("group", "option", "what it is")


def description(path: Path) -> str | None:
    """The first comment line of a yaml file that is not a Hydra directive, without ``#``;
    ``None`` when its leading comments have none."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return None
        text = line.lstrip("#").strip()
        if text and not text.startswith("@"):
            return text[:-1] if text.endswith(".") and not text.endswith("..") else text
    return None


def defaults(conf: Path) -> dict[str, str | None]:
    """``group → option`` of the primary config's defaults list (``None``: no default)."""
    entries = yaml.safe_load((conf / "train.yaml").read_text()).get("defaults", [])
    picked: dict[str, str | None] = {}
    for entry in entries:
        if isinstance(entry, dict):
            for group, option in entry.items():
                picked[str(group)] = None if option is None else str(option)
    return picked


def groups(conf: Path) -> list[str]:
    """The option groups of ``conf``: in the order of the defaults list, then the others by
    name."""
    found = {p.name for p in conf.iterdir() if p.is_dir() and p.name not in SKIP_GROUPS
             and any(p.glob("*.yaml"))}
    ordered = [g for g in defaults(conf) if g in found]
    return ordered + sorted(found - set(ordered))


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def rows(conf: Path) -> list[tuple[str, str, str]]:
    """``(group, option, description)`` per option; the group is named on its first row and
    its default option comes first. A file without a description is an error naming it."""
    picked = defaults(conf)
    missing = []
    out = []
    for group in groups(conf):
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        default = picked.get(group)
        if default in options:
            options.remove(default)
            options.insert(0, default)
        for k, option in enumerate(options):
            text = description(conf / group / f"{option}.yaml")
            if text is None:
                missing.append(f"{group}/{option}.yaml")
                continue
            label = f"`{option}`" + (" (default)" if option == default else "")
            out.append((f"`{group}`" if k == 0 else "", label, _cell(text)))
    if missing:
        raise ValueError("no description (a first comment line) in conf/" +
                         ", conf/".join(missing))
    return out


def table(conf: Path = ROOT / "conf") -> str:
    """The Markdown table of every option group of ``conf``."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(conf)]
    return "\n".join(lines)


def section(readme: str) -> str:
    """The text between the README's markers (without them)."""
    if readme.count(START) != 1 or readme.count(END) != 1 or \
            readme.index(START) > readme.index(END):
        raise ValueError(f"README.md needs one {START} line and one {END} line after it")
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n")


def rewrite(readme: str, new_table: str) -> str:
    """``readme`` with the text between its markers replaced by ``new_table``."""
    section(readme)  # the markers are there, in order
    head, rest = readme.split(START, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{START}\n\n{new_table}\n\n{END}{tail}"  # blank lines: the table stands alone


def main(argv: list[str] | None = None) -> int:
    """Print the table, or with ``--write`` put it into the README; 1 on a missing
    description or missing markers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="rewrite the README's table between its marker comments")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--conf", type=Path, default=ROOT / "conf")
    args = parser.parse_args(argv)
    try:
        text = table(args.conf)
        if args.write:
            readme = args.readme.read_text()
            updated = rewrite(readme, text)
            if updated != readme:
                args.readme.write_text(updated)
            print(f"{args.readme}: config table {'rewritten' if updated != readme else 'current'}")
        else:
            print(text)
    except ValueError as e:
        print(f"config_table: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
