"""A complete maskbench metric plugin: the energy-based pointing game of Score-CAM.

Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks", CVPR Workshops
2020, Sec. 4.2 ("localization evaluation"). Where the pointing game asks only whether a map's maximum falls on
the object, the energy-based version asks how much of the map's mass (its "energy") lies on it: the input is
binarised with the bounding box(es) of the target class, multiplied with the saliency map, and summed.

Definition
----------
For an image, a true class c and its saliency map L^c (H x W, values in [0, 1]), with B_c the union of the
class's bounding boxes rasterised on the map's grid:

    Proportion_c = 100 * sum_{(i, j) in B_c} L^c_ij / sum_{(i, j)} L^c_ij            (in %, 0-100)

Higher is better: 100 when all the map's energy is inside the boxes, 0 when none is, and 100 * |B_c| / (H W)
for a uniform (constant) map, its chance level. The per-image value is the mean of Proportion_c over the
image's true classes among its explained classes, each class scored once
(:func:`maskbench.metrics.true_class_slots`: the runner pads the explained classes by repeating the first one,
and classes absent from the image are not scored). The tables average it over images, with a 95% bootstrap
interval.

Box raster: the one every box metric of maskbench uses (:func:`maskbench.metrics.box_union_masks`): boxes are
``[x0, y0, x1, y1]`` in pixel-edge coordinates of the returned image, a box covers pixel (i, j) iff its centre
(j + 0.5, i + 0.5) lies in the closed box, and B_c is the union of **all** the class's boxes, PASCAL
"difficult" ones included. No pixel is excluded (the VOC ignore band is a segmentation notion).

Undefined values (NaN, never 0; the runner counts them, the tables report each mean's image count):

* a (image, class) pair is not scored when the class has no box on the image (empty B_c: a data set without
  boxes, or a box too thin to cover a pixel centre) or when the map's total energy is 0 (an all-zero map has
  no energy to distribute; counting it as 0 would rank "no answer" as "wrong answer");
* the image's value is NaN when none of its pairs is scored, in particular when the image has no true class
  among its explained classes.

Run it
------
    maskbench bench --plugin examples/energy_pointing.py --methods gradcam,rise,ground-truth,constant-0.5
    maskbench tables --plugin examples/energy_pointing.py      # rebuild its table from the stored rows
    maskbench metrics --plugin examples/energy_pointing.py     # listed with its origin

It writes ``energy_pointing.csv`` / ``.tex`` beside the other tables of the run and adds a column "Energy PG"
to the leaderboard. The computation is batched on the masks' device (CPU or CUDA), with no Python loop over
images and no device-to-host read of its own (``box_union_masks`` reads each image's few box coordinates
once to rasterise them, as M_I and the pointing game do); only the public names of :mod:`maskbench.metrics`
are used.
"""

import math

import torch

from maskbench.metrics import (
    MetricInputs,
    TableSpec,
    box_union_masks,
    register_metric,
    register_table,
    true_class_slots,
)


@register_metric("energy-pointing", higher_is_better=True, table="energy_pointing", label="Energy PG",
                 valid_range=(0.0, 100.0))
@torch.no_grad()
def energy_pointing(inputs: MetricInputs) -> torch.Tensor:
    """Energy-based pointing game (Score-CAM): % of each true class's map energy inside the class's boxes."""
    masks = inputs.masks.float()  # (B, K, H, W) in [0, 1]
    dev = masks.device
    classes = inputs.classes.to(dev)  # (B, K) the class of each map
    slots = true_class_slots(classes, inputs.batch.labels.to(dev))  # (B, K) each true class once
    boxes = box_union_masks(inputs.batch, *masks.shape[-2:], classes).to(dev).flatten(2)  # (B, K, H*W) bool
    energy = masks.flatten(2)
    total = energy.sum(2, dtype=torch.float64)
    inside = torch.where(boxes, energy, 0.0).sum(2, dtype=torch.float64)
    scored = slots & boxes.any(2) & (total > 0)  # NaN rules: no box, or no energy, or not a true class
    share = 100.0 * inside / torch.where(scored, total, 1.0)
    count = scored.sum(1)
    mean = torch.where(scored, share, 0.0).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, mean, math.nan).clamp(0.0, 100.0).float()  # (B,), NaN where undefined


register_table(TableSpec(
    "energy_pointing",
    caption=r"Energy-based pointing game: share (\%) of each true class's saliency energy (the sum of its map) "
            r"inside the union of the class's boxes, averaged over the image's true classes, then over images. "
            r"A constant map scores the boxes' share of the image.",
    paper="Wang et al. (2020), Score-CAM, Sec. 4.2",
    order=45,  # after the pointing game (40)
    headline=("energy-pointing", "Energy PG", "energy-based pointing game"),
))


if __name__ == "__main__":  # a quick self-check on a hand-made image: box, outside and uniform maps
    from types import SimpleNamespace

    h = w = 16  # one image of class 1 (of 2) with one box covering 8 x 8 pixels
    batch = SimpleNamespace(labels=torch.tensor([[0.0, 1.0]]), boxes=[torch.tensor([[2.0, 4.0, 10.0, 12.0]])],
                            box_labels=[torch.tensor([1])], box_difficult=[torch.tensor([False])])
    classes = torch.tensor([[1]])
    box = box_union_masks(batch, h, w, classes).float()
    for name, mask in (("box", box), ("outside", 1 - box), ("uniform", torch.full_like(box, 0.5))):
        value = energy_pointing(MetricInputs(torch.nn.Identity(), torch.zeros(1, 3, h, w), mask, classes, batch))
        print(f"{name:>8}: {float(value[0]):.2f}")  # 100.00, 0.00, 25.00 (64 of 256 pixels)
