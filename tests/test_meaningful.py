"""Meaningful Perturbation (Fong & Vedaldi, ICCV 2017) on cases whose answers are known by construction."""

import pytest
import torch
import torch.nn.functional as F
from mb_testutils import QuadrantNet, quadrant_scores
from torch import nn

from maskbench.classifiers import freeze
from maskbench.core.images import gaussian_blur
from maskbench.methods import build_method
from maskbench.methods.meaningful import MeaningfulPerturbation, disc_masks, mask_grid, shift_rows, tv_norm

H = W = 32
FEW = {"max_iter": 15, "lr": 0.25}  # enough for the properties below, cheap enough for a unit test


class CentreMean(nn.Module):
    """One logit: the mean of the image over a centred 8 x 8 square (nothing else matters)."""

    def forward(self, x):
        c = x.shape[-1] // 2
        return x[:, :, c - 4 : c + 4, c - 4 : c + 4].mean(dim=(1, 2, 3))[:, None]


def images(n, size=H, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_tv_norm_by_hand():
    m = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    # vertical differences 0.5 and -0.5, horizontal 1 and 0: beta = 3 -> 0.125 + 0.125 + 1; beta = 2 -> 0.25 + 0.25 + 1
    assert tv_norm(m, 3.0).item() == pytest.approx(1.25)
    assert tv_norm(m, 2.0).item() == pytest.approx(1.5)
    assert tv_norm(torch.full((1, 1, 5, 5), 0.3), 3.0).item() == 0  # constant: no variation
    batch = torch.stack([m, 2 * m])[:, None]  # (2, 1, 2, 2): one value per row, beta-homogeneous
    assert tv_norm(batch, 3.0).flatten().tolist() == pytest.approx([1.25, 8 * 1.25])


def test_regularizer_is_the_paper_sum_on_28x28_and_rescaled_on_coarser_grids():
    mp = MeaningfulPerturbation()
    assert mask_grid(224, 224, 28) == (28, 28) and mask_grid(64, 64, 28) == (8, 8) and mask_grid(32, 48, 28) == (4, 6)
    m = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = 1e-4 * (1 - m).sum(dim=(1, 2, 3)) + 1e-2 * tv_norm(m, 3.0).flatten()
    torch.testing.assert_close(mp.regularizer(m), expected)
    # 8 x 8 cells: L1 x 784/64, TV x 784/64 * (8/28)^3, so deleting everything costs the same as on 28 x 28
    m8 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    l1, tv = 784 / 64, 784 / 64 * (8 / 28) ** 3
    expected8 = 1e-4 * l1 * (1 - m8).sum(dim=(1, 2, 3)) + 1e-2 * tv * tv_norm(m8, 3.0).flatten()
    torch.testing.assert_close(mp.regularizer(m8), expected8)
    zeros28, zeros8 = torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 8, 8)
    torch.testing.assert_close(mp.regularizer(zeros8), mp.regularizer(zeros28))
    assert mp.regularizer(zeros28).item() == pytest.approx(784e-4)


def test_upsampling_matrices_equal_interpolate_then_blur():
    mp = MeaningfulPerturbation()
    m = torch.rand(3, 1, 8, 6, generator=torch.Generator().manual_seed(0))
    direct = gaussian_blur(F.interpolate(m, size=(64, 48), mode="bilinear", align_corners=False), 5.0 * 64 / 224,
                           padding="replicate")
    torch.testing.assert_close(mp.upsample(m, (64, 48)), direct, atol=1e-6, rtol=1e-5)
    ones = mp.upsample(torch.ones(1, 1, 8, 8), (64, 64))  # a kept image stays kept everywhere, borders included
    torch.testing.assert_close(ones, torch.ones_like(ones))


def test_shift_rows_crops_each_row_at_its_own_offset():
    x = torch.randn(3, 2, 7, 9, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([[0, 0], [2, 1], [1, 3]])
    out = shift_rows(x, offsets, (5, 6))
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], x[i, :, dy : dy + 5, dx : dx + 6])


