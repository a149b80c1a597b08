"""Class-specific masking (Stalder et al., NeurIPS 2022, Sec. 4.2, Table 1).

For an image that contains target class t, the image is masked with the mask of class c (for every explained
class c), thresholded at each of 0.1, 0.2, ..., 0.9 (a hard mask on the normalised image, as the paper's code),
and the classifier's softmax probability of t is averaged over the thresholds; the "none" column is the softmax
probability of t on the unmasked image. Values in %. A good class-specific attribution keeps t's probability
with t's own mask (the diagonal) and destroys it with the masks of other classes (off the diagonal).

Per image the metric returns one value per (target t in the image's labels, mask class c among the explained
classes), named ``t<t>/m<c>`` (and ``t<t>/none``); the tables average them over images and summarise each
method by the mean diagonal minus the mean off-diagonal cell ("contrast").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MetricInputs, forward_in_chunks, register_metric

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


@register_metric("classmask", higher_is_better=True, table="class_table", label="Class masking",
                 valid_range=(0.0, 100.0))
@torch.no_grad()
def class_masking(inputs: MetricInputs) -> dict[str, Tensor]:
    """Softmax probability (%) of each true class under each class's thresholded mask (NeurIPS 2022 Table 1)."""
    b, k = inputs.classes.shape
    masks, images, labels = inputs.masks, inputs.images, inputs.batch.labels
    thr = torch.tensor(THRESHOLDS, device=masks.device, dtype=masks.dtype)
    hard = (masks[:, :, None] > thr[None, None, :, None, None]).to(images.dtype)  # (B, K, T, H, W)
    x = (images[:, None, None] * hard[:, :, :, None]).flatten(0, 2)  # (B*K*T, 3, H, W)
    probs = torch.softmax(forward_in_chunks(inputs.model, x), 1)
    probs = probs.view(b, k, len(THRESHOLDS), -1).mean(2)  # (B, K, C): mean over thresholds
    clean = torch.softmax(forward_in_chunks(inputs.model, images), 1)  # (B, C)
    out: dict[str, Tensor] = {}
    nan = torch.full((b,), float("nan"), device=masks.device)
    for t in torch.nonzero(labels.sum(0) > 0).flatten().tolist():
        has_t = labels[:, t] > 0
        out[f"t{t}/none"] = torch.where(has_t, 100 * clean[:, t], nan)
        for c in sorted(set(inputs.classes.flatten().tolist())):
            # column of class c in each image's explained classes (first occurrence), if explained at all
            match = inputs.classes == c
            present = match.any(1)
            col = match.float().argmax(1)
            val = probs[torch.arange(b, device=masks.device), col, t]
            out[f"t{t}/m{c}"] = torch.where(has_t & present, 100 * val, nan)
    return out
