"""Lightning checkpoints written atomically in their own folder.

Lightning's ``TorchCheckpointIO`` writes a local checkpoint through an fsspec transaction,
which stages it in the system's temporary folder and then copies it over the old file: a
full disk (or a full ``/tmp``) can leave a truncated ``last.ckpt`` with the previous good one
already gone. :class:`AtomicCheckpointIO` serialises the checkpoint, writes it to a temporary
file in the destination folder, flushes it to the disk and renames it over the old one
(:func:`kdlab.util.files.write_atomic`); a failed write leaves the previous checkpoint as it
was and ends the run with one line naming the file and the space it needed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kdlab.util.files import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` with same-folder atomic writes
    for local paths (kdlab's checkpoints are always local: they live in the run folder)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(Path(path), buffer.getbuffer())
