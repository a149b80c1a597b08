"""Every non-learned method on a classifier whose answer is known by construction: it only looks at the
top-left quadrant, so every attribution must put its mass there: the top 10 % of each map's pixels lie in the
quadrant (a quarter of the image) and the map is higher inside than outside on average."""

import pytest
import torch
from mb_testutils import QuadrantNet, quadrant_scores

from maskbench.classifiers import freeze
from maskbench.methods import METHODS, build_method

H = W = 32
C = 3
REFERENCE = {"constant-0", "constant-0.5", "constant-1", "ground-truth", "centre-gaussian", "random-uniform"}


@pytest.mark.parametrize("name", [n for n in METHODS.list(exclude="test-*")
                                  if n not in REFERENCE and METHODS.get(n).family != "learned"])
def test_mass_lies_in_the_quadrant_the_model_reads(name):
    model = freeze(QuadrantNet())
    images = torch.randn(4, 3, H, W, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    # RISE reads logits here: with these large logits a sigmoid would saturate and drown its Monte Carlo signal.
    # EP: every class of QuadrantNet reads the same features, so the contrastive reward (own logit minus the best
    # other) has no spatial signal and the simple reward is used; the model is not flip invariant, so no flip
    # jitter; and EP's area weight (lambda = 300, growing) is set for ImageNet classifiers whose logits fall by
    # tens when the object is blurred, while QuadrantNet's fall by about 3: EP explains a copy with logits x 30.
    overrides = {"rise": {"num_masks": 2000, "score": "logit"},
                 "extremal-perturbation": {"reward": "simple", "jitter": False}}.get(name, {})
    model.gain = {"extremal-perturbation": 30.0}.get(name, 1.0)
    masks = build_method(name, preset="fast", **overrides).explain(model, images, classes)
    share_top, inside, outside = quadrant_scores(masks)
    assert share_top.min() >= 0.9, (name, share_top)
    assert (inside > outside).all(), name


def test_ground_truth_is_the_segmentation_or_where_there_is_none_the_union_of_the_boxes():
    from maskbench.core.errors import MethodError
    from maskbench.datasets import collate
    from maskbench.datasets.base import Sample

    seg = torch.zeros(3, 8, 8, dtype=torch.bool)
    seg[1, 2:4, 2:6] = True
    with_seg = Sample(torch.zeros(3, 8, 8), torch.tensor([0.0, 1, 0]), "a", class_masks=seg,
                      boxes=torch.tensor([[0.0, 0, 8, 8]]), box_labels=torch.tensor([1]),
                      box_difficult=torch.zeros(1, dtype=torch.bool))
    # boxes only (ImageNet): class 2 has two boxes, pixel-edge coordinates; class 0 has none
    boxes_only = Sample(torch.zeros(3, 8, 8), torch.tensor([0.0, 0, 1]), "b",
                        boxes=torch.tensor([[0.0, 0, 2, 2], [6.0, 5, 8, 8]]), box_labels=torch.tensor([2, 2]),
                        box_difficult=torch.zeros(2, dtype=torch.bool))
    batch = collate([with_seg, boxes_only])
    classes = torch.tensor([[1, 0], [2, 0]])
    out = build_method("ground-truth").explain(None, batch.images, classes, batch=batch)
    assert torch.equal(out[0, 0], seg[1].float())  # the segmentation, not the (whole-image) box
    assert out[0, 1].sum() == 0
    expected = torch.zeros(8, 8)
    expected[0:2, 0:2] = 1
    expected[5:8, 6:8] = 1
    assert torch.equal(out[1, 0], expected) and out[1, 1].sum() == 0
    nothing = collate([Sample(torch.zeros(3, 8, 8), torch.tensor([1.0, 0, 0]), "c")])
    with pytest.raises(MethodError, match="no segmentation and no boxes for image.*'c'"):
        build_method("ground-truth").explain(None, nothing.images, torch.tensor([[0]]), batch=nothing)
