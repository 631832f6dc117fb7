"""scripts/doc_section.py: the benchmarks rewrite their own section of a doc and nothing else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("doc_section", ROOT / "scripts" / "doc_section.py")
doc_section = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_section)


def test_only_the_named_section_is_rewritten(tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("intro\n<!-- a:start -->\nold a\n<!-- a:end -->\nmiddle\n"
                   "<!-- b:start -->\nold b\n<!-- b:end -->\nreading of b\n")
    doc_section.replace_section(doc, "b", "new b\n")
    assert doc.read_text() == ("intro\n<!-- a:start -->\nold a\n<!-- a:end -->\nmiddle\n"
                               "<!-- b:start -->\nnew b\n<!-- b:end -->\nreading of b\n")
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no partial file left


def test_a_missing_section_is_appended(tmp_path):
    doc = tmp_path / "docs" / "NEW.md"
    doc_section.replace_section(doc, "c", "table")
    assert doc.read_text() == "<!-- c:start -->\ntable\n<!-- c:end -->\n"
    doc_section.replace_section(doc, "d", "more")
    assert doc.read_text().endswith("<!-- c:end -->\n\n<!-- d:start -->\nmore\n<!-- d:end -->\n")
