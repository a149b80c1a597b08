"""ROAD, RemOve And Debias: class probability after removing ranked pixels and imputing them (``road_morf``,
``road_lerf``; table "road").

Rong, Leemann, Borisov, G. Kasneci & E. Kasneci, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods", ICML 2022 (PMLR 162:18770-18795; arXiv:2202.00449), and its reference code (tleemann/road_evaluation:
``road/imputations.py`` ``NoisyLinearImputer``, ``road/imputed_dataset.py`` ``ImputedDataset``,
``road/road.py`` ``run_road``). ROAD removes the pixels an attribution map ranks most (MoRF) or least (LeRF)
relevant and, instead of a fixed colour whose *shape* leaks the class to the classifier, fills them by *noisy
linear imputation*, so that no retraining is needed (the paper's debiasing argument); the classifier is then
evaluated on the imputed image at each removal fraction.

Per scored map
--------------
Each true class of an image (:func:`~maskbench.metrics.base.true_class_slots`, each class once, as
:mod:`~maskbench.metrics.faithfulness` scores it) is scored with its own map. Pixels are ranked by the map with
faithfulness's :func:`~maskbench.metrics.faithfulness.pixel_ranks`: decreasing score, ties ordered by the random
permutation seeded by :func:`~maskbench.metrics.faithfulness.tie_seed` (image id, class), so the same map gets
the same order in every run and batch. For each fraction p in ``FRACTIONS`` = 0.1, 0.2, ..., 0.9 (the paper's
10 %, ..., 90 %), n = round(p H W) pixels are removed:

* **MoRF**: the n first-ranked pixels (most relevant first);
* **LeRF**: the n last-ranked pixels (least relevant first).

**Noisy linear imputation** (``NoisyLinearImputer``). Each removed pixel i takes the weighted mean of its 8
neighbours j, weight 1/6 for the 4 direct and 1/12 for the 4 diagonal neighbours (``W_DIRECT``,
``W_DIAGONAL``); at the image border only the neighbours that exist count, i.e. for every removed i

    sum_{j in N(i)} w_ij (x_i - x_j) = 0,

with the removed neighbours unknown and the kept ones on the right-hand side: the linear system
``(D - W_UU) x_U = W_UK x_K``, D = diag(sum_{j in N(i)} w_ij), solved for all removed pixels jointly and for
each channel (the reference builds exactly this matrix and solves it with ``scipy.sparse.linalg.spsolve``).
Then Gaussian noise of standard deviation ``NOISE_STD`` = 0.01 is added to the imputed pixels only (kept
pixels are untouched), in the classifier's normalised input space. The noise is drawn on the CPU from a
generator seeded by the image id and class (:func:`noise_seed`, distinct from the tie-breaking seed), one draw
of shape (2, 9, 3, H, W) per scored map, so problem (order, fraction) of an (image, class) gets the same noise
whatever the batch.

**The solver** (:func:`linear_imputation`), batched on the model's device, no scipy, no per-iteration host
synchronisation. Since at most 90 % of the pixels are removed, every connected set of removed pixels has a kept
neighbour, and the matrix is symmetric, weakly diagonally dominant, strictly so in some row of every connected
block, hence symmetric positive definite: conjugate gradients apply. The operator is a 3x3 convolution with the
weight stencil (zero centre, zero padding, so the border rows sum only existing neighbours) masked to the
removed pixels, ``A p = u * (d * p - conv(p))`` with u the removed mask and d = conv(1) the degree; every
(image, class, order, fraction) problem and its 3 channels are solved at once (one independent CG per problem
and channel).

* *Grids.* A hierarchy of grids halves each side (ceil at odd sides); a coarse pixel is unknown when all the
  existing pixels of its 2x2 block are removed, so it is kept when any of them is, and every coarse grid keeps
  a pixel too. The coarsest grid (at most ``COARSEST_PIXELS`` = 64 pixels: 8x8 from 128 px, 7x7 from 224 px)
  is solved directly, by a float64 Cholesky factorisation of its system per problem (kept pixels' rows are
  the identity).
* *Preconditioner: a multigrid V(1, 1)-cycle* (Briggs, Henson & McCormick, "A Multigrid Tutorial", 2000, ch. 3
  and 10): one damped-Jacobi sweep (``OMEGA`` = 0.8, below 2 / the largest eigenvalue of D^-1 A, which
  Gershgorin bounds by 2) before and after the coarse correction, bilinear prolongation (weights 1/4, 3/4 per
  axis) masked to the unknowns, restriction its transpose, the coarse matrix the same stencil on the coarse
  grid (equal to the Galerkin product P^T A P for smooth errors, since this stencil's weights sum to 1 at every
  scale), the coarsest solve exact. The cycle is a fixed symmetric positive definite linear map, so it is a
  valid CG preconditioner; the CG step uses the Polak-Ribiere beta (clipped at 0), which tolerates the float
  rounding of the cycle.
* *Cascadic start.* The problem is first solved on the next coarser grid, kept coarse pixels taking the mean of
  their kept pixels, recursively down to the coarsest (solved directly); each level's solution is upsampled
  bilinearly (x2, cropped) as the start of the next finer level's removed pixels.
* *Stopping.* A (problem, channel) stops when its Jacobi-weighted residual norm falls below ``CG_RTOL`` = 1e-5
  times that of its right-hand side, r^T D^-1 r <= CG_RTOL^2 b^T D^-1 b (plus an absolute floor ``CG_ATOL`` =
  1e-8 per pixel for a zero right-hand side); from then on it is frozen (step 0), so its result does not depend
  on the other problems of the batch. The batch's convergence is checked every ``CG_CHECK_EVERY`` = 2
  iterations (one host synchronisation per check); at a check, when at most half of the problems still run,
  the converged ones are dropped from the working set. Each level has a safety cap of ``2 * max(h, w) + 64``
  iterations (:func:`level_budget`).
* *Accuracy and cost* (``tests/test_metrics_road.py`` compares with ``spsolve`` and bounds the iterations):
  at CG_RTOL = 1e-5 the largest error against the direct solve was 1e-4 at 64 px, 3e-4 at 128 px and 7e-4 at
  224 px (below the noise's 0.01), with removals of 50 % and 90 % ranked by distance to a compact region. The
  finest level then took 8-16 iterations (MoRF and LeRF 90 % at 224 px: 16 and 14), each coarser level fewer;
  the Jacobi-preconditioned CG this replaced needed about as many iterations as the largest distance from a
  removed pixel to a kept one (LeRF 90 %: 400-520 at 224 px).

Values
------
q = the classifier's class probability (:func:`~maskbench.core.scores.class_probabilities`: sigmoid for the
multi-label classifiers, softmax for a single-label one), as faithfulness reads it. Per image, each cell is the
mean over its true classes of 100 q at one fraction: ``road_morf/p10`` ... ``road_morf/p90`` (lower is better:
removing the most relevant pixels first should destroy the evidence soonest) and ``road_lerf/p10`` ...
``road_lerf/p90`` (higher is better: removing the least relevant first should keep it), so the stored cells are
the two curves. The table's ROAD MoRF / ROAD LeRF are the mean over the nine fractions of the mean over images,
which equals the mean over images of each image's mean over fractions (every cell of an image is defined or
undefined together), with the same bootstrap intervals; LeRF - MoRF (higher is better) is the headline. An
image with no true class among its explained ones is undefined (NaN, never 0).

Deviations from the paper and its code
--------------------------------------
* *Score*: the paper reports the classifier's accuracy on the imputed test set (``road_eval`` also averages a
  probability, of class 0 when ``run_road`` passes no predictions); here each true class's probability is
  averaged (multi-label classifiers have no top-1 accuracy; faithfulness reads q the same way).
* *Noise scale*: the reference experiments impute in [0, 1] pixel space and normalise afterwards
  (``Normalize(0.5, 0.5)`` on CIFAR-10: noise 0.02 in the model's input); pytorch-grad-cam's ROAD adds 0.01 to
  the normalised tensor, as done here (``MetricInputs`` carries no normalisation; with ImageNet statistics,
  0.01 normalised is about 0.0023 in pixel units). The imputed values themselves do not depend on this choice:
  the weighted mean commutes with the per-channel affine normalisation.
* *Counts*: the reference removes int(p H W) pixels for MoRF and, for LeRF, keeps the int(p H W) first-ranked
  (so its LeRF at p removes 1 - p); here both orders remove round(p H W) pixels and p is always the removed
  fraction. On the symmetric grid 0.1..0.9 the nine LeRF images are the same up to rounding.
* *Ties*: the reference adds 1e-4 N(0, 1) to the min-max rescaled map, one draw shared by all images; here tied
  pixels are ordered by the seeded permutation of :func:`~maskbench.metrics.faithfulness.pixel_ranks` (an
  infinitesimal random perturbation), and the noise is seeded per (image, class), so results are reproducible.
* *Solver*: preconditioned CG to a relative tolerance instead of a sparse direct solve (errors above).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from maskbench.core.scores import class_probabilities
from maskbench.core.stats import Statistic, nanmean_rows

from .base import (
    MetricInputs,
    TableSpec,
    forward_in_chunks,
    memo_on_inputs,
    register_metric,
    register_table,
    true_class_slots,
)
from .faithfulness import pixel_ranks, tie_seed

FRACTIONS = tuple(k / 10 for k in range(1, 10))  # removed fractions 10 %, ..., 90 %
ORDERS = ("morf", "lerf")  # most relevant first, least relevant first
NOISE_STD = 0.01  # std of the imputation noise, normalised input units
W_DIRECT = 1.0 / 6.0  # weight of each of the 4 direct neighbours
W_DIAGONAL = 1.0 / 12.0  # weight of each of the 4 diagonal neighbours
CG_RTOL = 1e-5  # relative residual (Jacobi norm) at which a (problem, channel) stops
CG_ATOL = 1e-8  # absolute floor of that residual, RMS per removed pixel (for a zero right-hand side)
CG_CHECK_EVERY = 2  # iterations between convergence checks (one host synchronisation each)
COARSEST_PIXELS = 64  # the coarsest grid (at most this many pixels) is solved directly
OMEGA = 0.8  # damping of the Jacobi smoother (below 2 / the largest eigenvalue of D^-1 A, which is < 2)
CHUNK_BYTES = 256 * 2**20  # temporaries per chunk of imputation problems
# per problem pixel: ~9 float32 (3, H, W) arrays of the solve (image, iterate, residual, direction, its image,
# convolution output, noise, ...), the masks, and a third more for the coarser levels
_BYTES_PER_PROBLEM_PIXEL = 160
_CACHE_ATTR = "_maskbench_road_cache"


def cell_key(fraction: float) -> str:
    """Stored cell key of a removal fraction: 0.1 -> ``p10``."""
    return f"p{round(100 * fraction)}"


# ----------------------------------------------------------------------------------------------------------------
# noisy linear imputation


def neighbour_weights(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """(1, 1, 3, 3) stencil of the imputation: 1/6 for direct, 1/12 for diagonal neighbours, 0 at the centre."""
    d, g = W_DIRECT, W_DIAGONAL
    return torch.tensor([[g, d, g], [d, 0.0, d], [g, d, g]], dtype=dtype, device=device).view(1, 1, 3, 3)


def _neighbour_sum(x: Tensor, kernel: Tensor) -> Tensor:
    """sum_j w_ij x_j over the existing neighbours of every pixel (zero padding), per channel: (N, C, H, W)."""
    n, c, h, w = x.shape
    return F.conv2d(x.reshape(n * c, 1, h, w), kernel, padding=1).view(n, c, h, w)


def level_budget(h: int, w: int) -> int:
    """CG iterations allowed on an h x w level: a safety cap (multigrid-preconditioned CG needs a few tens)."""
    return 2 * max(h, w) + 64


@dataclass
class LevelStats:
    """One level of one :func:`linear_imputation` call: its size, iteration budget, and per problem the number
    of CG iterations in which at least one of its channels was still running (a (N,) long tensor; 0 on the
    coarsest level, which is solved directly)."""

    size: tuple[int, int]
    budget: int
    iterations: Tensor


@dataclass
class _Level:
    """One grid of the multigrid hierarchy: ``u`` (N, 1, h, w) is 1 on the unknown (removed) pixels, ``degree``
    (1, 1, h, w) the sum of the existing neighbours' weights; the coarsest level also holds ``chol`` (N, h w,
    h w), the Cholesky factor of its system with the kept pixels' rows replaced by the identity."""

    u: Tensor
    degree: Tensor
    inv_degree: Tensor
    chol: Tensor | None = None

    def take(self, keep: Tensor) -> _Level:
        return _Level(self.u[keep], self.degree, self.inv_degree, None if self.chol is None else self.chol[keep])


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per (problem, channel) inner product of (N, C, H, W) tensors -> (N, C)."""
    return torch.linalg.vecdot(a.flatten(2), b.flatten(2))


def _apply(level: _Level, e: Tensor, kernel: Tensor) -> Tensor:
    """The level's matrix times ``e`` (zero off the unknowns): u * (d e - sum_j w_ij e_j)."""
    return level.u * (level.degree * e - _neighbour_sum(e, kernel))


