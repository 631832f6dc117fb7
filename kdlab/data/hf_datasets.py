"""Text from a Hugging Face dataset by name or path (``data.hf_dataset=<name-or-path>``; needs
the ``datasets`` library, ``pip install 'kdlab[datasets]'``): each row's text column is one
document, as a file is in a folder corpus, so the split by a seeded hash, the windows and the
content digest of :class:`~kdlab.data.text.TextDataModule` apply unchanged (a row is named by
its index, ``<split>/<index>``).

Where the rows come from: a folder written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk`` (``datasets.load_from_disk``), else ``datasets.load_dataset`` —
a folder of data files, or a dataset on the Hub, downloaded when online.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdlab.util.errors import KdlabError


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_rows(name: str, config: str | None, split: str) -> Any:
    """The rows of ``split`` of the dataset ``name`` (configuration ``config``)."""
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise KdlabError(f"data.hf_dataset={name} needs the datasets library, which is not "
                         "installed: pip install 'kdlab[datasets]'") from None
    path = Path(name).expanduser()
    saved = path.is_dir() and any((path / f).is_file() for f in
                                  ("state.json", "dataset_dict.json"))
    try:
        if saved:
            rows = datasets.load_from_disk(str(path))
            if isinstance(rows, datasets.DatasetDict):
                if split not in rows:
                    raise KdlabError(f"data.hf_split={split}: the dataset at {path} has the "
                                     f"splits {', '.join(rows)}")
                rows = rows[split]
            return rows
        return datasets.load_dataset(str(path) if path.exists() else name, config, split=split)
    except KdlabError:
        raise
    except (OSError, ValueError, ConnectionError) as e:
        raise KdlabError(f"data.hf_dataset={name} (data.hf_config={config}, data.hf_split="
                         f"{split}) could not be loaded: {_first_line(e)}") from None


def documents(name: str, config: str | None, split: str, column: str
              ) -> Iterator[tuple[str, bytes]]:
    """``(<split>/<index>, UTF-8 text)`` of every row of the dataset (see the module
    docstring); rows whose text is empty or missing are skipped."""
    rows = load_rows(name, config, split)
    columns = list(getattr(rows, "column_names", []) or [])
    if column not in columns:
        raise KdlabError(f"data.hf_column={column} is not a column of data.hf_dataset={name}; "
                         f"its columns: {', '.join(columns)}")
    for index, text in enumerate(rows[column]):
        if text:
            yield f"{split}/{index}", str(text).encode("utf-8")
