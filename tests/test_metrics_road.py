"""ROAD (Rong et al., ICML 2022): noisy linear imputation against its definition and a direct sparse solve, the
removal orders, the seeded noise, and the metric's orientation on a model whose evidence is known."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from mb_testutils import make_batch
from torch import nn

import maskbench.metrics.road as road
from maskbench.core.errors import UnknownNameError
from maskbench.metrics.base import METRICS, MetricInputs, select_metrics
from maskbench.metrics.faithfulness import pixel_ranks, tie_seed

OFFSETS = [(-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6), (1, -1, 1 / 12),
           (1, 0, 1 / 6), (1, 1, 1 / 12)]


def direct_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The reference's system, built pixel by pixel and solved by ``spsolve``: for each removed pixel i,
    sum_j w_ij (x_i - x_j) = 0 over its existing 8 neighbours (1/6 direct, 1/12 diagonal)."""
    c, h, w = image.shape
    unknown = -np.ones((h, w), dtype=np.int64)
    idx = np.argwhere(removed)
    unknown[removed] = np.arange(len(idx))
    rows, cols, vals = [], [], []
    rhs = np.zeros((len(idx), c))
    for n, (i, j) in enumerate(idx):
        diag = 0.0
        for di, dj, wt in OFFSETS:
            a, b = i + di, j + dj
            if not (0 <= a < h and 0 <= b < w):
                continue
            diag += wt
            if removed[a, b]:
                rows.append(n)
                cols.append(unknown[a, b])
                vals.append(-wt)
            else:
                rhs[n] += wt * image[:, a, b]
        rows.append(n)
        cols.append(n)
        vals.append(diag)
    mat = sp.csr_matrix((vals, (rows, cols)), shape=(len(idx), len(idx)))
    out = image.copy()
    for ch in range(c):
        out[ch][removed] = spla.spsolve(mat, rhs[:, ch])
    return out