def _transfer_kernel(dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1, 1, 4, 4) bilinear interpolation weights of a x2 upsampling ([1, 3, 3, 1] / 4 per axis)."""
    k = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=dtype, device=device)
    return torch.outer(k, k).view(1, 1, 4, 4)


def _restrict(r: Tensor, kernel: Tensor) -> Tensor:
    """P^T r: the adjoint of :func:`_prolong`, onto the ceil(h / 2) x ceil(w / 2) grid."""
    n, c, h, w = r.shape
    x = F.pad(r.reshape(n * c, 1, h, w), (0, w % 2, 0, h % 2))  # the adjoint of the crop
    x = F.conv2d(x, kernel, stride=2, padding=1)
    return x.view(n, c, *x.shape[-2:])


def _prolong(e: Tensor, h: int, w: int, kernel: Tensor) -> Tensor:
    """P e: bilinear x2 upsampling (zero beyond the border) cropped to h x w."""
    n, c, hc, wc = e.shape
    x = F.conv_transpose2d(e.reshape(n * c, 1, hc, wc), kernel, stride=2, padding=1)
    return x[..., :h, :w].reshape(n, c, h, w)


def _coarsest_factor(u: Tensor, degree: Tensor, kernel: Tensor) -> Tensor:
    """Cholesky factors (N, P, P) of diag(u) A diag(u) + diag(1 - u), A the level's matrix on all P pixels."""
    h, w = u.shape[-2:]
    p = h * w
    eye = torch.eye(p, dtype=u.dtype, device=u.device).view(p, 1, h, w)
    full = (degree * eye - F.conv2d(eye, kernel, padding=1)).view(p, p)  # symmetric: column j = A e_j
    m = u.view(-1, p)
    dense = m[:, :, None] * full * m[:, None, :] + torch.diag_embed(1.0 - m)
    return torch.linalg.cholesky(dense.double()).to(u.dtype)  # float64: a few hundred pixels at most


