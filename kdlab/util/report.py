"""The run's report: ``results.json`` and the comparison table (terminal and Markdown)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("teacher", "student", "baseline")


def model_name(model_cfg: Mapping[str, Any]) -> str:
    """A model config's ``name`` (zoo models: ``resnet8x4`` …), else the class name of its
    ``_target_`` (``CNN``, ``MLP`` …)."""
    return str(model_cfg.get("name") or str(model_cfg["_target_"]).rsplit(".", 1)[-1])


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """Rows ``[stage, model, params, test acc, val acc, latency]``: one per entry of the run's
    ``stages`` (one per role present for older results without it)."""
    rows = []
    entries = results.get("stages") or [
        {"stage": role, **results[role]} for role in ROLES if results.get(role)]
    for entry in entries:
        metrics = entry.get("metrics", {})
        stage = str(entry.get("stage", ""))
        if metrics.get("skipped_batches"):  # nonfinite_loss=skip: never hidden
            stage += (f" (skipped {int(metrics['skipped_batches'])} batches, "
                      f"{100 * metrics.get('skipped_fraction', 0):.1f}%)")
        rows.append([
            stage,
            str(entry.get("model", "")),
            f"{entry['params']:,}",
            _pct(metrics.get("test/acc")),
            _pct(metrics.get("val/acc")),
            f"{entry['latency_ms']:.2f}",
        ])
    return rows


HEADERS = ["stage", "model", "params", "test acc %", "val acc %", "CPU ms/batch"]


def _pct(value: float | None) -> str:
    if value is None or value != value:  # missing, or NaN (written as null in results.json)
        return "—"
    return f"{100 * value:.2f}"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of text cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(results: Mapping[str, Any]) -> str:
    """The comparison table in Markdown."""
    return markdown(HEADERS, table_rows(results))


def print_table(results: Mapping[str, Any], title: str) -> None:
    """Print the comparison table to the terminal (rich when available)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency, but keep a plain fallback
        print(title)
        print(markdown_table(results))
        return
    table = Table(title=title)
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i < 2 else "right")
    for row in table_rows(results):
        table.add_row(*row)
    Console().print(table)
