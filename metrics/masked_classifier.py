"""Masked-classifier precision and recall (Stalder et al., NeurIPS 2022, Sup. Mat. B, Table 4).

The multi-label classifier is run on the original image and on the image multiplied by the method's merged
mask of the image's true classes (per-pixel max, as for the segmentation scores; masked-out pixels take the
mean colour). A class is predicted when its logit reaches a threshold (``>=``, as NN-Explainer's
``MultiLabelMetrics``): ``ORIGINAL_THRESHOLD`` = 0.0 on the
original image (p = 0.5, NN-Explainer's ``metrics_threshold`` for the classifier) and ``MASKED_THRESHOLD`` =
-1.0 on masked images (the Explainer's default ``metrics_threshold``; the paper: "since masked images result
in overall lower logits, we have used slightly different thresholds"). Per image the metric stores the counts
of true positives, false positives and false negatives over all classes, for the original (``orig_*``) and the
masked image; the tables sum them over images (micro-averaged precision, recall and F-score, bootstrapped
over images). Images without any true class among the explained ones are undefined (NaN, counted).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import MetricInputs, forward_in_chunks, merge_true_class_masks, register_metric

ORIGINAL_THRESHOLD = 0.0
MASKED_THRESHOLD = -1.0


def _counts(logits: Tensor, labels: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    pred = logits >= threshold  # NN-Explainer's MultiLabelMetrics
    truth = labels > 0
    tp = (pred & truth).sum(1).float()
    fp = (pred & ~truth).sum(1).float()
    fn = (~pred & truth).sum(1).float()
    return tp, fp, fn


@register_metric("maskcls", higher_is_better=True, table="masked_classifier", label="Masked classifier",
                 version="2", valid_range=(0.0, math.inf))
@torch.no_grad()
def masked_classifier_counts(inputs: MetricInputs) -> dict[str, Tensor]:
    """Per-image TP/FP/FN of the classifier on the original and on the merged-mask image (NeurIPS 2022 Table 4)."""
    labels = inputs.batch.labels
    merged, has_true = merge_true_class_masks(inputs.masks, inputs.classes, labels)
    b = len(labels)
    logits = forward_in_chunks(inputs.model, torch.cat([inputs.images, inputs.images * merged[:, None]]))
    orig, masked = logits[:b], logits[b:]
    nan = torch.full((b,), float("nan"), device=labels.device)
    out: dict[str, Tensor] = {}
    for prefix, lg, thr in (("orig_", orig, ORIGINAL_THRESHOLD), ("", masked, MASKED_THRESHOLD)):
        for key, v in zip(("tp", "fp", "fn"), _counts(lg, labels, thr), strict=True):
            out[prefix + key] = torch.where(has_true, v, nan)
    return out