def _hierarchy(removed: Tensor, dtype: torch.dtype, kernel: Tensor) -> list[_Level]:
    """The grids, finest first: a coarse pixel (2 x 2 block, ceil at odd sides) is unknown when all its
    existing pixels are, down to at most ``COARSEST_PIXELS`` pixels (or a side of 1)."""
    u = removed[:, None].to(dtype)
    levels = []
    while True:
        h, w = u.shape[-2:]
        degree = _neighbour_sum(torch.ones(1, 1, h, w, dtype=dtype, device=u.device), kernel)
        if h * w <= COARSEST_PIXELS or min(h, w) == 1:
            levels.append(_Level(u, degree, degree.reciprocal(), _coarsest_factor(u, degree, kernel)))
            return levels
        levels.append(_Level(u, degree, degree.reciprocal()))
        u = 1.0 - F.max_pool2d(1.0 - u, 2, ceil_mode=True)


def _direct_solve(level: _Level, rhs: Tensor) -> Tensor:
    """The coarsest level's system solved by its Cholesky factors, for each problem and channel of ``rhs``."""
    n, c, h, w = rhs.shape
    x = torch.cholesky_solve(rhs.reshape(n, c, h * w).transpose(1, 2), level.chol)
    return x.transpose(1, 2).reshape(n, c, h, w)


