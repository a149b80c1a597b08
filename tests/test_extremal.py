"""Extremal Perturbations building blocks on cases whose answers are known by construction."""

import pytest
import torch

from maskbench.methods.extremal import SmoothMaskGenerator, apply_pyramid, area_reference, blur_pyramid


def test_smooth_mask_of_constant_parameters_is_constant():
    gen = SmoothMaskGenerator(20, 24, step=2, sigma=4.0, device=torch.device("cpu"))
    ones, _ = gen(torch.ones(1, 1, *gen.grid_shape))
    zeros, full = gen(torch.zeros(1, 1, *gen.grid_shape))
    assert ones.shape == (1, 1, 20, 24)
    # the smooth max of many equal values sits just below the max (softmax-weighted mean), the same everywhere
    assert ones.min() > 0.98 and ones.max() - ones.min() < 1e-5
    assert zeros.abs().max() == 0
    assert full.shape[-2:] == (gen.grid_shape[0] * 2, gen.grid_shape[1] * 2)  # grid with margin


def test_single_cell_gives_a_bump_of_radius_about_sigma():
    step, sigma = 1, 3.0
    gen = SmoothMaskGenerator(32, 32, step=step, sigma=sigma, device=torch.device("cpu"))
    p = torch.zeros(1, 1, *gen.grid_shape)
    cy = cx = 16 + gen.margin  # the cell over image pixel (16, 16)
    p[0, 0, cy, cx] = 1
    mask, _ = gen(p)
    m = mask[0, 0].tolist()
    assert m[16][16] == pytest.approx(1.0, abs=1e-4)  # w(d) = 1 within sigma / 2 of the centre
    assert m[16][17] == pytest.approx(1.0, abs=1e-4)
    assert m[16][28] < 1e-3  # far outside
    assert (mask > 0.5).sum() > 9  # a disc, not a point
    for d in range(1, 7):  # symmetric around the cell centre
        assert m[16][16 - d] == pytest.approx(m[16][16 + d], abs=1e-5)
        assert m[16 - d][16] == pytest.approx(m[16][16 + d], abs=1e-5)


def test_area_reference_and_pyramid():
    ref = area_reference(100, 0.1, torch.device("cpu"))
    assert ref.sum() == 10 and ref[:90].sum() == 0
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pyr = blur_pyramid(img, levels=4, max_blur=3.0)
    torch.testing.assert_close(pyr[:, -1], img)  # the last level is the image itself
    owner = torch.tensor([1, 0])
    keep = apply_pyramid(pyr, owner, torch.ones(2, 1, 16, 16))
    torch.testing.assert_close(keep, img[owner])
    gone = apply_pyramid(pyr, owner, torch.zeros(2, 1, 16, 16))
    torch.testing.assert_close(gone, pyr[owner, 0])
    half = apply_pyramid(pyr, owner, torch.full((2, 1, 16, 16), 0.5))  # level 1.5: between levels 1 and 2
    torch.testing.assert_close(half, (pyr[owner, 1] + pyr[owner, 2]) / 2)
