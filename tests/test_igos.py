"""iGOS++ (methods/igos.py) on cases whose answers are known by construction."""

import math

import pytest
import torch
from mb_testutils import QuadrantNet, TwoRegionNet, quadrant, quadrant_scores, region_scores
from torch import nn

from maskbench.classifiers import freeze
from maskbench.core.images import gaussian_blur, scaled_sigma
from maskbench.methods.base import build_method
from maskbench.methods.igos import (
    armijo_line_search,
    bilateral_tv,
    bilateral_weights,
    line_search_steps,
    regulariser,
)

H = W = 32
SMALL = {"iterations": 3, "ig_iter": 2}  # a few evaluations: enough for the contract checks


class ConstantNet(nn.Module):
    """Logits that do not depend on the input (but still have a gradient graph through it)."""

    def forward(self, x):
        return x.flatten(1)[:, :3] * 0 + torch.tensor([1.0, -2.0, 0.5])


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def test_presets_and_registration():
    paper = build_method("igos++")
    assert (paper.size, paper.iterations, paper.ig_iter, paper.l1, paper.l2, paper.alpha) == (28, 15, 20, 1, 20, 1000)
    assert (paper.noise_std, paper.ls_decay, paper.ls_beta, paper.ls_min_step) == (0.2, 0.2, 1e-4, 1e-5)
    fast = build_method("igos++.fast")
    assert fast.iterations < paper.iterations and fast.ig_iter < paper.ig_iter
    assert fast.alpha == paper.alpha and fast.l1 == paper.l1 and fast.l2 == paper.l2  # only counts change
    assert fast.label == "iGOS++" and fast.family == "perturbation"