def _vcycle(r: Tensor, levels: Sequence[_Level], kernel: Tensor, transfer: Tensor) -> Tensor:
    """One symmetric V(1, 1)-cycle from zero for A e = r (``r`` zero off the unknowns): damped-Jacobi pre- and
    post-smoothing, bilinear transfers (restriction = prolongation transposed), direct solve at the bottom."""
    top = levels[0]
    h, w = r.shape[-2:]
    if top.chol is not None:
        return _direct_solve(top, r) * top.u
    e = OMEGA * top.inv_degree * r
    coarse = _restrict(r - _apply(top, e, kernel), transfer) * levels[1].u
    e = e + top.u * _prolong(_vcycle(coarse, levels[1:], kernel, transfer), h, w, transfer)
    return e + OMEGA * top.inv_degree * (r - _apply(top, e, kernel))


def _pcg(start: Tensor, levels: list[_Level], rtol: float, budget: int,
         check_every: int) -> tuple[Tensor, Tensor]:
    """Multigrid-preconditioned CG on the finest of ``levels``: ``start`` (N, C, H, W) holds the kept values and
    a first guess at the unknown pixels; returns the solution and each problem's iteration count (N,)."""
    n, c, h, w = start.shape
    dev, dtype = start.device, start.dtype
    kernel = neighbour_weights(dtype, dev)
    transfer = _transfer_kernel(dtype, dev)
    top = levels[0]
    out = start.clone()
    iterations = torch.zeros(n, dtype=torch.long, device=dev)
    y = start
    b = top.u * _neighbour_sum(y * (1.0 - top.u), kernel)  # the kept neighbours' weighted sum: right-hand side
    threshold = torch.maximum(rtol**2 * _dot(b * top.inv_degree, b), CG_ATOL**2 * top.u.sum((2, 3)))  # (N, C)
    del b
    r = top.u * (_neighbour_sum(y, kernel) - top.degree * y)  # b - A x on the unknowns, 0 elsewhere
    active = _dot(r * top.inv_degree, r) > threshold
    z = _vcycle(r, levels, kernel, transfer)
    p = z.clone()
    rz = _dot(r, z)
    idx = torch.arange(n, device=dev)  # rows of the working set in the full batch
    its = torch.zeros(n, dtype=torch.long, device=dev)
    for it in range(budget):
        if it % check_every == 0:
            alive = active.any(1)
            running = int(alive.sum())  # the only host synchronisation: once per check
            if running == 0:
                break
            if running <= len(idx) // 2:  # drop the converged problems from the working set
                out[idx], iterations[idx] = y, its
                keep = torch.nonzero(alive).flatten()
                idx, y, r, p, z = idx[keep], y[keep], r[keep], p[keep], z[keep]
                rz, threshold, active, its = rz[keep], threshold[keep], active[keep], its[keep]
                levels = [lv.take(keep) for lv in levels]
        top = levels[0]
        ap = _apply(top, p, kernel)
        pap = _dot(p, ap)
        ok = active & (pap > 0)
        alpha = torch.where(ok, rz / torch.where(ok, pap, 1.0), 0.0)[..., None, None]
        y = torch.addcmul(y, alpha, p)
        r_new = torch.addcmul(r, alpha, ap, value=-1.0)
        z_new = _vcycle(r_new, levels, kernel, transfer)
        rz_new = _dot(r_new, z_new)
        go = active & (rz > 0)  # Polak-Ribiere: robust to the preconditioner's float rounding
        beta = torch.where(go, (rz_new - _dot(r, z_new)) / torch.where(go, rz, 1.0), 0.0).clamp_min(0.0)
        p = torch.addcmul(z_new, beta[..., None, None], p)
        its = its + active.any(1)
        rz = torch.where(active, rz_new, rz)
        r, z = r_new, z_new
        active = active & (_dot(r * top.inv_degree, r) > threshold)
    out[idx], iterations[idx] = y, its
    return out, iterations


