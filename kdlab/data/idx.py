"""Read the IDX format of (Fashion-)MNIST, plain or gzip-compressed, into uint8 tensors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

_DTYPES = {0x08: np.uint8}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (``.gz`` or not) into a ``uint8`` tensor of the shape it declares."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated: {len(data) - offset} bytes for shape {dims}")
    array = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)
    return torch.from_numpy(array.copy())


def find_idx(directory: Path, stem: str) -> Path | None:
    """The file ``stem`` (e.g. ``train-images-idx3-ubyte``) in ``directory``, plain or ``.gz``."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None
