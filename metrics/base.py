"""The metric contract and registry.

A metric is a function ``fn(inputs: MetricInputs) -> Tensor`` returning one value per image, shape (B,),
NaN where the metric is undefined for that image (e.g. no segmentation, or no true class); the runner counts
NaN values per metric and method, and tables report how many images each mean is over. Each registered
metric carries its polarity (``higher_is_better``), the table it belongs to and its column label, so tables
get their arrows and bold-best cells from the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maskbench.benchmark.registry import Registry


@dataclass
class MetricInputs:
    """One batch of masks to score, all on the model's device."""

    model: nn.Module  # frozen classifier
    images: Tensor  # (B, 3, H, W) normalised
    masks: Tensor  # (B, K, H, W) in [0, 1]
    classes: Tensor  # (B, K) long: the class of each mask
    batch: Any  # maskbench.datasets.Batch (labels, class_masks, ignore, has_seg, boxes)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable[[MetricInputs], Tensor]
    higher_is_better: bool
    table: str
    label: str
    version: str = "1"
    description: str = ""
    valid_range: tuple[float, float] = (-math.inf, math.inf)  # every stored value of the metric lies in it


METRICS: Registry = Registry("metric")


def value_range(metric: str) -> tuple[float, float]:
    """The valid range of a stored row's metric (``iou``, or a cell of a dict metric such as
    ``classmask/t1/m2``): its registered ``valid_range``, unbounded for a metric that is not registered."""
    base = metric.split("/", 1)[0]
    return METRICS.get(base).valid_range if base in METRICS else (-math.inf, math.inf)


def register_metric(
    name: str, *, higher_is_better: bool, table: str, label: str | None = None, version: str = "1",
    valid_range: tuple[float, float] = (-math.inf, math.inf),
) -> Callable[[Callable[[MetricInputs], Tensor]], Callable[[MetricInputs], Tensor]]:
    """Register a metric. ``valid_range`` bounds every value it can store (also the cells of a dict metric):
    stored rows outside it are damaged, and are recomputed by ``bench`` and refused by ``tables``."""

    def wrapper(fn: Callable[[MetricInputs], Tensor]) -> Callable[[MetricInputs], Tensor]:
        doc = (fn.__doc__ or "").strip().splitlines()
        spec = MetricSpec(name, fn, higher_is_better, table, label or name, version, doc[0] if doc else "",
                          (float(valid_range[0]), float(valid_range[1])))
        METRICS.register(name, spec)
        return fn

    return wrapper


def merge_true_class_masks(masks: Tensor, classes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel max over the masks of each image's true classes (NeurIPS 2022, Sec. 4.3).

    Returns the merged (B, H, W) mask and a (B,) bool telling which images have at least one true class among
    ``classes`` (the others get an all-zero merged mask and must be reported as undefined, not scored).
    """
    is_true = torch.gather(labels > 0, 1, classes)  # (B, K)
    neg = torch.full_like(masks, -1.0)
    merged = torch.where(is_true[:, :, None, None], masks, neg).amax(1)
    has_true = is_true.any(1)
    return merged.clamp_min(0.0), has_true


def true_class_slots(classes: Tensor, labels: Tensor) -> Tensor:
    """(B, K) bool: slot k holds a true class of the image, and is that class's first slot.

    The runner pads each image's explained classes by repeating its first class, so a class can occupy several
    slots; per-class metrics must score it once.
    """
    is_true = torch.gather(labels > 0, 1, classes)
    k = classes.shape[1]
    same = classes[:, :, None] == classes[:, None, :]  # (B, K, K)
    earlier = torch.ones(k, k, dtype=torch.bool, device=classes.device).tril(-1)  # [k, j] = j < k
    repeated = (same & earlier).any(2)
    return is_true & ~repeated


def forward_rows(images: Tensor) -> int:
    """How many images of this size one no-grad forward of a metric takes: about 2^22 input pixels."""
    return max(1, (1 << 22) // (images.shape[-2] * images.shape[-1]))


@torch.no_grad()
def forward_in_chunks(model: nn.Module, x: Tensor, rows: int | None = None) -> Tensor:
    """Float logits of ``model`` on ``x`` (N, 3, H, W), ``rows`` images per forward (default :func:`forward_rows`)."""
    rows = rows or forward_rows(x)
    return torch.cat([model(x[i : i + rows]).float() for i in range(0, len(x), rows)])