def _solve(known: Tensor, levels: list[_Level], rtol: float, check_every: int,
           stats: list[LevelStats] | None) -> Tensor:
    """Cascadic: solve the problem on the next coarser grid (kept coarse pixels: the mean of their kept pixels),
    upsample it as the start, then run multigrid-preconditioned CG on this grid."""
    top = levels[0]
    n, _, h, w = known.shape
    kept = 1.0 - top.u
    if top.chol is not None:  # the coarsest grid: solved directly
        kernel = neighbour_weights(known.dtype, known.device)
        rhs = torch.where(top.u > 0, _neighbour_sum(known * kept, kernel), known)
        if stats is not None:
            stats.append(LevelStats((h, w), 0, torch.zeros(n, dtype=torch.long, device=known.device)))
        return _direct_solve(top, rhs)
    total = F.avg_pool2d(known * kept, 2, ceil_mode=True)  # same divisor for both: their ratio is the mean
    share = F.avg_pool2d(kept, 2, ceil_mode=True)
    coarse_known = torch.where(share > 0, total / share.clamp_min(1e-12), 0.0)
    coarse = _solve(coarse_known, levels[1:], rtol, check_every, stats)
    guess = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[..., :h, :w]
    start = torch.where(top.u > 0, guess, known)
    budget = level_budget(h, w)
    solution, iterations = _pcg(start, levels, rtol, budget, check_every)
    if stats is not None:
        stats.append(LevelStats((h, w), budget, iterations))
    return solution


