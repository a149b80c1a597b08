"""Masked-classifier counts (NeurIPS 2022 Table 4) with a classifier whose logits are known for each input."""

import math

import torch
from mb_testutils import make_batch

from maskbench.metrics import METRICS, MetricInputs
from maskbench.metrics.masked_classifier import MASKED_THRESHOLD, ORIGINAL_THRESHOLD

CLEAN = [1.0, -1.0, 1.0, -2.0]  # logits of any image with a visible pixel
BLANK = [-0.5, -0.5, -3.0, -3.0]  # logits of an all-zero (fully masked) image


class VisibleOrBlank(torch.nn.Module):
    def forward(self, x):
        blank = (x.flatten(1).abs().sum(1) == 0)[:, None]
        return torch.where(blank, torch.tensor(BLANK), torch.tensor(CLEAN))


def counts(mask_value: float, labels=((0, 1),)):
    batch = make_batch([list(lab) for lab in labels], torch.zeros(len(labels), 4, 6, 6))
    batch.images = batch.images + 3.0  # no pixel is exactly zero
    classes = torch.tensor([[0, 1, 2]] * len(labels))
    masks = torch.full((len(labels), 3, 6, 6), mask_value)
    out = METRICS.get("maskcls").fn(MetricInputs(VisibleOrBlank(), batch.images, masks, classes, batch))
    return {k: v.tolist() for k, v in out.items()}


def test_thresholds_are_those_of_the_reference_code():
    assert (ORIGINAL_THRESHOLD, MASKED_THRESHOLD) == (0.0, -1.0)


def test_counts_on_original_and_masked_images():
    # true classes {0, 1}; clean logits predict {0, 2} at 0.0 -> tp 1, fp 1 (class 2), fn 1 (class 1)
    full = counts(1.0)
    assert (full["orig_tp"], full["orig_fp"], full["orig_fn"]) == ([1.0], [1.0], [1.0])
    # mask of ones leaves the image unchanged; at -1.0 class 1 (logit exactly -1) is predicted (>=, as the
    # reference code) -> tp 2, fp 1, fn 0; class 3 (logit -2) stays negative
    assert (full["tp"], full["fp"], full["fn"]) == ([2.0], [1.0], [0.0])
    # a zero mask blanks the image: blank logits predict {0, 1} at -1.0 -> tp 2, fp 0, fn 0
    empty = counts(0.0)
    assert (empty["tp"], empty["fp"], empty["fn"]) == ([2.0], [0.0], [0.0])
    assert empty["orig_tp"] == [1.0]  # the original image does not depend on the mask


def test_image_without_true_class_among_explained_is_undefined():
    out = counts(1.0, labels=((0, 1), (3,)))  # image 1's only true class (3) is not among the explained 0, 1, 2
    assert out["tp"][0] == 2.0 and math.isnan(out["tp"][1]) and math.isnan(out["orig_fp"][1])
