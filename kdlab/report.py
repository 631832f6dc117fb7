"""Measure what a comparison needs (parameters, CPU latency) and write the run's report."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.models import count_parameters

ROLES = ("teacher", "student", "baseline")


def model_name(model_cfg: Mapping[str, Any]) -> str:
    """A model config's ``name`` (zoo models: ``resnet8x4`` …), else the class name of its
    ``_target_`` (``CNN``, ``MLP`` …)."""
    return str(model_cfg.get("name") or str(model_cfg["_target_"]).rsplit(".", 1)[-1])


@torch.no_grad()
def cpu_latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 128,
    repeats: int = 20,
    warmup: int = 3,
    channels_last: bool = False,
) -> float:
    """Median wall time in milliseconds of one eval-mode forward pass of a ``batch_size`` batch
    on the CPU, with the process's current thread count. ``model`` is left where it was."""
    device = next(model.parameters()).device
    was_training = model.training
    model = model.cpu().eval()
    x = torch.randn(batch_size, *input_shape)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    model.to(device).train(was_training)
    return 1000.0 * statistics.median(times)


def describe_model(
    model: nn.Module, input_shape: tuple[int, ...], latency: Mapping[str, Any], channels_last: bool
) -> dict[str, Any]:
    """Parameter count and CPU latency of ``model``."""
    return {
        "params": count_parameters(model),
        "latency_ms": cpu_latency_ms(
            model,
            input_shape,
            batch_size=int(latency["batch_size"]),
            repeats=int(latency["repeats"]),
            channels_last=channels_last,
        ),
        "latency_batch_size": int(latency["batch_size"]),
        "latency_threads": torch.get_num_threads(),
    }


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file and a rename."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """Rows ``[stage, model, params, test acc, val acc, latency]``: one per entry of the run's
    ``stages`` (one per role present for older results without it)."""
    rows = []
    entries = results.get("stages") or [
        {"stage": role, **results[role]} for role in ROLES if results.get(role)]
    for entry in entries:
        metrics = entry.get("metrics", {})
        rows.append([
            str(entry.get("stage", "")),
            str(entry.get("model", "")),
            f"{entry['params']:,}",
            _pct(metrics.get("test/acc")),
            _pct(metrics.get("val/acc")),
            f"{entry['latency_ms']:.2f}",
        ])
    return rows


HEADERS = ["stage", "model", "params", "test acc %", "val acc %", "CPU ms/batch"]


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


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