def test_single_interior_pixel_is_the_weighted_mean_of_its_neighbours():
    img = torch.rand(1, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    removed = torch.zeros(1, 7, 9, dtype=torch.bool)
    removed[0, 3, 4] = True
    out = road.linear_imputation(img, removed)
    expected = sum(wt * img[0, :, 3 + di, 4 + dj] for di, dj, wt in OFFSETS)  # the weights sum to 1
    torch.testing.assert_close(out[0, :, 3, 4], expected, atol=1e-6, rtol=0)
    keep = ~removed[0]
    assert torch.equal(out[0][:, keep], img[0][:, keep])  # kept pixels untouched


def test_corner_pixel_renormalises_over_the_neighbours_that_exist():
    img = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    removed = torch.zeros(1, 5, 5, dtype=torch.bool)
    removed[0, 0, 0] = True
    out = road.linear_imputation(img, removed)
    expected = (img[0, :, 0, 1] / 6 + img[0, :, 1, 0] / 6 + img[0, :, 1, 1] / 12) / (5 / 12)
    torch.testing.assert_close(out[0, :, 0, 0], expected, atol=1e-6, rtol=0)


def test_two_adjacent_removed_pixels_solve_the_coupled_equations():
    # on a constant-gradient image the linear system's solution is the image itself (harmonic in the interior)
    ii, jj = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    img = torch.stack([ii, jj, ii + 2 * jj])[None] / 10
    removed = torch.zeros(1, 8, 8, dtype=torch.bool)
    removed[0, 3, 3:5] = True
    out = road.linear_imputation(img, removed)
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size,fraction", [(24, 0.5), (32, 0.9), (17, 0.3)])
def test_matches_a_direct_sparse_solve_on_random_and_ranked_removals(size, fraction):
    g = torch.Generator().manual_seed(size)
    imgs = torch.rand(3, 3, size, size, generator=g)
    # one scattered removal, one compact blob (removed most relevant first, as MoRF does), one at the border
    scattered = torch.rand(size, size, generator=g) < fraction
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dist = ((ii - size / 2) ** 2 + (jj - size / 3) ** 2).float()
    blob = dist <= dist.flatten().kthvalue(max(1, int(fraction * size * size))).values
    border = (ii < int(fraction * size)) | (jj < 2)
    removed = torch.stack([scattered, blob, border])
    exact = np.stack([direct_imputation(imgs[n].double().numpy(), removed[n].numpy()) for n in range(3)])
    tight = road.linear_imputation(imgs, removed, rtol=1e-7)
    assert np.abs(tight.double().numpy() - exact).max() < 2e-5
    default = road.linear_imputation(imgs, removed)  # CG_RTOL: a tenth of the noise or better (docstring)
    assert np.abs(default.double().numpy() - exact).max() < 1e-3


def test_multigrid_cg_converges_in_few_iterations_where_jacobi_cg_needed_hundreds():
    # LeRF 90 % around a compact region: the farthest removed pixel is ~60 px from a kept one at 128 px, so plain
    # or Jacobi-preconditioned CG needs hundreds of iterations; a multigrid-preconditioned one a few tens at most
    size = 128
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dist = ((ii - size / 2) ** 2 + (jj - size / 3) ** 2).float().flatten()
    removed = torch.zeros(size * size, dtype=torch.bool)
    removed[dist.argsort(descending=True)[: int(0.9 * size * size)]] = True  # least relevant (far) first
    img = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    stats: list[road.LevelStats] = []
    road.linear_imputation(img, removed.view(1, size, size), stats=stats)
    assert [s.size for s in stats] == [(8, 8), (16, 16), (32, 32), (64, 64), (128, 128)]  # coarsest first
    assert int(stats[0].iterations.max()) == 0  # the coarsest grid is solved directly
    finest = stats[-1]
    assert 0 < int(finest.iterations.max()) <= 40 < finest.budget


def test_every_removed_pixel_refused():
    with pytest.raises(ValueError, match="every pixel removed"):
        road.linear_imputation(torch.rand(2, 3, 4, 4), torch.tensor([[[False] * 4] * 4, [[True] * 4] * 4]))


def test_removal_masks_count_and_order():
    h, w = 5, 8
    ranks = torch.randperm(h * w, generator=torch.Generator().manual_seed(2))[None]
    masks = road.removal_masks(ranks, h, w)
    assert masks.shape == (1, 2, 9, h, w)
    for s, f in enumerate(road.FRACTIONS):
        n = round(f * h * w)
        morf, lerf = masks[0, 0, s].flatten(), masks[0, 1, s].flatten()
        assert int(morf.sum()) == n and int(lerf.sum()) == n
        assert torch.equal(morf, ranks[0] < n)  # the n most relevant
        assert torch.equal(lerf, ranks[0] >= h * w - n)  # the n least relevant


def test_noise_only_on_removed_pixels_seeded_and_batch_independent():
    g = torch.Generator().manual_seed(3)
    imgs, maps = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g)
    both = road.road_images(imgs, maps, ["a", "b"], [1, 2])
    alone = road.road_images(imgs[1:], maps[1:], ["b"], [2])
    torch.testing.assert_close(both[1:], alone, atol=2e-5, rtol=0)
    clean = road.road_images(imgs, maps, ["a", "b"], [1, 2], noise_std=0.0)
    ranks = pixel_ranks(maps.flatten(1), [tie_seed("a", 1), tie_seed("b", 2)])
    removed = road.removal_masks(ranks, 16, 16)[:, :, :, None].expand_as(both)
    diff = both - clean
    assert torch.equal(diff[~removed], torch.zeros_like(diff[~removed]))  # kept pixels: the image, no noise
    std = float(diff[removed].std())
    assert abs(std - road.NOISE_STD) < 0.05 * road.NOISE_STD
    again = road.road_images(imgs, maps, ["a", "b"], [1, 2])
    assert torch.equal(again, both)
    other = road.road_images(imgs, maps, ["a", "b"], [1, 3])  # another class: another draw
    assert not torch.equal(other[1], both[1])


class RegionEvidence(nn.Module):
    """Class 0's logit is large while the region keeps its high-frequency pattern: logit = gain (mean over the
    region of |x - its 4-neighbour mean| - bias); linear imputation smooths removed pixels, so it erases exactly
    the evidence of the pixels it fills. Class 1 has logit 0."""

    def __init__(self, region, gain=20.0, bias=0.5):
        super().__init__()
        self.region, self.gain, self.bias = region, gain, bias

    def forward(self, x):
        lap = x - nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
        e = lap.abs().mean(1)
        score = self.gain * ((e * self.region).sum((1, 2)) / self.region.sum() - self.bias)
        return torch.stack([score, torch.zeros_like(score)], 1)


