"""Segmentation scores of the merged attribution mask (Stalder et al., NeurIPS 2022, Sec. 4.3, Table 2).

Per image, the masks of the image's true classes are merged by per-pixel maximum into m, compared with the
aggregated ground truth g (union of the true classes' segmentations); pixels of the ignore region (VOC's 255
boundary band) are excluded from Acc, IoU and MAE. Scores are per image, averaged over images by the tables.

* Acc = 100 * sum(m g + (1 - m)(1 - g)) / Z, pixel accuracy on the continuous mask (no threshold);
* IoU = 100 * sum(min(m, g)) / sum(max(m, g)), the soft IoU;
* MAE = 100 * sum(|m - g|) / Z;
* Sal = log(max(A(m), 0.05)) - log(sum_{c in Y} p[c]) (eq. 9), p = softmax of the classifier on x * m, Y the
  image's true classes, each counted once, A(m) the mean of m over the whole image (the classifier sees the
  whole masked image, so the ignore band is not excluded from A).

Masking multiplies the normalised image, so masked-out pixels take the data set's mean colour, as in the
NeurIPS 2022 code. Undefined cases return NaN and are counted by the runner: images without segmentation
(all four except Sal), images with no true class among the explained ones (all four), and IoU when both m and
g are zero everywhere (0 / 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import MetricInputs, TableSpec, merge_true_class_masks, metric_statistic, register_metric, register_table

_NAN = math.nan


def _merged(inputs: MetricInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merged mask, ground truth, valid-pixel weights and the (B,) mask of images where GT scores exist."""
    b = inputs.batch
    m, has_true = merge_true_class_masks(inputs.masks, inputs.classes, b.labels)
    g = b.segmentation.to(m.dtype)
    valid = (~b.ignore).to(m.dtype)
    ok = has_true & b.has_seg & (valid.flatten(1).sum(1) > 0)
    return m, g, valid, ok


def _where_ok(values: Tensor, ok: Tensor) -> Tensor:
    return torch.where(ok, values, torch.full_like(values, _NAN))


@register_metric("acc", higher_is_better=True, table="segmentation", label="Acc", valid_range=(0.0, 100.0))
def accuracy(inputs: MetricInputs) -> Tensor:
    """Pixel accuracy of the continuous merged mask against the ground truth, in %."""
    m, g, valid, ok = _merged(inputs)
    agree = (m * g + (1 - m) * (1 - g)) * valid
    return _where_ok(100 * agree.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1), ok)


@register_metric("iou", higher_is_better=True, table="segmentation", label="IoU", valid_range=(0.0, 100.0))
def soft_iou(inputs: MetricInputs) -> Tensor:
    """Soft IoU: sum of min over sum of max of mask and ground truth, in %."""
    m, g, valid, ok = _merged(inputs)
    inter = (torch.minimum(m, g) * valid).flatten(1).sum(1)
    union = (torch.maximum(m, g) * valid).flatten(1).sum(1)
    return _where_ok(100 * inter / union.clamp_min(1e-12), ok & (union > 0))


@register_metric("mae", higher_is_better=False, table="segmentation", label="MAE", valid_range=(0.0, 100.0))
def mean_absolute_error(inputs: MetricInputs) -> Tensor:
    """Mean absolute error between merged mask and ground truth, in %."""
    m, g, valid, ok = _merged(inputs)
    err = ((m - g).abs() * valid).flatten(1).sum(1)
    return _where_ok(100 * err / valid.flatten(1).sum(1).clamp_min(1), ok)


@register_metric("sal", higher_is_better=False, table="segmentation", label="Sal",
                 valid_range=(math.log(0.05), math.inf))
@torch.no_grad()
def saliency(inputs: MetricInputs) -> Tensor:
    """Dabkowski-Gal saliency score as adapted by eq. 9 of Stalder et al. (lower is better)."""
    b = inputs.batch
    m, has_true = merge_true_class_masks(inputs.masks, inputs.classes, b.labels)
    area = m.flatten(1).mean(1).clamp_min(0.05)
    probs = torch.softmax(inputs.model(inputs.images * m[:, None]).float(), dim=1)
    p_true = (probs * (b.labels > 0).to(probs.dtype)).sum(1)
    sal = torch.log(area) - torch.log(p_true.clamp_min(1e-30))
    return _where_ok(sal, has_true & (b.labels.sum(1) > 0))


register_table(TableSpec(
    "segmentation", tuple(metric_statistic(m) for m in ("acc", "iou", "sal", "mae")),
    r"Segmentation scores of the merged class masks. Acc, IoU and MAE in \%, Sal as eq.~9.",
    r"Stalder et al.\ (2022), Table 2", order=10, headline=("iou", "IoU", "IoU: segmentation"),
))
