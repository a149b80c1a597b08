"""Checkpoints: tensors and plain containers saved atomically and loaded with ``weights_only=True``.

The one save/load path for every file of weights maskbench writes or reads (classifiers, learned methods'
networks and their training progress): a save never leaves a half-written file under the final name, and a
load never unpickles code. A file that cannot be read is a :class:`CheckpointError` that names it and why.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .errors import MaskbenchError
from .storage import atomic_write


class CheckpointError(MaskbenchError, ValueError):
    """A checkpoint file that is missing, damaged, or holds something ``weights_only`` refuses."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot load the checkpoint {path}: {reason}")
        self.path, self.reason = path, reason


def save_checkpoint(path: str | Path, obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (a temporary file renamed into place)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; CheckpointError naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a checkpoint, or refused by weights_only (pickled code)
        why = str(exc).splitlines()[0] if str(exc) else ""
        if "Weights only load failed" in why or "weights_only" in why:
            why = "not a checkpoint of tensors (damaged, another format, or pickled objects weights_only refuses)"
        raise CheckpointError(path, f"{type(exc).__name__}: {why[:200]}") from None
