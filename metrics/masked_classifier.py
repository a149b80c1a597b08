"""Masked-classifier precision and recall (Stalder et al., NeurIPS 2022, Sup. Mat. B, Table 4).

The multi-label classifier is run on the original image and on the image multiplied by the method's merged
mask of the image's true classes (per-pixel max, as for the segmentation scores; masked-out pixels take the
mean colour). A class is predicted when its logit reaches a threshold (``>=``, as NN-Explainer's
``MultiLabelMetrics``): ``ORIGINAL_THRESHOLD`` = 0.0 on the
original image (p = 0.5, NN-Explainer's ``metrics_threshold`` for the classifier) and ``MASKED_THRESHOLD`` =
-1.0 on masked images (the Explainer's default ``metrics_threshold``; the paper: "since masked images result
in overall lower logits, we have used slightly different thresholds"). Per image the metric stores the counts
of true positives, false positives and false negatives over all classes, for the original (``orig_*``) and the
masked image (a single-label classifier, whose probabilities are a softmax, predicts its top-1 class on both);
the tables sum them over images (micro-averaged precision, recall and F-score, bootstrapped
over images). Images without any true class among the explained ones are undefined (NaN, counted).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import Tensor

from maskbench.core.scores import probability_kind
from maskbench.core.stats import f_score, ratio_of_sums

from .base import MetricInputs, TableSpec, forward_in_chunks, merge_true_class_masks, register_metric, register_table

ORIGINAL_THRESHOLD = 0.0
MASKED_THRESHOLD = -1.0


def _counts(logits: Tensor, labels: Tensor, threshold: float, single_label: bool = False
            ) -> tuple[Tensor, Tensor, Tensor]:
    if single_label:  # a softmax classifier predicts its top-1 class
        pred = torch.zeros_like(labels, dtype=torch.bool).scatter_(1, logits.argmax(1, keepdim=True), True)
    else:
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
    single = probability_kind(inputs.model) == "softmax"
    nan = torch.full((b,), float("nan"), device=labels.device)
    out: dict[str, Tensor] = {}
    for prefix, lg, thr in (("orig_", orig, ORIGINAL_THRESHOLD), ("", masked, MASKED_THRESHOLD)):
        for key, v in zip(("tp", "fp", "fn"), _counts(lg, labels, thr, single), strict=True):
            out[prefix + key] = torch.where(has_true, v, nan)
    return out


UNMASKED = "classifier-unmasked"  # pseudo-method of the table: the classifier on the clean images


def with_unmasked(rows: pd.DataFrame, metas: dict[str, dict]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Add the unmasked classifier as a pseudo-method (its counts are stored with every method's rows: those of
    the first method in display order that has them)."""
    have = set(rows.loc[rows["metric"] == "maskcls/orig_tp", "method"])
    source = next((m for m in metas if m in have), None)
    if source is None:
        return rows, metas
    sub = rows[(rows["method"] == source) & rows["metric"].str.startswith("maskcls/orig_")].copy()
    sub["metric"] = sub["metric"].str.replace("maskcls/orig_", "maskcls/", regex=False)
    sub["method"] = UNMASKED
    metas = {**metas, UNMASKED: {"label": "Classifier (unmasked)", "family": "classifier", "preset": ""}}
    return pd.concat([rows, sub], ignore_index=True), metas


register_table(TableSpec(
    "masked_classifier",
    (ratio_of_sums("masked_precision", ["maskcls/tp"], ["maskcls/tp", "maskcls/fp"], "Precision", True),
     ratio_of_sums("masked_recall", ["maskcls/tp"], ["maskcls/tp", "maskcls/fn"], "Recall", True),
     f_score("masked_f", "maskcls/tp", "maskcls/fp", "maskcls/fn", "F-score")),
    r"Multi-label classifier on images masked by each method's merged true-class mask (logit "
    r"threshold $-1$) and on the unmasked images (threshold $0$): micro precision, recall and "
    r"F-score (\%).",
    r"Stalder et al.\ (2022), Table 4", order=60,
    headline=("masked_f", "Masked F", "F-score of the classifier on masked images"), pseudo_rows=with_unmasked,
))
