"""Localisation scores of per-class maps against boxes and masks: M_I (DGMP eq. 9) and the pointing game.

Both metrics score each *true-class slot* once (:func:`~maskbench.metrics.base.true_class_slots`: the runner pads
the explained classes by repeating the first one, and non-true classes are not scored). Everything is vectorised
on the masks' device; the only Python loops run over the images of a batch and build the box rasters with
tensor ops.

Ground-truth rasters
--------------------
* Boxes are ``[x0, y0, x1, y1]`` in pixel-edge coordinates of the returned image; a box covers pixel (i, j)
  iff the pixel centre (j + 0.5, i + 0.5) lies in the closed box ``x0 <= j + 0.5 <= x1``,
  ``y0 <= i + 0.5 <= y1``. A class's box region is the union of **all** its boxes, PASCAL "difficult" ones
  included (as TorchRay's ``voc_as_mask``) - see :func:`box_union_masks`. A box too thin to contain a pixel
  centre covers no pixel.
* The pointing-game GT of an (image, class) pair is the class's segmentation mask minus the ignore band where
  the image has a segmentation (``has_seg``), else the union of its boxes (:func:`pointing_ground_truth`). A
  mask is the tighter region, so it is preferred when present; TorchRay uses boxes on VOC and instance masks
  on COCO, which this rule reproduces on data sets that provide only one of the two.

M_I (``mi``; table "explainability", label "M_I")
-------------------------------------------------
"Distribution-Guided Local Explanation" (DGMP), Sec. 3.4, eq. 9 and Sec. 4.2.1: the pixels of the class's map
are retrieved in decreasing score order; P_i is the fraction of the retrieved pixels inside the class's boxes,
R_i the fraction of in-box pixels retrieved, and ``M_I = 100 * sum_i P_i (R_i - R_{i-1})``, the average
precision of the map as a pixel ranking. As in the paper, the GT is the union of the class's boxes even where a
segmentation exists, and no pixel is excluded (the ignore band is a segmentation notion). Ties: pixels with
equal scores form **one** retrieval step (they enter together), the convention of scikit-learn's
``average_precision_score``, so the value does not depend on pixel order (maps come from a float16 cache, so
exact ties are common); a constant map scores 100 x the box-area fraction. The per-image value is the mean over
the image's true classes whose box union is non-empty; NaN when there is none (e.g. a data set without boxes).

Pointing game (``pointing``; table "pointing", label "Pointing")
------------------------------------------------------------------
Zhang et al., "Top-down Neural Attention by Excitation Backprop" (EBP), ECCV 2016 / IJCV 2018, as TorchRay's
``benchmark.pointing_game`` implements it:

* the point is the maximum of the class's map. When several pixels share the maximum (counted, ``tied``) the
  cell is the **expected hit** over a uniformly random choice among them, i.e. the fraction of the tied maxima
  that hit, a value in [0, 1]. TorchRay takes the first maximum in row-major order, which never matters on its
  float32 maps but does on ours: cached maps are float16, gradient maps are clipped at a percentile (every one
  of their maps has a plateau of maxima), and a binary map (the ground-truth row) is all maxima; the first one in
  row-major order is the topmost, a bias, not a tie rule. On maps with a single maximum both rules agree;
* a **constant** map (max == min) has no maximum point: it is scored a **miss**, never a hit (Quantus counts
  any maximum inside the GT, so a constant map "hits" whenever the GT is non-empty - a known pitfall; TorchRay's
  argmax would point at pixel (0, 0)), and counted (``constant``);
* hit iff some GT pixel (i, j) satisfies ``(i - y)^2 + (j - x)^2 < tau^2`` - **strict**, as TorchRay;
* ``tau = 15 px`` at 224 px input (:data:`TOLERANCE_224`), scaled with the scored maps:
  ``tau = 15 * s / 224`` with s their shorter side (:func:`tolerance_pixels`; 4.29 px at 64 px). *Stated
  deviation*: TorchRay upsamples every map to the image's native resolution and uses 15 *native* pixels (on a
  500 x 375 VOC image resized to 224 x 224 that is an ellipse of radii 6.7 and 9.0 px at 224 px, not a 15 px
  disc), so our VOC/COCO pointing accuracies are somewhat more lenient than TorchRay's table. We score at the
  benchmark's input size, which has no native size on the synthetic set;
* (image, class) pairs are **skipped** (not scored, counted in ``skipped_difficult``) when the class has boxes
  and all of them are PASCAL "difficult" (TorchRay skips these on VOC), and when the GT region is empty (counted
  in ``no_gt``; TorchRay never meets this case at native resolution). The difficult rule is tested first.

**Difficult subset.** EBP evaluates also on a "difficult" subset: (image, class) pairs whose class covers less
than 1/4 of the image while the image contains at least one other (distractor) class. TorchRay ships the EBP
flag files (``pointing_game_ebp_*_difficult.txt``), but they are under a non-commercial licence (CC-BY-NC) and
exist only for the original VOC07-test / COCO14-val image lists, so the flags are **recomputed** here from the
annotations: area = the union of the class's boxes (all boxes; the segmentation mask when the image has no box
of that class), compared with 1/4 of the image area of the returned image, and "other class" = any other
positive label of the image (not necessarily explained).

Per image the metric returns a dict (rows ``pointing/<key>``; the runner drops NaN cells):

* ``c<k>``: 1.0 hit / 0.0 miss (the expected hit in [0, 1] for tied maxima) for each scored true class k of the
  image, NaN otherwise;
* ``d<k>``: the same, only for pairs of the difficult subset, NaN otherwise;
* ``constant``, ``tied``: numbers of the scored classes whose map is constant / has a tied maximum;
* ``no_gt``, ``skipped_difficult``: numbers of true classes skipped for an empty GT / all-difficult boxes.

The counts are NaN for an image without any true class among its explained ones. The class accuracy
(hits / (hits + misses) per class, then the mean over classes, as TorchRay) is computed by the tables from the
stored ``c<k>`` / ``d<k>`` cells (:func:`maskbench.core.stats.class_mean`); classes without any scored
image are left out (TorchRay keeps them at 0 in its 20 / 80-class mean, which only matters on subsets missing a
class).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from maskbench.core.ranking import average_precision
from maskbench.core.render import csv_text
from maskbench.core.stats import class_mean
from maskbench.datasets.base import all_classes, box_stats, box_union_masks

from .base import (
    MetricInputs,
    TableInputs,
    TableSpec,
    metric_statistic,
    register_metric,
    register_table,
    true_class_slots,
)

TOLERANCE_224 = 15  # pointing-game tolerance in pixels at 224 px (EBP, TorchRay)
DIFFICULT_AREA = 0.25  # EBP difficult subset: the class covers less than this fraction of the image
_CHUNK = 1 << 22  # elements per chunk of the M_I sort


def tolerance_pixels(h: int) -> float:
    """Pointing-game tolerance in pixels for maps whose (shorter) side is ``h``: ``15 * h / 224``."""
    return TOLERANCE_224 * h / 224


def all_boxes_difficult(batch, classes: Tensor | None = None) -> Tensor:
    """(B, C) bool (or (B, K) for ``classes``): the class has boxes and every one is flagged difficult."""
    classes = all_classes(batch) if classes is None else classes
    _, n_boxes, n_difficult = box_stats(batch, classes, 0, 0)
    return (n_boxes > 0) & (n_difficult == n_boxes)


def _gather_classes(x: Tensor, classes: Tensor) -> Tensor:
    """x (B, C, H, W) -> (B, K, H, W) at the given classes."""
    idx = classes.to(x.device)[:, :, None, None].expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def _seg_of(batch, classes: Tensor) -> Tensor:
    """(B, K, H, W) segmentation of the requested classes minus the ignore band (all False without ``has_seg``)."""
    seg = _gather_classes(batch.class_masks, classes).to(classes.device)
    return seg & ~batch.ignore.to(classes.device)[:, None]


def pointing_ground_truth(batch, classes: Tensor | None = None) -> Tensor:
    """(B, C, H, W) bool GT region of each (image, class): segmentation minus ignore if ``has_seg``, else boxes.

    With ``classes`` (B, K) long, only those classes: (B, K, H, W).
    """
    classes = all_classes(batch) if classes is None else classes
    h, w = batch.class_masks.shape[-2:]
    return _pointing_gt(batch, classes, box_stats(batch, classes, h, w)[0])


def _pointing_gt(batch, classes: Tensor, boxes: Tensor) -> Tensor:
    has_seg = batch.has_seg.to(classes.device)[:, None, None, None]
    return torch.where(has_seg, _seg_of(batch, classes), boxes)


def _per_image_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean over the valid entries of each row of (B, K) ``values``; NaN for a row without any."""
    total = torch.where(valid, values, torch.zeros_like(values)).sum(1)
    count = valid.sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


