"""iGOS++: Integrated Gradient Optimized Saliency by Bilateral Perturbations (Khorram, Lawson & Fuxin,
ACM CHIL 2021, arXiv:2012.15783).

Two low-resolution masks are optimised per (image, class), a *deletion* mask m_d and an *insertion* mask m_i,
both initialised to 1; low values mark relevant regions in both. With the composition
phi(a, b, m) = a m + b (1 - m), the blurred image b as baseline and up(.) the bilinear upsampling
(``align_corners=True``), the objective of a row is

    f(m_d, m_i) = D(M_c) - I(M_c) + D(M_d) - I(M_i) + L1 mean|1 - m_c| + L2 BTV(m_c),
    D(M) = 1/T sum_{t=1..T} s_c(phi(x, b, t/T M) + eps),   I(M) = 1/T sum_t s_c(phi(b, x, t/T M) + eps),

with M_d = up(m_d), M_i = up(m_i), M_c = M_d M_i, m_c = m_d m_i (low resolution), T = ``ig_iter`` and
eps ~ N(0, ``noise_std``^2) added to every composed image (normalised space). Minimising D deletes the evidence
(the integrated-gradient path from the baseline to the deletion image), minimising -I inserts it.
BTV (bilateral total variation, Sec. 3 of the paper) is 1/2 (TV_y + TV_x + BTV_y + BTV_x): TV = mean squared
neighbour difference of the low-resolution m_c, BTV = mean over the image's neighbour pairs of
w(u, v) (up(m_c)(u) - up(m_c)(v))^2 with the bilateral weight w = exp(-||x(u) - x(v)||^2 / ``btv_sigma``),
||.||^2 summed over the colour channels of the normalised image. Like the reference, the L1 and TV terms are
means over the low-resolution cells, and M_c is the product of the upsampled masks.

Each iteration takes the direction g = 1/2 grad(path terms) + grad(regulariser) (the reference halves the four
path gradients to balance them against the regulariser; f itself is not halved), then a backtracking (Armijo)
line search per row: of the steps ``alpha`` * ``ls_decay``^j that are >= ``ls_min_step``, the first with
f(clip(m - a g, 0, 1)) <= f(m) - ``ls_beta`` a ||g||^2 is taken, and none if no step passes; then both masks
are clipped to [0, 1]. The L1 term's (sub)gradient at m = 1 is 0 (as in the reference), so a mask leaves 1 only
where the path terms gain more than the L1 and BTV terms cost; a model whose score barely depends on the image
keeps both masks at 1 and gets an all-zero map. Output: saliency = 1 - m_c, upsampled to the image, min-max
normalised per map (:func:`~maskbench.methods.base.normalize_maps`).

Published setting (``paper`` preset = the defaults: the reference code's documented defaults for
classifiers): mask side 28 at 224 px, 15 iterations, 20 integration steps, L1 = 1, L2 = 20, alpha = 1000,
decay 0.2, beta 1e-4, smallest step 1e-5, noise 0.2, BTV sigma 0.01, baseline = cv2.GaussianBlur with a
51 px kernel and sigma 50 (a kernel truncated at 0.5 sigma: ``blur_truncate``). Pixel sizes scale with the
image (x H / 224): at 64 px the mask is 8 x 8 and the blur sigma 14.3 px. Cost per (image, class):
``iterations`` x (4 ``ig_iter`` forward+backward passes + 4 ``ig_iter`` forward passes per line-search step),
i.e. 15 x (80 + 12 x 80) = 1,200 forward+backward and 14,400 forward passes in the paper setting.

Differences from the reference code (github.com/khorrams/IGOS_pp, ``methods.iGOS_pp``), with reasons:

* iterations / integration steps: its ``main.py`` passes ``iterations=args.ig_iter`` and
  ``ig_iter=args.iterations``, so its command line runs 20 iterations of 15 steps; we use the documented values
  (15 iterations, 20 steps: the defaults of ``iGOS_pp`` and of ``args.py``). Its ``main.py`` also never passes
  ``opt``, so the line search (``opt="LS"``) always runs, as here; Nesterov (``NAG``) is not implemented.
* score: ``score="auto"``, the classifier's own class probability: the class sigmoid of a multi-label
  (VOC/COCO) classifier, the softmax of a single-label (ImageNet) one, which is the reference's choice;
  ``"sigmoid"`` / ``"softmax"`` force one, ``"logit"`` is the raw logit.
* noise: the reference draws fresh noise for every evaluation, so its Armijo test compares objectives under
  different noise; we draw it once per iteration and use it for the gradient, for f(m) (read from the gradient
  pass, which saves one evaluation) and for every trial step, so the test compares masks, not noise draws. The
  noise is seeded per image (``seed`` and the image's bytes, CPU generator) and shared by the image's classes,
  so a map does not depend on the batch its image is in.
* line search: vectorised without host synchronisation: every row evaluates every step >= ``ls_min_step``
  (a row that has accepted a step keeps it through a mask), so its cost is fixed instead of stopping early.
  When no step passes, the reference takes the first step below ``ls_min_step`` anyway (4e-6 by default: a
  negligible move); we take none, so that a coarser search (the ``fast`` preset) never takes an unchecked step.
* bilateral weight: the paper's exp(-||x(u) - x(v)||^2 / sigma) with the squared norm summed over channels;
  the reference squares the channel-mean difference for vertical neighbours and averages per-channel weights
  for horizontal ones.
* baseline blur: in normalised space (the blur is linear, so only the reference's uint8 rounding differs),
  reflected border (cv2's default BORDER_REFLECT_101), sigma and kernel radius scaled with the image size.
* output: upsampled 1 - m_c (the reference returns m_c at mask resolution); upsampling 1 - m_c rather than
  taking 1 - up(m_c) is the same map, but exactly 0 where the mask never moved.
* batching: all (image, class) rows are optimised together in chunks of at most ``max_batch`` composed images
  per pass (the reference explains one image and class at a time).

``fast`` preset (default CPU run: 64 px, small CNN, 1,200 pairs): the algorithm and every weight unchanged,
fewer evaluations: 4 iterations of 3 integration steps, and a line search that tries 1000, 200, 40, 8, 1.6,
0.32 and 0.064 (``ls_min_step=0.05``; on the synthetic set's classifier most accepted steps are 1.6 or 0.32,
and the quadrant test model needs 0.064). Cost per pair: 48 forward+backward and 336 forward passes
(measured times: the run's ``compute_time.csv`` and ``make perf``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskbench.core.images import REFERENCE_SIZE, gaussian_blur, image_seed, scaled_sigma
from maskbench.core.scores import METHOD_SCORES, class_score, resolve_score

from .base import AttributionMethod, check_choice, check_range, hyperparameter_error, normalize_maps, register_method

PATH_SIGNS = (1.0, -1.0, 1.0, -1.0)  # D(M_c), -I(M_c), D(M_d), -I(M_i)


def upsample(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling with ``align_corners=True`` (the reference's ``UpsamplingBilinear2d``)."""
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=True)