def test_disc_masks_and_circle_initialisation():
    keep = disc_masks(H, W, torch.tensor([0.0, 6.0, 100.0]), sigma=1.0)
    assert keep.shape == (3, 1, H, W)
    assert keep[0].min() > 0.8  # radius 0: a single blurred pixel is deleted
    assert keep[1, 0, H // 2, W // 2] < 0.01 and keep[1, 0, 0, 0] > 0.99  # centre deleted, corner kept
    assert keep[2].max() < 0.01  # covers the whole image
    mp = MeaningfulPerturbation(score="logit")
    x = torch.zeros(2, 3, H, W)
    x[0, :, 12:20, 12:20] = 1  # a bright centre square: blurring it lowers the score
    alt = gaussian_blur(x, 10.0 * H / 224)
    init = mp._circle_init(CentreMean(), x, alt, torch.zeros(2, dtype=torch.long), mask_grid(H, W, 28))
    assert init.shape == (2, 1, 4, 4)
    # image 0: the smallest disc hiding the centre square: deleted in the middle cells, kept in the corners
    assert init[0, 0, 1:3, 1:3].max() < 0.5 and init[0, 0, [0, 0, 3, 3], [0, 3, 0, 3]].min() > 0.9
    # image 1 (all zeros): no deletion changes the score, so the search keeps radius 0: (almost) everything kept
    assert init[1].min() > 0.9


def test_mass_lies_in_the_quadrant_the_model_reads():
    model = freeze(QuadrantNet())
    x = images(4)
    classes = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    masks = build_method("meaningful-perturbation", preset="fast").explain(model, x, classes)
    share_top, inside, outside = quadrant_scores(masks)
    assert share_top.min() >= 0.9
    assert (inside > outside + 0.3).all()


def test_shapes_range_and_determinism():
    model = freeze(QuadrantNet(64, classes=6))
    x = images(2, size=64)  # 64 px: jitter of 0-1 px is active
    classes = torch.tensor([[0, 3], [5, 5]])
    out = MeaningfulPerturbation(**FEW).explain(model, x, classes)
    assert out.shape == (2, 2, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, MeaningfulPerturbation(**FEW).explain(model, x, classes))  # fixed seed
    assert not torch.equal(out, MeaningfulPerturbation(**FEW, seed=1).explain(model, x, classes))  # jitter seeded
    torch.testing.assert_close(out[1, 0], out[1, 1])  # the same class twice: the same map
    for over in ({"perturbation": "dgmp"}, {"mask_noise": 0.1}):
        a = MeaningfulPerturbation(**FEW, **over).explain(model, x, classes)
        assert torch.equal(a, MeaningfulPerturbation(**FEW, **over).explain(model, x, classes))
        assert not torch.allclose(a, out)
    assert not model.training and all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("over", [{}, {"perturbation": "dgmp", "mask_noise": 0.05}])
def test_batched_equals_one_at_a_time_and_rows_are_independent(over):
    model = freeze(QuadrantNet(64, classes=6))
    x = images(3, size=64)
    classes = torch.tensor([[0, 1], [2, 3], [4, 0]])
    together = MeaningfulPerturbation(**FEW, **over).explain(model, x, classes)
    single = torch.cat([MeaningfulPerturbation(**FEW, **over).explain(model, x[i : i + 1], classes[i : i + 1])
                        for i in range(3)])
    torch.testing.assert_close(together, single, atol=1e-5, rtol=1e-4)
    chunked = MeaningfulPerturbation(**FEW, **over, max_batch=4).explain(model, x, classes)  # chunks split image 1
    torch.testing.assert_close(together, chunked, atol=1e-5, rtol=1e-4)
    # another image and class in the other rows change nothing in row (0, 0)
    other = MeaningfulPerturbation(**FEW, **over).explain(model, torch.cat([x[:1], images(1, 64, seed=9)]),
                                                          torch.tensor([[0, 5], [1, 2]]))
    torch.testing.assert_close(other[0, 0], together[0, 0], atol=1e-5, rtol=1e-4)


def test_ones_init_and_a_model_blur_cannot_fool_gives_a_constant_map():
    # CentreMean of a constant image: blurring (zero padding far from the centre) changes nothing at the centre,
    # so no deletion lowers the score and the mask stays 1 everywhere: a constant map (all zeros after normalising)
    x = torch.full((1, 3, H, W), 0.7)
    out = MeaningfulPerturbation(**FEW, init="ones", score="logit").explain(CentreMean(), x, torch.zeros(1, 1).long())
    assert torch.equal(out, torch.zeros_like(out))


def test_invalid_options():
    with pytest.raises(ValueError, match="perturbation"):
        MeaningfulPerturbation(perturbation="noise").explain(CentreMean(), images(1), torch.zeros(1, 1).long())
    with pytest.raises(ValueError, match="score"):
        MeaningfulPerturbation(score="prob").explain(CentreMean(), images(1), torch.zeros(1, 1).long())
