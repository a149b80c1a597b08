"""Extremal Perturbations building blocks on cases whose answers are known by construction."""

import math

import pytest
import torch

from maskbench.methods.extremal import (
    SmoothMaskGenerator,
    _SmoothMaxPool,
    apply_pyramid,
    area_references,
    blur_pyramid,
)

CPU = torch.device("cpu")


def brute_force_mask(params, step, sigma, height, width):
    """The smooth mask straight from its definition, one pixel at a time (TorchRay's geometry: parameter
    (i, j) at pixel (step i, step j), neighbours within r = 1 + ceil(sigma / step) cells of the pixel's cell)."""
    r = 1 + math.ceil(sigma / step)
    gh, gw = params.shape
    out = torch.zeros(height, width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            vals = []
            for i in range(y // step - r, y // step + r + 1):
                for j in range(x // step - r, x // step + r + 1):
                    p = float(params[i, j]) if 0 <= i < gh and 0 <= j < gw else 0.0
                    d = math.hypot(y - step * i, x - step * j)
                    vals.append(math.exp(-2 * max(d / sigma - 0.5, 0) ** 2) * p)
            v = torch.tensor(vals, dtype=torch.float64)
            out[y, x] = (v * torch.softmax(20 * v, 0)).sum()
    return out.clamp(0, 1)


@pytest.mark.parametrize("step,sigma,size", [(2, 6.0, (10, 12)), (3, 5.0, (9, 7))])
def test_pixel_generator_matches_the_definition(step, sigma, size):
    gen = SmoothMaskGenerator(*size, step=step, sigma=sigma, device=CPU)
    params = torch.rand(1, 1, *gen.grid_shape, generator=torch.Generator().manual_seed(0))
    mask = gen(params)
    assert mask.shape == (1, 1, *size)
    expected = brute_force_mask(params[0, 0], step, sigma, *size)
    torch.testing.assert_close(mask[0, 0].double(), expected, atol=1e-5, rtol=1e-5)


def test_margin_extends_the_same_mask_and_crop_recovers_it():
    params = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = SmoothMaskGenerator(16, 16, step=2, sigma=6.0, device=CPU)
    wide = SmoothMaskGenerator(16, 16, step=2, sigma=6.0, device=CPU, margin=6)
    full = wide(params)
    assert full.shape == (2, 1, 28, 28)
    torch.testing.assert_close(wide.crop(full), plain(params))
    assert full[..., 0, :].max() > 0  # the margin sees the parameters near the border


def test_cell_resolution_samples_the_same_mask_at_the_parameters():
    params = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    pixel = SmoothMaskGenerator(32, 32, step=2, sigma=6.0, device=CPU)(params)
    cell = SmoothMaskGenerator(32, 32, step=2, sigma=6.0, device=CPU, resolution="cell")(params)
    # identical at the parameter positions, interpolated in between
    torch.testing.assert_close(cell[..., ::2, ::2], pixel[..., ::2, ::2])
    assert (cell - pixel).abs().mean() < 0.02


def test_constant_parameters_and_a_single_bump():
    gen = SmoothMaskGenerator(20, 24, step=2, sigma=4.0, device=CPU)
    ones = gen(torch.ones(1, 1, *gen.grid_shape))
    assert ones.min() > 0.98 and ones.max() - ones.min() < 0.02  # a softmax-weighted mean just below 1
    assert gen(torch.zeros(1, 1, *gen.grid_shape)).abs().max() == 0
    gen = SmoothMaskGenerator(32, 32, step=1, sigma=3.0, device=CPU)
    p = torch.zeros(1, 1, *gen.grid_shape)
    p[0, 0, 16, 16] = 1
    m = gen(p)[0, 0]
    assert m[16, 16] == pytest.approx(1.0, abs=1e-4) and m[16, 17] == pytest.approx(1.0, abs=1e-4)  # w = 1 near
    assert m[16, 28] < 1e-3  # far outside
    for d in range(1, 7):  # symmetric
        assert m[16, 16 - d] == pytest.approx(float(m[16, 16 + d]), abs=1e-5)
        assert m[16 - d, 16] == pytest.approx(float(m[16, 16 + d]), abs=1e-5)


def test_smooth_max_pool_gradient():
    p = torch.rand(2, 1, 9, 10, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: _SmoothMaxPool.apply(x, w, 1, 20.0), (p,))


def test_area_reference_and_pyramid():
    ref = area_references(100, torch.tensor([0.1, 0.25]))
    assert ref.shape == (2, 100) and ref[0].sum() == 10 and ref[0, :90].sum() == 0 and ref[1].sum() == 25
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pyr = blur_pyramid(img, levels=4, max_blur=3.0)
    torch.testing.assert_close(pyr[:, -1], img)  # the last level is the image itself
    rows = pyr[torch.tensor([1, 0])]
    torch.testing.assert_close(apply_pyramid(rows, torch.ones(2, 1, 16, 16)), img[[1, 0]])
    torch.testing.assert_close(apply_pyramid(rows, torch.zeros(2, 1, 16, 16)), rows[:, 0])
    half = apply_pyramid(rows, torch.full((2, 1, 16, 16), 0.5))  # level 1.5: between levels 1 and 2
    torch.testing.assert_close(half, (rows[:, 1] + rows[:, 2]) / 2)


def test_the_area_is_chosen_on_the_smoothed_masks_that_are_returned():
    """NeurIPS 2022 pipeline: keep the first area whose preserved logit, with the mask TorchRay returns (smoothed),
    reaches the clean logit. The decision must hold for the returned maps, recomputed independently."""
    from mb_testutils import tiny_model

    from maskbench.methods import build_method

    model = tiny_model(4)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([[0, 1], [2, 3], [1, 2]])
    method = build_method("extremal-perturbation", preset="fast", areas=[0.05, 0.2, 0.4], max_iter=20,
                          smooth=0.2)
    maps, reached = method.area_masks(model, images, classes)
    scale = 32 / 224.0
    pyramid = blur_pyramid(images, method.levels, method.max_blur * scale)
    b, k, a = reached.shape
    with torch.no_grad():
        for i in range(b):
            for j in range(k):
                for n in range(a):
                    x = torch.cat([images[i : i + 1], apply_pyramid(pyramid[i : i + 1], maps[i, j, n][None, None])])
                    logit = model(x)[:, classes[i, j]]
                    assert bool(reached[i, j, n]) == bool(logit[1] >= logit[0]), (i, j, n)
    assert reached.any() and not reached.all()  # both decisions occur, so the check can fail