@register_metric("mi", higher_is_better=True, table="explainability", label="M_I", version="1",
                 valid_range=(0.0, 100.0))
@torch.no_grad()
def m_i(inputs: MetricInputs) -> Tensor:
    """M_I (DGMP eq. 9): average precision (%) of the map's pixel ranking against the class's boxes."""
    masks, classes, batch = inputs.masks, inputs.classes, inputs.batch
    classes = classes.to(masks.device)
    h, w = masks.shape[-2:]
    slots = true_class_slots(classes, batch.labels.to(masks.device))
    union = box_union_masks(batch, h, w, classes)
    valid = slots & union.flatten(2).any(2)
    ap = torch.zeros(valid.shape, dtype=torch.float64, device=masks.device)
    if valid.any():
        ap[valid] = 100 * average_precision(masks[valid].flatten(1), union[valid].flatten(1))
    return _per_image_mean(ap, valid).float()


def difficult_pairs(batch, classes: Tensor | None = None) -> Tensor:
    """(B, C) (or (B, K)) bool: the EBP "difficult" subset, recomputed (see the module docstring).

    The class is a positive label of the image, covers less than 1/4 of it (union of its boxes; its mask if it
    has no box) and the image has at least one other positive label.
    """
    classes = all_classes(batch) if classes is None else classes
    h, w = batch.class_masks.shape[-2:]
    union, n_boxes, _ = box_stats(batch, classes, h, w)
    return _difficult(batch, classes, union, n_boxes)


