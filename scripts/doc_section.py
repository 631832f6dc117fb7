"""Rewrite one generated section of a Markdown doc, leaving the rest of the file alone."""

from __future__ import annotations

from pathlib import Path

from kdlab.util.files import write_atomic


def replace_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``
    (appended at the end when the markers are missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    write_atomic(path, text.encode())  # an interrupted write keeps the old doc