@torch.no_grad()
def linear_imputation(images: Tensor, removed: Tensor, *, rtol: float = CG_RTOL, check_every: int = CG_CHECK_EVERY,
                      stats: list[LevelStats] | None = None) -> Tensor:
    """ROAD's linear imputation without noise: (N, C, H, W) images whose ``removed`` (N, H, W) pixels are replaced
    by the solution of sum_j w_ij (x_i - x_j) = 0 over their existing 8 neighbours (1/6 direct, 1/12 diagonal).

    Batched cascadic multigrid-preconditioned CG on ``images``' device (see the module docstring); float32.
    ``stats``, if given, receives one :class:`LevelStats` per solved level, coarsest first. Every image must keep
    a pixel.
    """
    if images.dim() != 4 or removed.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"linear_imputation expects images (N, C, H, W) and removed (N, H, W), got "
                         f"{tuple(images.shape)} and {tuple(removed.shape)}")
    removed = removed.to(device=images.device, dtype=torch.bool)
    if len(images) and bool(removed.flatten(1).all(1).any()):
        raise ValueError("linear_imputation: an image has every pixel removed (the system is singular)")
    known = images.float()
    if not len(images) or not bool(removed.any()):
        return known.clone()
    levels = _hierarchy(removed, known.dtype, neighbour_weights(known.dtype, known.device))
    return _solve(known, levels, rtol, check_every, stats)


def noise_seed(image_id: str, cls: int) -> int:
    """Seed of the imputation noise of one (image, class) map (distinct from its tie-breaking seed)."""
    return zlib.crc32(f"road-noise/{image_id}/{int(cls)}".encode())


