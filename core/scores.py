"""Class scores from logits: the score a perturbation method maximises or a metric reads.

``sigmoid`` is the class probability of a multi-label classifier (one sigmoid per class), ``softmax`` that of a
single-label one (the choice of the published ImageNet runs), ``logit`` the raw output. Which of the first two
is a classifier's class probability is a property of the classifier (:func:`probability_kind`: its
``probabilities`` attribute, ``sigmoid`` when it has none); methods whose ``score`` is ``"auto"`` and the
metrics that read a class probability take it from there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SCORES = ("sigmoid", "softmax", "logit")
METHOD_SCORES = ("auto", *SCORES)  # a method's ``score``: auto = the classifier's own probability


def probability_kind(model: nn.Module) -> str:
    """``sigmoid`` (multi-label) or ``softmax`` (single-label): how ``model``'s logits become class probabilities."""
    kind = getattr(model, "probabilities", "sigmoid")
    if kind not in ("sigmoid", "softmax"):
        raise ValueError(f"{type(model).__name__}.probabilities must be 'sigmoid' or 'softmax', not {kind!r}")
    return kind


def resolve_score(score: str, model: nn.Module) -> str:
    """A method's ``score`` setting for this model: ``auto`` becomes the model's :func:`probability_kind`."""
    return probability_kind(model) if score == "auto" else score


def class_probabilities(model: nn.Module, logits: Tensor) -> Tensor:
    """(N, C) logits of ``model`` -> its (N, C) class probabilities (sigmoid or softmax over the last dim)."""
    return scores_from_logits(logits, probability_kind(model))


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
