"""Segmentation metrics (NeurIPS 2022 Sec. 4.3) on hand-made masks whose scores follow by arithmetic."""

import math

import pytest
import torch
from mb_testutils import make_batch

from maskbench.metrics import METRICS, MetricInputs, merge_true_class_masks

H = W = 8


def left_half_gt(num_classes=4, cls=0):
    cm = torch.zeros(1, num_classes, H, W)
    cm[0, cls, :, : W // 2] = 1
    return cm


class FixedLogits(torch.nn.Module):
    """A 'classifier' whose logits do not depend on the input: softmax probabilities are known."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def score(mask, batch, classes=None, model=None):
    classes = torch.zeros(mask.shape[0], mask.shape[1], dtype=torch.long) if classes is None else classes
    model = model or FixedLogits([0.0, 0.0, 0.0, 0.0])
    inputs = MetricInputs(model, batch.images, mask, classes, batch)
    return {n: METRICS.get(n).fn(inputs) for n in ("acc", "iou", "mae", "sal")}


@pytest.mark.parametrize(
    "value, acc, iou, mae",
    [
        ("gt", 100.0, 100.0, 0.0),
        (0.0, 50.0, 0.0, 50.0),
        (0.5, 50.0, 100 * 16 / 48, 50.0),  # sum min = 32*0.5; sum max = 32*1 + 32*0.5
        (1.0, 50.0, 50.0, 50.0),
    ],
)
def test_sanity_rows_follow_arithmetic(value, acc, iou, mae):
    batch = make_batch([[0]], left_half_gt())
    mask = left_half_gt()[:, :1] if value == "gt" else torch.full((1, 1, H, W), value)
    s = score(mask, batch)
    assert s["acc"].item() == pytest.approx(acc)
    assert s["iou"].item() == pytest.approx(iou)
    assert s["mae"].item() == pytest.approx(mae)


def test_ignore_region_is_excluded():
    batch = make_batch([[0]], left_half_gt(), ignore=torch.zeros(1, H, W, dtype=torch.bool))
    mask = left_half_gt()[:, :1].clone()
    mask[0, 0, :, W // 2] = 1.0  # wrong on one column of background ...
    wrong = score(mask, batch)
    assert wrong["mae"].item() == pytest.approx(100 * 8 / 64)
    ignore = torch.zeros(1, H, W, dtype=torch.bool)
    ignore[0, :, W // 2] = True  # ... which is the ignore band: no longer counted
    batch = make_batch([[0]], left_half_gt(), ignore=ignore)
    s = score(mask, batch)
    assert s["mae"].item() == pytest.approx(0.0)
    assert s["acc"].item() == pytest.approx(100.0)
    assert s["iou"].item() == pytest.approx(100.0)


def test_masks_of_true_classes_merge_by_max_and_others_are_ignored():
    cm = torch.zeros(1, 4, H, W)
    cm[0, 0, :, :4] = 1  # class 0 left half
    cm[0, 2, :4, 4:] = 1  # class 2 top-right quarter
    batch = make_batch([[0, 2]], cm)
    classes = torch.tensor([[0, 2, 3]])
    masks = torch.stack([cm[0, 0], cm[0, 2], torch.ones(H, W)])[None]  # class 3 (not true) covers everything
    merged, has_true = merge_true_class_masks(masks, classes, batch.labels)
    assert has_true.tolist() == [True]
    assert torch.equal(merged[0], torch.maximum(cm[0, 0], cm[0, 2]))
    s = score(masks, batch, classes)
    assert s["iou"].item() == pytest.approx(100.0)
    assert s["mae"].item() == pytest.approx(0.0)


def test_saliency_equation_9():
    batch = make_batch([[0, 1]], left_half_gt())
    model = FixedLogits([0.0, 0.0, math.log(2.0), 0.0])  # softmax = [1, 1, 2, 1] / 5
    mask = torch.full((1, 1, H, W), 0.5)
    s = score(mask, batch, model=model)
    assert s["sal"].item() == pytest.approx(math.log(0.5) - math.log(2 / 5))
    # a tiny mask: the area term is clamped at 0.05
    s0 = score(torch.zeros(1, 1, H, W), batch, model=model)
    assert s0["sal"].item() == pytest.approx(math.log(0.05) - math.log(2 / 5))


def test_saliency_applies_the_classifier_to_the_masked_image():
    class Brightness(torch.nn.Module):
        def forward(self, x):  # logit of class 0 grows with the image's mean
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([10 * m, torch.zeros_like(m)], 1)

    images = torch.ones(1, 3, H, W)
    cm = torch.zeros(1, 2, H, W)
    cm[0, 0] = 1
    batch = make_batch([[0]], cm, images=images, num_classes=2)
    full = score(torch.ones(1, 1, H, W), batch, model=Brightness())["sal"].item()
    empty = score(torch.zeros(1, 1, H, W), batch, model=Brightness())["sal"].item()
    p_full = math.exp(10) / (math.exp(10) + 1)
    assert full == pytest.approx(math.log(1.0) - math.log(p_full), abs=1e-5)
    assert empty == pytest.approx(math.log(0.05) - math.log(0.5), abs=1e-5)


def test_undefined_cases_are_nan_not_zero():
    cm = torch.zeros(2, 4, H, W)
    cm[0, 0, :, :4] = 1
    batch = make_batch([[0], [1]], cm)  # image 1: class 1 is true but has no pixels (empty ground truth)
    batch.has_seg[0] = False  # image 0: no segmentation at all
    masks = torch.zeros(2, 1, H, W)
    s = score(masks, batch, classes=torch.tensor([[0], [1]]))
    assert math.isnan(s["acc"][0]) and math.isnan(s["iou"][0]) and math.isnan(s["mae"][0])
    assert not math.isnan(s["sal"][0])  # Sal needs no segmentation
    assert math.isnan(s["iou"][1])  # 0 / 0
    assert s["mae"][1].item() == 0.0 and s["acc"][1].item() == 100.0
    # no true class among the explained classes: nothing to merge, every metric undefined
    s2 = score(torch.ones(2, 1, H, W), batch, classes=torch.tensor([[3], [3]]))
    assert all(math.isnan(v) for n in s2 for v in s2[n].tolist())


def test_metric_polarity_registered():
    assert METRICS.get("acc").higher_is_better and METRICS.get("iou").higher_is_better
    assert not METRICS.get("sal").higher_is_better and not METRICS.get("mae").higher_is_better
