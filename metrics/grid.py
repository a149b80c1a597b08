"""Grid localisation (``grid_share``, ``grid_pointing``; table "grid"): how much of a map lies in the region the
classifier can use, on data whose ground truth is guaranteed (the DiFull grid, :mod:`maskbench.datasets.grid`).

Rao, Böhle & Schiele, "Towards Better Understanding Attribution Methods", CVPR 2022, Sec. 3 (DiFull) and the
grid pointing game of Böhle et al., "Convolutional Dynamic Alignment Networks", CVPR 2021 (GridPG): the
localisation score of an attribution map A for the class of grid cell i is

    L_i = sum_{p in cell i} A+_p / sum_p A+_p,        A+ = max(A, 0),

the share of the positive attribution that lies in the cell. On ``synthetic-grid`` with the disconnected
``grid-smallcnn`` the cell is exactly the region the output can depend on, so every bit of mass outside it is
wrong by construction (a map can still be wrong inside the cell: this measures leakage, not precision).

Per image (values in %, like the other localisation metrics)
------------------------------------------------------------
* for each true class of the image among its explained ones (each once, :func:`true_class_slots`): 100 x the
  class map's mass inside the class's ground-truth region over its total mass; the region is the one the
  pointing game uses (:func:`~maskbench.metrics.localisation.pointing_ground_truth`: the class mask minus the
  ignore band where the image has a segmentation, else the union of its boxes), i.e. the class's cell here;
* the image's value is the mean over those classes; a class whose map has no positive mass (an all-zero map:
  0 / 0) or whose region is empty is left out, and an image with no class left (or no true class explained) is
  **NaN, never 0**. The runner counts the constant maps per method (``diagnostics.csv``: ``constant_maps``).

Known answers: the class's own cell as map scores 100, a map only in other cells 0, a uniform map 25 (the cell
is a quarter of the grid), the ground-truth row 100 (``tests/test_grid.py``).

Strict cell pointing (``grid_pointing``, same table)
----------------------------------------------------
The pointing game (:mod:`~maskbench.metrics.localisation`) on the grid is "pointing on cells", since its ground
truth is the cell, but with its tolerance (15 px at 224 px: 8.6 px at 128 px) a maximum up to 8 px inside a
*neighbouring* cell is a hit; the centre Gaussian's four tied maxima at the grid's centre are each within it of
every cell, so it scores 100 there. ``grid_pointing`` is the same game without tolerance: per true class, the
fraction of the map's maxima (tied maxima count as the expected hit, as in the pointing game) that lie inside the
class's region, x 100; a constant map is a miss (0), as in the pointing game; the image's value is the mean over
its true classes with a non-empty region (NaN without one). The centre Gaussian scores 25 on it.

**Where it is scored.** Only on data sets registered with ``ground_truth="guaranteed"`` (``synthetic-grid``):
``applies_to`` keeps the runner from scoring it elsewhere, so a run on ``synthetic``, VOC or COCO stores no
``grid_share`` row and writes no ``grid`` table (and published runs are not rescored for it). On object masks the
same formula is the "energy inside the mask" share (the mask analogue of Score-CAM's energy-based pointing game
and Kohlbrenner et al.'s attribution localisation), but there the object is not the region the classifier can
use (context counts), so a low value does not mean a wrong map; the function itself computes it on any batch.

Deviations from the papers: the maps are the methods' [0, 1] masks as the benchmark caches and scores them
(float16, after each method's own post-processing: absolute value, percentile clipping, min-max
normalisation), not raw signed attributions, so A+ = A; a min-max normalised map has its minimum at 0, so a
constant offset of an attribution does not count as mass. Multi-label cells: every true (cell, class) of an
image is scored and the image's value is their mean, where GridPG scores the one class of each cell.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from maskbench.datasets import DATASETS

from .base import MetricInputs, TableSpec, metric_statistic, register_metric, register_table, true_class_slots
from .localisation import pointing_ground_truth


def guaranteed_ground_truth(dataset: str) -> bool:
    """Whether ``dataset`` (a registered name) declares its ground truth the region its classifier can use."""
    return dataset in DATASETS and DATASETS.meta(dataset).get("ground_truth") == "guaranteed"


def region_share(masks: Tensor, regions: Tensor) -> tuple[Tensor, Tensor]:
    """Share (%) of each map's positive mass inside its region, and whether it is defined (positive mass, non-empty
    region). ``masks`` (..., H, W) float, ``regions`` (..., H, W) bool; float64 sums."""
    positive = masks.float().clamp_min(0).flatten(-2)
    inside = regions.flatten(-2)
    total = positive.sum(-1, dtype=torch.float64)
    within = torch.where(inside, positive, 0.0).sum(-1, dtype=torch.float64)
    defined = (total > 0) & inside.any(-1)
    return 100.0 * within / torch.where(defined, total, 1.0), defined


@register_metric("grid_share", higher_is_better=True, table="grid", label="Grid share", version="1",
                 valid_range=(0.0, 100.0), applies_to=guaranteed_ground_truth)
@torch.no_grad()
def grid_share(inputs: MetricInputs) -> Tensor:
    """DiFull / GridPG localisation: % of each true class's positive map mass inside its region (its grid cell)."""
    masks, batch = inputs.masks, inputs.batch
    dev = masks.device
    classes = inputs.classes.to(dev)
    slots = true_class_slots(classes, batch.labels.to(dev))
    regions = pointing_ground_truth(batch, classes).to(dev)
    share, defined = region_share(masks, regions)
    scored = slots & defined
    count = scored.sum(1)
    mean = torch.where(scored, share, 0.0).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, mean, math.nan).clamp(0.0, 100.0).float()


@register_metric("grid_pointing", higher_is_better=True, table="grid", label="Cell pointing", version="1",
                 valid_range=(0.0, 100.0), applies_to=guaranteed_ground_truth)
@torch.no_grad()
def grid_pointing(inputs: MetricInputs) -> Tensor:
    """Pointing on cells without tolerance: % of each true class's map maxima inside its region (its grid cell)."""
    masks, batch = inputs.masks, inputs.batch
    dev = masks.device
    classes = inputs.classes.to(dev)
    slots = true_class_slots(classes, batch.labels.to(dev))
    regions = pointing_ground_truth(batch, classes).to(dev).flatten(2)
    flat = masks.float().flatten(2)
    top = flat.amax(2, keepdim=True)
    is_max = (flat == top) & (top[..., 0] > flat.amin(2))[..., None]  # a constant map has no maximum: a miss
    hit = 100.0 * (is_max & regions).sum(2) / is_max.sum(2).clamp_min(1)
    scored = slots & regions.any(2)
    count = scored.sum(1)
    mean = torch.where(scored, hit, 0.0).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, mean, math.nan).clamp(0.0, 100.0).float()


register_table(TableSpec(
    "grid", (metric_statistic("grid_share"), metric_statistic("grid_pointing")),
    r"Grid localisation (DiFull): share (\%) of each true class's positive map mass inside its grid cell, the only "
    r"region the disconnected classifier's output for it can depend on; 100 = no attribution outside the cell, "
    r"a uniform map scores 25; all-zero maps are left out (undefined, never 0). Cell pointing: \% of the map's "
    r"maxima inside the cell (no tolerance; tied maxima count fractionally, a constant map is a miss).",
    r"Rao, B\"ohle \& Schiele (2022), DiFull; B\"ohle et al.\ (2021), GridPG", order=45,
    headline=("grid_share", "Grid share", "DiFull grid localisation"),
))