def _difficult(batch, classes: Tensor, union: Tensor, n_boxes: Tensor) -> Tensor:
    h, w = union.shape[-2:]
    area = torch.where((n_boxes > 0)[:, :, None, None], union, _seg_of(batch, classes)).flatten(2).sum(2)
    small = area.double() / (h * w) < DIFFICULT_AREA
    labels = batch.labels.to(classes.device) > 0
    positive = torch.gather(labels, 1, classes)
    others = labels.sum(1, keepdim=True) - positive.long()
    return positive & small & (others > 0)


def acceptance_disc(tolerance: float, device: torch.device | str | None = None) -> Tensor:
    """(2r+1, 2r+1) bool: the integer offsets (dy, dx) with dy^2 + dx^2 < tolerance^2 (strict, as TorchRay)."""
    bound = math.ceil(tolerance * tolerance)  # integer squared distance: d2 < tau^2  <=>  d2 < ceil(tau^2)
    r = max(0, math.isqrt(max(bound - 1, 0)))
    t = torch.arange(-r, r + 1, device=device)
    return (t[:, None] ** 2 + t[None, :] ** 2) < bound


def near_ground_truth(gt: Tensor, tolerance: float) -> Tensor:
    """(N, H, W) bool: pixels from which some GT pixel lies at distance < ``tolerance`` (a disc dilation)."""
    disc = acceptance_disc(tolerance, gt.device).float()
    r = (disc.shape[-1] - 1) // 2
    n, h, w = gt.shape
    out = torch.empty(n, h, w, dtype=torch.bool, device=gt.device)
    rows = max(1, _CHUNK // max(h * w * disc.numel() // 64, 1))
    for s in range(0, n, rows):  # exact: sums of at most (2r+1)^2 ones in float32
        x = gt[s : s + rows, None].float()
        out[s : s + rows] = torch.nn.functional.conv2d(x, disc[None, None], padding=r)[:, 0] > 0.5
    return out


def pointing_hits(masks: Tensor, gt: Tensor, tolerance: float) -> tuple[Tensor, Tensor, Tensor]:
    """Pointing game of maps (N, H, W) against GT regions (N, H, W) bool.

    Returns ``hit`` (N,) float in [0, 1]: 1 / 0 when the maximum is a single pixel (hit iff a GT pixel lies at
    Euclidean distance < ``tolerance``, strict), the fraction of the maxima that hit when several pixels tie
    (the expected hit of a uniformly random choice among them), 0 for a constant map; ``constant`` (N,) bool and
    ``tied`` (N,) bool (non-constant map whose maximum is attained at several pixels).
    """
    flat = masks.flatten(1)
    mx, mn = flat.amax(1), flat.amin(1)
    constant = mx == mn
    is_max = flat == mx[:, None]
    n_max = is_max.sum(1)
    tied = ~constant & (n_max > 1)
    near = near_ground_truth(gt.to(masks.device), tolerance).flatten(1)
    hit = (is_max & near).sum(1).float() / n_max.clamp_min(1).float()
    return torch.where(constant, torch.zeros_like(hit), hit), constant, tied


@register_metric("pointing", higher_is_better=True, table="pointing", label="Pointing", version="2",
                 valid_range=(0.0, math.inf),
                 diagnostics={"constant_maps": "pointing/constant", "tied_maxima": "pointing/tied",
                              "empty_ground_truth": "pointing/no_gt",
                              "skipped_all_difficult": "pointing/skipped_difficult"})
@torch.no_grad()
def pointing_game(inputs: MetricInputs) -> dict[str, Tensor]:
    """Pointing game (EBP / TorchRay): per true class 1 hit / 0 miss, all and difficult subset, plus counts."""
    masks, batch = inputs.masks, inputs.batch
    dev = masks.device
    classes = inputs.classes.to(dev)
    b, k, h, w = masks.shape
    slots = true_class_slots(classes, batch.labels.to(dev))
    if tuple(batch.class_masks.shape[-2:]) != (h, w):
        raise ValueError(f"Maps are {h}x{w} but the ground truth is {tuple(batch.class_masks.shape[-2:])}.")
    union, n_boxes, n_difficult = box_stats(batch, classes, h, w)
    gt = _pointing_gt(batch, classes, union)
    all_diff = (n_boxes > 0) & (n_difficult == n_boxes)
    has_gt = gt.flatten(2).any(2)
    scored = slots & ~all_diff & has_gt
    difficult = _difficult(batch, classes, union, n_boxes)

    hit = torch.zeros(b, k, device=dev)
    constant = torch.zeros(b, k, dtype=torch.bool, device=dev)
    tied = torch.zeros_like(constant)
    if scored.any():
        hit[scored], constant[scored], tied[scored] = pointing_hits(
            masks[scored], gt[scored], tolerance_pixels(min(h, w))
        )

    nan = torch.full((b, k), math.nan, device=dev)
    cell = torch.where(scored, hit, nan)
    cell_d = torch.where(scored & difficult, hit, nan)
    out: dict[str, Tensor] = {}
    rows = torch.arange(b, device=dev)
    for c in sorted(set(classes[slots].tolist())):
        match = slots & (classes == c)  # at most one slot per image
        col = match.float().argmax(1)
        present = match.any(1)
        out[f"c{c}"] = torch.where(present, cell[rows, col], nan[:, 0])
        out[f"d{c}"] = torch.where(present, cell_d[rows, col], nan[:, 0])
    any_slot = slots.any(1)
    for key, flags in (
        ("constant", scored & constant),
        ("tied", scored & tied),
        ("no_gt", slots & ~all_diff & ~has_gt),
        ("skipped_difficult", slots & all_diff),
    ):
        out[key] = torch.where(any_slot, flags.sum(1).float(), nan[:, 0])
    return out


def _pointing_tolerance(data_info: dict) -> str:
    """Caption text: the pointing-game tolerance at this run's image size (15 px at 224 px, scaled)."""
    size = data_info.get("image_size")
    if not size:
        return rf" A hit is within {TOLERANCE_224} px at 224 px, scaled with the image."
    return (rf" A hit is within $\tau = {tolerance_pixels(min(size)):.2f}$ px of the ground truth at "
            rf"{size[0]}$\times${size[1]} px ({TOLERANCE_224} px at 224 px, scaled).")


def pointing_per_class(inputs: TableInputs) -> pd.DataFrame:
    """Hits (expected hits for tied maxima), pairs and accuracy per method, class and subset (all / difficult)."""
    rows = inputs.rows
    sub = rows[rows["metric"].str.match(r"^pointing/[cd]\d+$")].dropna(subset=["value"])
    parts = sub["metric"].str.split("/", expand=True)[1]
    sub = sub.assign(subset=np.where(parts.str.startswith("c"), "all", "difficult"),
                     class_id=parts.str.slice(1).astype(int))
    g = sub.groupby(["method", "subset", "class_id"])["value"]
    # a tied maximum scores its expected hit, so hits are not whole numbers
    out = pd.DataFrame({"hits": g.sum(), "pairs": g.count(), "accuracy": 100.0 * g.mean()}).reset_index()
    out["class"] = [inputs.class_name(i) for i in out["class_id"]]
    order = {m: i for i, m in enumerate(inputs.order)}
    out = out.sort_values(["method", "subset", "class_id"],
                          key=lambda c: c.map(order) if c.name == "method" else c)
    return out[["method", "subset", "class_id", "class", "hits", "pairs", "accuracy"]].reset_index(drop=True)


register_table(TableSpec(
    "explainability", (metric_statistic("mi"),),
    r"Explainability $\mathcal{M}_I$ (eq.~9): average precision (\%) of the pixel ranking against "
    r"the union of the class's boxes, tied scores entering together.",
    r"Zhang et al.\ (DGMP), Table 2", order=30, headline=("mi", "M_I", r"$\mathcal{M}_I$: explainability"),
))
register_table(TableSpec(
    "pointing",
    (class_mean("pointing", "pointing/c", "All", True, "pointing game accuracy (%), mean over classes", 100.0),
     class_mean("pointing_difficult", "pointing/d", "Difficult", True, "the same on the difficult subset", 100.0)),
    r"Pointing game accuracy (\%, mean over classes), all pairs and the difficult subset "
    r"(boxes $<1/4$ of the image and a distractor class). A constant map is a miss.",
    r"Zhang et al.\ (2016) via TorchRay; Zhang et al.\ (DGMP), Table 3", order=40,
    headline=("pointing", "Pointing", "pointing game"), extra={"Const.": "constant_maps"},
    caption_note=_pointing_tolerance,
    files=lambda inputs: {"pointing_per_class.csv": csv_text(pointing_per_class(inputs))},
))
