"""Errors raised by maskbench. Each names the bad input and, where there is a choice, the valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MaskbenchError(Exception):
    """Base class of every error maskbench raises on purpose."""


class UnknownNameError(MaskbenchError, ValueError):
    """A name (method, dataset, model, metric, preset) that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        valid = sorted(valid)
        msg = f"Unknown {kind} '{name}'."
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        if close:
            msg += f" Did you mean: {', '.join(close)}?"
        msg += f" Valid {kind} names: {', '.join(valid) if valid else '(none registered)'}."
        super().__init__(msg)
        self.kind, self.name, self.valid = kind, name, valid


class DataError(MaskbenchError):
    """Missing data root, corrupt image, malformed annotation: the message names the file."""


class MethodError(MaskbenchError):
    """An attribution method broke its contract (shape, range) or failed."""


class ModelChangedError(MethodError):
    """A method changed the explained classifier (weights, buffers, train/eval mode or requires_grad)."""


class TrainingIncomplete(MaskbenchError):
    """A learned method's training stopped before its step budget (time limit, interruption); its progress is
    saved and the same command resumes it. No network trained for fewer steps is ever used."""


class InvalidOptionError(MaskbenchError, ValueError):
    """An option with a value outside its valid range: the message names the option, the value and the range."""