def imputation_noise(seeds: Sequence[int], h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """(M, 2, S, 3, H, W) standard normal noise, map m drawn on the CPU from ``seeds[m]``: one value per (order,
    fraction, channel, pixel), the same for a map whatever the batch."""
    shape = (len(ORDERS), len(FRACTIONS), 3, h, w)
    if not len(seeds):
        return torch.empty(0, *shape, device=device)
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(draws).to(device)


def removal_masks(ranks: Tensor, h: int, w: int) -> Tensor:
    """(M, 2, S, H, W) bool: the removed pixels of each map at each order (MoRF, LeRF) and fraction, from its
    :func:`~maskbench.metrics.faithfulness.pixel_ranks` (M, H W), rank 0 = most relevant."""
    n_pix = h * w
    counts = torch.round(torch.tensor(FRACTIONS, dtype=torch.float64) * n_pix).long().to(ranks.device)  # (S,)
    r = ranks[:, None, :]
    morf = r < counts[None, :, None]
    lerf = r >= (n_pix - counts)[None, :, None]
    return torch.stack([morf, lerf], 1).view(len(ranks), len(ORDERS), len(FRACTIONS), h, w)


@torch.no_grad()
def road_images(images: Tensor, maps: Tensor, image_ids: Sequence[str], classes: Sequence[int], *,
                noise_std: float = NOISE_STD, rtol: float = CG_RTOL,
                stats: list[LevelStats] | None = None) -> Tensor:
    """The imputed images ROAD evaluates: (M, 2, S, 3, H, W) for images (M, 3, H, W) explained for ``classes``
    by ``maps`` (M, H, W); order 0 MoRF, 1 LeRF; fractions ``FRACTIONS``. Pixels ranked by
    :func:`~maskbench.metrics.faithfulness.pixel_ranks` (ties seeded by ``tie_seed(image_id, class)``), removed,
    imputed (:func:`linear_imputation`) and perturbed by ``noise_std`` times the noise of
    :func:`imputation_noise` (seeded by ``noise_seed(image_id, class)``) on the removed pixels only."""
    m, c, h, w = images.shape
    seeds = [tie_seed(i, k) for i, k in zip(image_ids, classes, strict=True)]
    ranks = pixel_ranks(maps.reshape(m, h * w), seeds)
    return _impute_slots(images, ranks, [noise_seed(i, k) for i, k in zip(image_ids, classes, strict=True)],
                         noise_std, rtol, stats)


def _impute_slots(images: Tensor, ranks: Tensor, noise_seeds: Sequence[int], noise_std: float, rtol: float,
                  stats: list[LevelStats] | None) -> Tensor:
    m, c, h, w = images.shape
    removed = removal_masks(ranks, h, w)  # (M, 2, S, H, W)
    per = len(ORDERS) * len(FRACTIONS)
    known = images.float()[:, None].expand(m, per, c, h, w).reshape(m * per, c, h, w)
    out = linear_imputation(known, removed.reshape(m * per, h, w), rtol=rtol, stats=stats)
    out = out.view(m, len(ORDERS), len(FRACTIONS), c, h, w)
    if noise_std:
        noise = imputation_noise(noise_seeds, h, w, images.device)
        out = torch.addcmul(out, noise, removed[:, :, :, None].to(out.dtype), value=noise_std)
    return out


# ----------------------------------------------------------------------------------------------------------------
# curves of one batch


@dataclass
class RoadResult:
    """ROAD outputs of one batch. ``curves``: (B, K, 2, S) class probability q of each slot's class on its
    imputed images (order 0 MoRF, 1 LeRF; fractions ``FRACTIONS``), NaN for slots that are not scored (not a true
    class, or a repeated one). ``per_image``: ``morf`` / ``lerf`` -> (B, S), 100 x the mean of q over each
    image's true classes (NaN without one). ``stats``: the solver's levels, per chunk of slots."""

    curves: Tensor
    per_image: dict[str, Tensor]
    stats: list[list[LevelStats]]


def _chunk_slots(h: int, w: int) -> int:
    """Scored maps per chunk: their 2 x 9 imputation problems within about ``CHUNK_BYTES`` of temporaries."""
    per_map = len(ORDERS) * len(FRACTIONS) * h * w * _BYTES_PER_PROBLEM_PIXEL
    return max(1, CHUNK_BYTES // per_map)


@torch.no_grad()
def _compute(inputs: MetricInputs) -> RoadResult:
    model, images, masks, classes = inputs.model, inputs.images, inputs.masks, inputs.classes
    b, k = classes.shape
    h, w = images.shape[-2:]
    dev = images.device
    slots = true_class_slots(classes, inputs.batch.labels.to(dev))
    img, col = torch.nonzero(slots, as_tuple=True)  # scored slots: image index, slot index
    cls = classes[img, col]
    m = img.numel()
    ids = inputs.batch.image_ids
    pairs = list(zip(img.tolist(), cls.tolist(), strict=True))
    ranks = pixel_ranks(masks[img, col].reshape(m, h * w), [tie_seed(ids[i], c) for i, c in pairs])
    noise_seeds = [noise_seed(ids[i], c) for i, c in pairs]
    q = torch.empty(m, len(ORDERS), len(FRACTIONS), device=dev)
    stats: list[list[LevelStats]] = []
    rows = _chunk_slots(h, w)
    for i in range(0, m, rows):
        sl = slice(i, i + rows)
        chunk_stats: list[LevelStats] = []
        x = _impute_slots(images[img[sl]], ranks[sl], noise_seeds[sl], NOISE_STD, CG_RTOL, chunk_stats)
        n = x.shape[0]
        logits = forward_in_chunks(model, x.flatten(0, 2)).view(n, len(ORDERS) * len(FRACTIONS), -1)
        probs = class_probabilities(model, logits)
        q[sl] = torch.gather(probs, 2, cls[sl][:, None, None].expand(-1, probs.shape[1], 1))[..., 0].view(
            n, len(ORDERS), len(FRACTIONS))
        stats.append(chunk_stats)
    curves = torch.full((b, k, len(ORDERS), len(FRACTIONS)), math.nan, device=dev)
    curves[img, col] = q
    per_image = {o: 100.0 * curves[:, :, j].nanmean(1) for j, o in enumerate(ORDERS)}  # all-NaN rows stay NaN
    return RoadResult(curves, per_image, stats)


def road_scores(inputs: MetricInputs) -> RoadResult:
    """The ROAD curves of a batch, computed once per ``inputs`` and cached on it (invalidated when its model,
    images, masks, classes or labels are replaced or modified in place)."""
    return memo_on_inputs(inputs, _CACHE_ATTR, _compute)


# ----------------------------------------------------------------------------------------------------------------
# registered metrics and their table


def _cells(per_image: Tensor) -> dict[str, Tensor]:
    return {cell_key(f): per_image[:, j] for j, f in enumerate(FRACTIONS)}


@register_metric("road_morf", higher_is_better=False, table="road", label="ROAD MoRF", version="2",
                 valid_range=(0.0, 100.0), optional=True)
def road_morf(inputs: MetricInputs) -> dict[str, Tensor]:
    """ROAD MoRF: class probability (%) after removing the 10..90 % most relevant pixels, noisy linear imputation."""
    return _cells(road_scores(inputs).per_image["morf"])


@register_metric("road_lerf", higher_is_better=True, table="road", label="ROAD LeRF", version="2",
                 valid_range=(0.0, 100.0), optional=True)
def road_lerf(inputs: MetricInputs) -> dict[str, Tensor]:
    """ROAD LeRF: class probability (%) after removing the 10..90 % least relevant pixels, noisy linear imputation."""
    return _cells(road_scores(inputs).per_image["lerf"])


def _columns(metric: str) -> list[str]:
    return [f"{metric}/{cell_key(f)}" for f in FRACTIONS]


def curve_mean(metric: str, label: str, higher_is_better: bool, description: str) -> Statistic:
    """Mean over the nine fractions of the mean over images of ``metric``'s cells (all nine needed)."""
    cols = _columns(metric)
    return Statistic(metric, label, higher_is_better, lambda have: cols if set(cols) <= set(have) else [],
                     lambda means, names: nanmean_rows(means), description)


def _gap(means: np.ndarray, names: list[str]) -> np.ndarray:
    lerf = [i for i, n in enumerate(names) if n.startswith("road_lerf/")]
    morf = [i for i, n in enumerate(names) if n.startswith("road_morf/")]
    return nanmean_rows(means[:, lerf]) - nanmean_rows(means[:, morf])


def _gap_columns(have: Sequence[str]) -> list[str]:
    cols = _columns("road_morf") + _columns("road_lerf")
    return cols if set(cols) <= set(have) else []


ROAD_GAP = Statistic("road_gap", "LeRF - MoRF", True, _gap_columns, _gap,
                     "ROAD LeRF minus ROAD MoRF (percentage points of class probability)")

register_table(TableSpec(
    "road",
    (curve_mean("road_morf", "ROAD MoRF", False, road_morf.__doc__.splitlines()[0]),
     curve_mean("road_lerf", "ROAD LeRF", True, road_lerf.__doc__.splitlines()[0]),
     ROAD_GAP),
    r"ROAD (RemOve And Debias): each true class's probability (\%) on its image after removing the 10\%, 20\%, "
    r"\ldots, 90\% most relevant (MoRF, lower is better) or least relevant (LeRF, higher is better) pixels of "
    r"its map, averaged over the nine fractions; removed pixels are filled by noisy linear imputation (each the "
    r"weighted mean of its 8 neighbours, 1/6 direct and 1/12 diagonal, solved jointly, plus Gaussian noise of "
    r"std 0.01 in the normalised input space), so the shape of the removed region does not tell the class. "
    r"LeRF$-$MoRF: higher is better.",
    r"Rong et al.\ (2022), ROAD",
    order=25,
    headline=("road_gap", "ROAD LeRF-MoRF", r"ROAD LeRF$-$MoRF: faithfulness with debiased removal"),
))
