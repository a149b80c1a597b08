"""Shared helpers for the tests: a tiny frozen classifier and hand-made batches with known answers."""

from __future__ import annotations

import torch

from maskbench.benchmark.classifiers import SmallCNN, freeze
from maskbench.datasets.base import Batch


def tiny_model(num_classes: int = 4, seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, widths=(4, 8, 8, 8))
    # non-trivial BatchNorm statistics so eval() differs from train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return freeze(model)


def make_batch(
    labels: list[list[int]],
    class_masks: torch.Tensor,
    ignore: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    num_classes: int = 4,
) -> Batch:
    """A batch from explicit per-class masks (B, C, H, W); ``labels`` lists each image's true classes."""
    b, c, h, w = class_masks.shape
    lab = torch.zeros(b, num_classes)
    for i, cl in enumerate(labels):
        lab[i, cl] = 1
    if images is None:
        images = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))
    return Batch(
        images=images,
        labels=lab,
        image_ids=[f"img{i}" for i in range(b)],
        class_masks=class_masks.bool(),
        ignore=torch.zeros(b, h, w, dtype=torch.bool) if ignore is None else ignore,
        has_seg=torch.ones(b, dtype=torch.bool),
        boxes=[torch.zeros(0, 4) for _ in range(b)],
        box_labels=[torch.zeros(0, dtype=torch.long) for _ in range(b)],
        box_difficult=[torch.zeros(0, dtype=torch.bool) for _ in range(b)],
    )