def bilateral_weights(images: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """exp(-||x(u) - x(v)||^2 / sigma) for vertical (N, 1, H-1, W) and horizontal (N, 1, H, W-1) neighbours."""
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).pow(2).sum(1, keepdim=True)
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).pow(2).sum(1, keepdim=True)
    return torch.exp(-dy / sigma), torch.exp(-dx / sigma)


def bilateral_tv(mask: Tensor, up_mask: Tensor, weight_y: Tensor, weight_x: Tensor, beta: float = 2.0) -> Tensor:
    """(N,) 1/2 (TV_y + TV_x + BTV_y + BTV_x): TV on the low-resolution ``mask`` (N, 1, h, w), the bilateral terms
    on ``up_mask`` (N, 1, H, W) weighted by :func:`bilateral_weights`; every term a mean over its pairs."""

    def power(d: Tensor) -> Tensor:
        return d.square() if beta == 2 else d.abs().pow(beta)

    tv_y = power(mask[:, :, 1:, :] - mask[:, :, :-1, :]).flatten(1).mean(1)
    tv_x = power(mask[:, :, :, 1:] - mask[:, :, :, :-1]).flatten(1).mean(1)
    btv_y = (weight_y * power(up_mask[:, :, 1:, :] - up_mask[:, :, :-1, :])).flatten(1).mean(1)
    btv_x = (weight_x * power(up_mask[:, :, :, 1:] - up_mask[:, :, :, :-1])).flatten(1).mean(1)
    return 0.5 * (tv_y + tv_x + btv_y + btv_x)


def regulariser(mask: Tensor, weight_y: Tensor, weight_x: Tensor, l1: float, l2: float) -> Tensor:
    """(N,) L1 mean|1 - m| + L2 BTV(m) of the low-resolution combined mask m (N, 1, h, w)."""
    up = upsample(mask, (weight_y.shape[-2] + 1, weight_y.shape[-1]))  # the image size
    return l1 * (1 - mask).abs().flatten(1).mean(1) + l2 * bilateral_tv(mask, up, weight_y, weight_x)


