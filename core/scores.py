"""Class scores from logits: the score a perturbation method maximises or a metric reads.

``sigmoid`` is the class probability of a multi-label classifier (one sigmoid per class), ``softmax`` that of a
single-label one (the choice of the published ImageNet runs), ``logit`` the raw output.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCORES = ("sigmoid", "softmax", "logit")


def scores_from_logits(logits: Tensor, score: str) -> Tensor:
    """(N, C) logits -> (N, C) scores of kind ``score`` (one of :data:`SCORES`)."""
    if score == "sigmoid":
        return torch.sigmoid(logits)
    if score == "softmax":
        return torch.softmax(logits, dim=-1)
    if score == "logit":
        return logits
    raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")


def class_score(logits: Tensor, target: Tensor, score: str) -> Tensor:
    """(N,) score of kind ``score`` of each row's ``target`` class, from (N, C) logits."""
    return scores_from_logits(logits, score).gather(1, target[:, None])[:, 0]
