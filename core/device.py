"""Device selection: CUDA when present, else CPU; ``--device`` forces one."""

from __future__ import annotations

import torch

from .errors import MaskbenchError


def resolve_device(spec: str | None = "auto") -> torch.device:
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise MaskbenchError(f"Invalid --device '{spec}': {exc}. Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MaskbenchError(f"--device {spec} was requested but CUDA is not available on this machine.")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall times measure the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