def line_search_steps(alpha: float, decay: float, min_step: float) -> list[float]:
    """The steps the backtracking search tries, in order: alpha, alpha * decay, ... while >= ``min_step``."""
    if not 0 < decay < 1:
        raise ValueError(f"iGOS++ ls_decay must lie in (0, 1), got {decay}")
    if min_step <= 0:
        raise ValueError(f"iGOS++ ls_min_step must be > 0, got {min_step}")
    steps, step = [], float(alpha)
    while step >= min_step:
        steps.append(step)
        step *= decay
    return steps


def armijo_line_search(objective: Callable[[Sequence[Tensor]], Tensor], masks: Sequence[Tensor],
                       grads: Sequence[Tensor], f0: Tensor, steps: Sequence[float], beta: float,
                       fallback: float = 0.0) -> Tensor:
    """(N,) step per row: the first of ``steps`` with f(clip(m - a g, 0, 1)) <= f0 - beta a ||g||^2, else ``fallback``.

    ``masks`` / ``grads``: tensors whose first dimension is the row; ``objective`` maps candidate masks to (N,)
    values. Every step is evaluated for every row (no host synchronisation); a row keeps its first accepted step.
    """
    gsq = sum(g.flatten(1).pow(2).sum(1) for g in grads)
    chosen = torch.full_like(f0, fallback)
    done = torch.zeros_like(f0, dtype=torch.bool)
    for a in steps:
        f = objective([(m - a * g).clamp(0, 1) for m, g in zip(masks, grads, strict=True)])
        ok = (f <= f0 - beta * a * gsq) & ~done
        chosen = torch.where(ok, torch.full_like(chosen, a), chosen)
        done = done | ok
    return chosen