def test_shapes_range_determinism_and_batch_invariance():
    model = freeze(QuadrantNet())
    x = images()
    classes = torch.tensor([[0, 1], [1, 2], [2, 0]])
    method = build_method("igos++", preset="fast", **SMALL)
    out = method.explain(model, x, classes)
    assert out.shape == (3, 2, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    flat = out.flatten(2)
    assert (flat.amax(2) == 1).all() and (flat.amin(2) == 0).all()  # min-max normalised, not constant
    assert torch.equal(out, build_method("igos++", preset="fast", **SMALL).explain(model, x, classes))
    # a map does not depend on the batch (nor its position in it, nor the chunking)
    single = torch.cat([method.explain(model, x[i : i + 1], classes[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(single, out, atol=1e-5, rtol=1e-4)
    chunked = build_method("igos++", preset="fast", max_batch=1, **SMALL).explain(model, x[[2, 0]], classes[[2, 0]])
    torch.testing.assert_close(chunked, out[[2, 0]], atol=1e-5, rtol=1e-4)


class BrightnessNet(nn.Module):
    """Two linear classes that read only the mean brightness of ``region`` (all channels): class 0 ("bright")
    has logit +mean, class 1 ("dark") -mean."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region)

    def forward(self, x):
        v = (x * self.region).sum(dim=(1, 2, 3)) / (x.shape[1] * self.region.sum())
        return torch.stack([v, -v], 1)


def test_masks_stay_at_one_when_deletion_cannot_lower_the_score():
    """What iGOS++ does for a class whose score no deletion can lower: both masks start at 1, where the gradients
    of the L1 term (subgradient 0 at m = 1) and of the bilateral TV (a flat mask) vanish, so the direction is the
    path gradient alone. If deleting (lowering M) can only raise the class score and inserting can only lower it,
    that gradient is <= 0 in every mask cell; every step m - a g is clipped back to 1, so the masks never leave 1,
    whatever the noise, and the saliency 1 - m_c is exactly 0 everywhere: an all-zero map ("no evidence").

    Two such classes by construction: (1) logits that do not depend on the input (no path gradient at all);
    (2) the "dark" class of BrightnessNet on images whose region is a square at the images' maximum value (1):
    the blurred baseline b (a normalised non-negative kernel) is <= 1 there, so x - b >= 0 on the region: along
    the deletion path b + t M (x - b) its logit -mean_region(.) can only rise as M falls, along the insertion path
    x - t M (x - b) only fall. The "bright" class of the same images is the control: deleting the square lowers
    its score, so its masks do move, into the square."""
    out = build_method("igos++", preset="fast", **SMALL).explain(ConstantNet(), images(2), torch.tensor([[0], [2]]))
    assert torch.equal(out, torch.zeros(2, 1, H, W))

    region = torch.zeros(H, W)
    region[4:12, 4:12] = 1
    x = torch.full((3, 3, H, W), -1.0)  # a flat background, then two random ones in [-1, 0.5)
    x[1:] = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0)) * 1.5 - 1
    x[:, :, region.bool()] = 1.0
    method = build_method("igos++", preset="fast")
    # the premise, with the method's own baseline: deleting can only darken the region
    baseline = gaussian_blur(x, scaled_sigma(method.blur_sigma, H), method.blur_truncate, padding="reflect")
    diff = (x - baseline)[:, :, region.bool()]
    assert diff.min() >= 0 and diff.max() > 0.1
    classes = torch.tensor([[0, 1], [1, 0], [0, 1]])
    out = method.explain(freeze(BrightnessNet(region)), x, classes)
    assert torch.equal(out[classes == 1], torch.zeros(3, H, W))
    bright = out[classes == 0]
    _, inside, outside = region_scores(bright, region)
    assert region.flatten()[bright.flatten(1).argmax(1)].bool().all()  # each map peaks in the square
    assert (inside > outside + 0.4).all(), (inside, outside)


def test_each_class_gets_the_quadrant_its_evidence_lies_in():
    """TwoRegionNet: class 0's logit reads only the top-left quadrant, class 1's only the bottom-right one (equal
    weights: ratio 1). Each class's map must put its mass in its own quadrant, in either slot of the row and when
    the class is repeated; a method that explained one class for both would fail for the other. (gain 3: each
    class reads 4 channels weighted 0.5-1, logits of about 0.45; x 3 makes deleting a quadrant gain more than the
    L1 term costs, with the sigmoid far from saturation.)"""
    model = freeze(TwoRegionNet(H, gain=3.0, ratio=1.0))
    x = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([[0, 1], [1, 0], [0, 0]])
    out = build_method("igos++", preset="fast").explain(model, x, classes)
    for c, which in ((0, "top-left"), (1, "bottom-right")):
        share_top, inside, outside = region_scores(out[classes == c], quadrant(H, which))
        assert share_top.min() >= 0.9, (c, share_top)
        assert (inside > outside + 0.3).all(), (c, inside, outside)


def test_mass_lies_in_the_quadrant_the_model_reads():
    model = freeze(QuadrantNet())
    x = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([[0, 1], [1, 2], [2, 0]])
    method = build_method("igos++", preset="fast", iterations=3)
    masks = method.explain(model, x, classes)
    share_top, inside, outside = quadrant_scores(masks)
    assert share_top.min() >= 0.9
    assert (inside > outside + 0.3).all()
    # the seed drives the noise, and the noise is the only randomness
    other = build_method("igos++", preset="fast", iterations=3, seed=1).explain(model, x, classes)
    assert not torch.allclose(masks, other)
    quiet = [build_method("igos++", preset="fast", iterations=1, noise_std=0.0, seed=s).explain(model, x, classes)
             for s in (0, 1)]
    assert torch.equal(quiet[0], quiet[1])


def test_bilateral_tv_and_regulariser_by_hand():
    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 1, 0] = torch.tensor([0.1, 0.0, 0.0])
    x[0, :, 1, 1] = torch.tensor([0.1, 0.1, 0.0])
    wy, wx = bilateral_weights(x, sigma=0.01)  # exp(-(squared differences summed over channels) / 0.01)
    torch.testing.assert_close(wy, torch.tensor([[[[math.exp(-1), math.exp(-2)]]]]))
    torch.testing.assert_close(wx, torch.tensor([[[[1.0], [math.exp(-1)]]]]))
    m = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    # TV_y = TV_x = (1 + 0) / 2; BTV_y = (e^-1 * 1 + e^-2 * 0) / 2; BTV_x = (1 * 1 + e^-1 * 0) / 2
    expected = 0.5 * (0.5 + 0.5 + math.exp(-1) / 2 + 0.5)
    torch.testing.assert_close(bilateral_tv(m, m, wy, wx), torch.tensor([expected]))
    # upsampling a 2 x 2 mask to the 2 x 2 image is the identity; L1 term mean|1 - m| = 1/4
    torch.testing.assert_close(regulariser(m, wy, wx, l1=1.0, l2=20.0), torch.tensor([0.25 + 20 * expected]))
    torch.testing.assert_close(regulariser(torch.ones_like(m), wy, wx, 1.0, 20.0), torch.tensor([0.0]))
    torch.testing.assert_close(regulariser(torch.zeros_like(m), wy, wx, 3.0, 20.0), torch.tensor([3.0]))
    # an image with flat colour: the bilateral terms weigh every pair 1, i.e. equal plain TV of the upsampled mask
    lo = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    up = torch.nn.functional.interpolate(lo, size=(3, 3), mode="bilinear", align_corners=True)
    fy, fx = bilateral_weights(torch.zeros(1, 3, 3, 3), 0.01)
    tv_up = ((up[..., 1:, :] - up[..., :-1, :]) ** 2).mean() + ((up[..., :, 1:] - up[..., :, :-1]) ** 2).mean()
    torch.testing.assert_close(bilateral_tv(lo, up, fy, fx), 0.5 * (0.5 + 0.5 + tv_up).view(1))


def test_line_search_steps_match_the_reference_schedule():
    steps = line_search_steps(1000, 0.2, 1e-5)  # 1000, 200, ..., 2.048e-5: the reference's 12 checked steps
    assert len(steps) == 12 and steps[-1] == pytest.approx(2.048e-5)
    assert line_search_steps(1000, 0.2, 0.05) == pytest.approx([1000, 200, 40, 8, 1.6, 0.32, 0.064])
    assert line_search_steps(1e-6, 0.2, 1e-5) == []
    with pytest.raises(ValueError):
        line_search_steps(1000, 1.0, 1e-5)


def test_armijo_line_search_per_row():
    """f(m) = sum (m - 1/2)^2 per row. Row 0 (m = 3/4, g = grad f = 1/2): steps 4 and 2 overshoot to 0 (clipped),
    step 1 lands on 1/4 where f equals f(m), so it fails the sufficient decrease, step 1/2 reaches the minimum.
    Row 1 is at the minimum (g = 0): the first step passes. Row 2 is given an ascent direction: nothing passes."""
    m = torch.tensor([0.75, 0.5, 0.75]).view(3, 1).expand(3, 4).contiguous()
    g = torch.tensor([0.5, 0.0, -0.5]).view(3, 1).expand(3, 4).contiguous()
    calls = []

    def objective(masks):
        calls.append(1)
        return ((masks[0] - 0.5) ** 2).sum(1)

    f0 = objective([m])
    steps = [4.0, 2.0, 1.0, 0.5, 0.25]
    chosen = armijo_line_search(objective, [m], [g], f0, steps, beta=1e-4)
    assert chosen.tolist() == [0.5, 4.0, 0.0]
    assert len(calls) == 1 + len(steps)  # every step is evaluated for every row: no early exit, no host sync
    # without the sufficient-decrease term, step 1 (f unchanged) passes
    assert armijo_line_search(objective, [m], [g], f0, steps, beta=0.0, fallback=0.125).tolist() == [1.0, 4.0, 0.125]