def _region_case():
    h = w = 32
    region = torch.zeros(h, w)
    region[4:20, 6:22] = 1
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    chk = ((ii + jj) % 2 * 2 - 1).float()
    image = (chk * (1 + 2 * region))[None, None].expand(1, 3, h, w).clone()
    return region, image


def test_morf_destroys_and_lerf_keeps_the_evidence_of_a_known_region():
    region, image = _region_case()
    model = RegionEvidence(region)
    good = region[None, None] + 0.01 * torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    maps = torch.cat([good, 1 - good], 1).expand(1, 2, 32, 32)  # slot 0: the region; slot 1: its complement
    images = image.expand(1, 3, 32, 32)
    batch = make_batch([[0]], torch.zeros(1, 2, 32, 32), images=images, num_classes=2)
    rows = {}
    for name, slot in (("region", 0), ("reverse", 1)):
        inputs = MetricInputs(model, images, maps[:, slot : slot + 1], torch.tensor([[0]]), batch)
        rows[name] = {n: METRICS.get(n).fn(inputs) for n in ("road_morf", "road_lerf")}
    cells = [road.cell_key(f) for f in road.FRACTIONS]
    morf = {k: np.array([float(v["road_morf"][c][0]) for c in cells]) for k, v in rows.items()}
    lerf = {k: np.array([float(v["road_lerf"][c][0]) for c in cells]) for k, v in rows.items()}
    share = float(region.mean())  # 0.25: the region holds a quarter of the pixels
    # the region's map removes the region first: by 30 % the evidence is gone; its LeRF keeps it until 70 %
    assert morf["region"][2:].max() < 5
    assert lerf["region"][: int(10 * (1 - share)) - 1].min() > 95
    # the reversed map is the mirror image
    assert morf["reverse"][: int(10 * (1 - share)) - 1].min() > 95
    assert lerf["reverse"][2:].max() < 5
    assert lerf["region"].mean() - morf["region"].mean() > 50
    assert lerf["reverse"].mean() - morf["reverse"].mean() < -50


def test_undefined_without_a_true_class_and_repeated_slots_scored_once():
    region, image = _region_case()
    model = RegionEvidence(region)
    images = image.expand(2, 3, 32, 32)
    maps = torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(5))
    batch = make_batch([[0], [1]], torch.zeros(2, 2, 32, 32), images=images, num_classes=2)
    batch.labels[1] = 0  # image 1 has no true class among its explained ones
    classes = torch.tensor([[0, 0], [0, 0]])  # image 0 explains class 0 twice (runner padding)
    out = road.road_morf(MetricInputs(model, images, maps, classes, batch))
    for cell in out.values():
        assert math.isnan(float(cell[1]))
        assert not math.isnan(float(cell[0]))
    result = road.road_scores(MetricInputs(model, images, maps, classes, batch))
    assert torch.isnan(result.curves[0, 1]).all()  # the repeated slot is not scored
    # image 0's value is its first slot's curve alone
    torch.testing.assert_close(100 * result.curves[0, 0, 0], result.per_image["morf"][0])


def test_road_is_optional_and_named_by_table_or_metric():
    default = select_metrics("synthetic")
    assert "road_morf" not in default and "road_lerf" not in default and "mf" in default
    assert {"road_morf", "road_lerf"} <= set(select_metrics("synthetic", ["road"]))
    assert set(select_metrics("synthetic", ["road_lerf"])) - set(default) == {"road_lerf"}
    with pytest.raises(UnknownNameError, match="Did you mean: road"):
        select_metrics("synthetic", ["raod"])


def test_gap_statistic_is_lerf_minus_morf():
    cols = [f"road_morf/{road.cell_key(f)}" for f in road.FRACTIONS] + [
        f"road_lerf/{road.cell_key(f)}" for f in road.FRACTIONS]
    means = np.array([[10.0] * 9 + [70.0] * 9, [float(v) for v in range(18)]])
    stat = road.ROAD_GAP
    assert stat.select(cols[::-1]) == cols and stat.select(cols[:-1]) == []  # needs all eighteen cells
    gap = stat.reduce(means, cols)
    np.testing.assert_allclose(gap, [60.0, np.mean(range(9, 18)) - np.mean(range(9))])