@register_method("igos++")
@dataclass
class IGOSPlusPlus(AttributionMethod):
    size: int = 28  # mask side at 224 px, scaled with the image (8 at 64 px)
    iterations: int = 15
    ig_iter: int = 20  # integration steps T per path
    l1: float = 1.0
    l2: float = 20.0
    alpha: float = 1000.0  # first step of the line search
    ls_decay: float = 0.2
    ls_beta: float = 1e-4
    ls_min_step: float = 1e-5
    noise_std: float = 0.2  # added to every composed image (normalised space); 0 = no noise
    btv_sigma: float = 0.01
    blur_sigma: float = 50.0  # baseline blur at 224 px
    blur_truncate: float = 0.5  # kernel radius / sigma (cv2 ksize 51 with sigma 50)
    score: str = "auto"  # auto (the classifier's own probability: sigmoid or softmax) | sigmoid | softmax | logit
    max_batch: int = 256  # composed images per forward(/backward) pass
    not_in_key = ("max_batch",)  # memory knob: the masks do not depend on it
    seed: int = 0

    label = "iGOS++"
    family = "perturbation"
    paper = "Khorram et al., CHIL 2021"
    presets = {"fast": {"iterations": 4, "ig_iter": 3, "ls_min_step": 0.05}}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "size", 1)
        check_range(self, "iterations", 1)  # 0 iterations leave every mask at 1: all-zero maps
        check_range(self, "ig_iter", 1)
        check_range(self, "l1", 0)
        check_range(self, "l2", 0)
        check_range(self, "alpha", 0, low_open=True)
        check_range(self, "ls_decay", 0, 1, low_open=True, high_open=True)
        check_range(self, "ls_beta", 0, 1, high_open=True)
        check_range(self, "ls_min_step", 0, low_open=True)
        if self.ls_min_step > self.alpha:  # the line search would try no step: the masks never move
            raise hyperparameter_error(self, "ls_min_step", self.ls_min_step, f"a number <= alpha ({self.alpha})")
        check_range(self, "noise_std", 0)
        check_range(self, "btv_sigma", 0, low_open=True)
        check_range(self, "blur_sigma", 0, low_open=True)
        check_range(self, "blur_truncate", 0, low_open=True)
        check_choice(self, "score", METHOD_SCORES)
        check_range(self, "max_batch", 1)
        check_range(self, "seed", 0)

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        b, k = classes.shape
        h, w = images.shape[-2:]
        if self.ig_iter < 1 or self.iterations < 0:
            raise ValueError("iGOS++ needs ig_iter >= 1 and iterations >= 0")
        images = images.detach().float()
        side = (max(2, round(self.size * h / REFERENCE_SIZE)), max(2, round(self.size * w / REFERENCE_SIZE)))
        blurred = gaussian_blur(images, scaled_sigma(self.blur_sigma, h), self.blur_truncate, padding="reflect")
        weight_y, weight_x = bilateral_weights(images, self.btv_sigma)
        seeds = [image_seed(img, self.seed) for img in images]
        owner = [i // k for i in range(b * k)]  # image-major rows, on the host: no synchronisation
        target = classes.reshape(-1).to(images.device)
        rows = max(1, self.max_batch // (4 * self.ig_iter))
        combined = []
        for s in range(0, b * k, rows):
            combined.append(self._optimise(model, images, blurred, weight_y, weight_x, owner[s : s + rows],
                                           target[s : s + rows], seeds, side))
        sal = upsample(1 - torch.cat(combined), (h, w))  # upsampling 0 is exact: an unmoved mask gives 0
        return normalize_maps(sal.view(b, k, h, w))

    def _optimise(self, model: nn.Module, images: Tensor, blurred: Tensor, weight_y: Tensor, weight_x: Tensor,
                  owner: list[int], target: Tensor, seeds: list[int], side: tuple[int, int]) -> Tensor:
        """Optimise the rows of one chunk; returns their low-resolution combined masks m_d m_i (N, 1, h, w)."""
        device = images.device
        n, t = len(owner), self.ig_iter
        h, w = images.shape[-2:]
        uniq = sorted(set(owner))
        gens = [torch.Generator().manual_seed(seeds[i]) for i in uniq]  # fresh per chunk: same draws in any chunk
        local = torch.tensor([uniq.index(i) for i in owner], device=device)
        idx = torch.tensor(owner, device=device)
        x, base = images[idx], blurred[idx]
        diff = (x - base)[:, None, None]  # (N, 1, 1, 3, H, W)
        start = torch.stack([base, x, base, x], 1)[:, :, None]  # (N, 4, 1, 3, H, W): paths at step 0
        sign = torch.tensor(PATH_SIGNS, device=device).view(1, 4, 1, 1, 1, 1)
        frac = (torch.arange(1, t + 1, device=device, dtype=torch.float32) / t).view(1, 1, t, 1, 1, 1)
        wy, wx = weight_y[idx], weight_x[idx]
        tgt = target.repeat_interleave(4 * t)

        def paths(md: Tensor, mi: Tensor, noise: Tensor) -> Tensor:
            """(N,) D(M_c) - I(M_c) + D(M_d) - I(M_i)."""
            up_d, up_i = upsample(md, (h, w)), upsample(mi, (h, w))
            m = torch.stack([up_d * up_i, up_d * up_i, up_d, up_i], 1)[:, :, None]  # (N, 4, 1, 1, H, W)
            composed = start + sign * frac * m * diff + noise  # deletion: b + aM(x-b); insertion: x - aM(x-b)
            s = class_score(model(composed.flatten(0, 2)).float(), tgt, resolve_score(self.score, model)).view(n, 4, t)
            return (s.mean(2) * sign.view(1, 4)).sum(1)

        def objective(masks: Sequence[Tensor], noise: Tensor) -> Tensor:
            md, mi = masks
            return paths(md, mi, noise) + regulariser(md * mi, wy, wx, self.l1, self.l2)

        steps = line_search_steps(self.alpha, self.ls_decay, self.ls_min_step)
        md = torch.ones(n, 1, *side, device=device)
        mi = torch.ones(n, 1, *side, device=device)
        for _ in range(self.iterations):
            if self.noise_std > 0:
                draws = torch.stack([torch.randn(4, t, images.shape[1], h, w, generator=g) for g in gens]).to(device)
                noise = draws[local] * self.noise_std  # (N, 4, T, 3, H, W), shared by an image's classes
            else:
                noise = torch.zeros((), device=device)
            with torch.enable_grad():
                vd, vi = md.detach().requires_grad_(True), mi.detach().requires_grad_(True)
                p = paths(vd, vi, noise)
                reg = regulariser(vd * vi, wy, wx, self.l1, self.l2)
                gd, gi = torch.autograd.grad((0.5 * p + reg).sum(), [vd, vi])
            with torch.no_grad():
                f0 = (p + reg).detach()
                step = armijo_line_search(lambda ms, noise=noise: objective(ms, noise), [md, mi], [gd, gi], f0, steps,
                                          self.ls_beta).view(n, 1, 1, 1)  # 0 where no step passes
                md = (md - step * gd).clamp(0, 1)
                mi = (mi - step * gi).clamp(0, 1)
        return (md * mi).detach()
