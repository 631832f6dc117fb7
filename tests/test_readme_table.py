"""The README's config-group table is what ``scripts/config_table.py`` generates from ``conf/``:
one row per option, described by the first comment line of its yaml file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" /
                                                  "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config_table = _script()


def test_readme_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert config_table.section(readme) == config_table.table(), (
        "README.md's config table is stale: run python scripts/config_table.py --write")


def test_every_option_of_every_group_is_a_row():
    conf = ROOT / "conf"
    rows = config_table.rows(conf)
    listed, group = [], None
    for cell, option, _ in rows:  # the group is named on its first row only
        group = cell.strip("`") or group
        listed.append((group, option.split(" ")[0].strip("`")))
    expected = {(p.parent.name, p.stem) for p in conf.glob("*/*.yaml")
                if p.parent.name != "hydra"}
    assert set(listed) == expected and len(listed) == len(expected)
    defaults = [option for _, option, _ in rows if option.endswith("(default)")]
    assert "`kd` (default)" in defaults and "`fashion_mnist` (default)" in defaults


def _conf(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    (conf / "widget").mkdir(parents=True)
    (conf / "hydra").mkdir()
    (conf / "train.yaml").write_text("defaults:\n  - _self_\n  - widget: small\n"
                                     "  - hydra: default\n")
    (conf / "hydra" / "default.yaml").write_text("run:\n  dir: .\n")
    (conf / "widget" / "small.yaml").write_text("# @package widget\n# A small widget | fast.\n"
                                                "# more words\nsize: 1\n")
    (conf / "widget" / "big.yaml").write_text("\n# not the header\nsize: 2\n")
    return conf


def test_descriptions_come_from_the_first_comment_line(tmp_path):
    conf = _conf(tmp_path)
    with pytest.raises(ValueError, match=r"no description .* in conf/widget/big\.yaml"):
        config_table.table(conf)
    (conf / "widget" / "big.yaml").write_text("# A big widget\nsize: 2\n")
    assert config_table.table(conf).splitlines() == [
        "| group | option | what it is |", "|---|---|---|",
        "| `widget` | `small` (default) | A small widget \\| fast |",
        "|  | `big` | A big widget |"]


def test_write_rewrites_only_the_marked_section(tmp_path):
    conf = _conf(tmp_path)
    (conf / "widget" / "big.yaml").write_text("# A big widget\nsize: 2\n")
    readme = tmp_path / "README.md"
    start, end = config_table.START, config_table.END
    readme.write_text(f"# Title\n\ntext before\n\n{start}\n| old | table |\n{end}\n\nafter\n")
    assert config_table.main(["--readme", str(readme), "--conf", str(conf)]) == 0
    assert config_table.main(["--write", "--readme", str(readme), "--conf", str(conf)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\ntext before\n\n") and text.endswith(f"{end}\n\nafter\n")
    assert config_table.section(text) == config_table.table(conf)
    readme.write_text("no markers\n")
    assert config_table.main(["--write", "--readme", str(readme), "--conf", str(conf)]) == 1
    assert readme.read_text() == "no markers\n"
