"""Extremal Perturbations (Fong, Patrick & Vedaldi, ICCV 2019, "Understanding Deep Networks via Extremal
Perturbations and Smooth Masks").

For each target area a, find the smooth mask m of area a that maximises the class reward of the perturbed
image (eq. 6 of the paper, "preserve" variant), the area imposed through the sorted-mask constraint
R_a(m) = || vecsort(m) - r_a ||^2 (r_a: a fraction 1 - a of zeros, then ones) weighted by a growing lambda:

    m_a = argmax_m  reward(Phi(x, m)) - lambda_t * R_a(m)

* Smooth masks (Sec. 3.3, eq. 9): one parameter per ``step``-pixel cell, initialised to 1 and clamped to
  [0, 1] after every step; the mask at pixel u is the smooth maximum (softmax-weighted, temperature 20) over
  the parameters within r = 1 + ceil(sigma / step) cells of w(|u - c_k|) p_k, w(d) = exp(-2 max(d/sigma -
  1/2, 0)^2), in TorchRay's geometry (tested against a brute-force evaluation of the definition).
  ``resolution="cell"`` evaluates the smooth maximum at the parameter positions only and interpolates
  bilinearly in between (identical there, step^2 times cheaper: the ``fast`` preset).
* Perturbation: a blur pyramid of ``levels`` levels, sigma_l = ``max_blur`` (1 - l/(levels-1)), zero padding
  (the normalised image fades to the mean colour at the border); mask value m reads level m (levels - 1),
  interpolated linearly: m = 1 keeps the image, m = 0 is the strongest blur. ``variant``: preserve
  (Phi(x, m)), delete (Phi(x, 1 - m), reward negated) or dual (both in one batch, preserve - delete).
* Reward: ``contrastive`` (target logit minus the largest other logit; the NeurIPS 2022 comparison) or
  ``simple`` (target logit).
* Optimisation: SGD, lr 0.01, momentum 0.9 with dampening 0.9, ``max_iter`` = 800, lambda starts at 300
  and grows by 1.0035 per iteration; with ``jitter`` the perturbed image is flipped horizontally on even
  iterations (this assumes a roughly flip-invariant classifier, as natural-image classifiers are).
* Output: each area's mask smoothed with a Gaussian of sigma = ``smooth`` x min(H, W) (0.09, as the NeurIPS
  2022 evaluation), then combined over areas by ``combine``: ``select`` (the NeurIPS 2022 evaluation: the
  smallest area whose preserved class logit, with the smoothed mask that is returned, reaches the clean one,
  else the largest; the NeurIPS pipeline decides on TorchRay's smoothed output the same way), ``mean``
  (TorchRay's pointing-game sum of masks, divided by the number of areas) or ``max``; min-max normalised per
  map (the NeurIPS pipeline merges the classes' masks first and rescales the merged mask; here each class's
  map is rescaled and the metrics merge them, see ``methods/deviations.py``).

Published settings (``paper`` preset, the NeurIPS 2022 comparison): areas 0.05/0.1/0.2/0.3, 800 iterations,
contrastive reward, preserve, 8 levels, step 7, sigma 21, max blur 20 px at 224 px. Pixel sizes scale with the
image (x min(H, W) / 224), so a 64 px image gets step 2, sigma 6 and blur 5.7 px: the same 32 x 32 parameter
grid, so the optimisation sees the same problem. Differences from TorchRay's ``extremal_perturbation``, with
reasons:

* the area is measured on the mask over the image, as the paper defines it (``area_domain="image"``);
  TorchRay measures it on its whole generated grid, which includes a margin of sigma pixels on each side
  (about a quarter of the grid) that the classifier never sees (``area_domain="full"`` reproduces it);
* every image, class and area is optimised together in one batch (TorchRay: one image and class at a time,
  areas batched), with no per-iteration host synchronisation, and the classifier is frozen and in ``eval()``
  (the NeurIPS 2022 code left dropout on, and TorchRay switches ``requires_grad`` off on the model for good);
* the smooth maximum runs over neighbours with running sums and a hand-written backward pass instead of an
  unfolded (rows, 81, H, W) tensor;
* speed and agreement with TorchRay's implementation (same settings, pixel and per-cell smooth max) are
  measured by ``make perf`` and stored in ``results/perf/methods.csv``.
* ``fast`` preset (default CPU run, 1,200 (image, class) pairs): one area, 0.2 (objects cover 19 % of a
  synthetic image), 100 iterations with lambda's growth raised so that it ends at the weight it reaches after
  800 iterations, cell resolution: 8 x 4 x 4 = 128 times cheaper than ``paper`` at 64 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskbench.core.images import gaussian_blur

from .base import AttributionMethod, check_choice, check_range, hyperparameter_error, normalize_maps, register_method

SMOOTH_MAX_TEMPERATURE = 20.0


class _SmoothMaxPool(torch.autograd.Function):
    """The smooth-max pooling of Fong et al. (2019, eq. 9): out = sum_k v_k softmax(T v)_k, v_k = w_k p_{c+k}.

    ``padded``: (n, 1, ny + 2r, nx + 2r) zero-padded parameters; ``weight``: (ky, offsets, kx) kernel weights of
    each neighbour for each output offset. Returns (n, offsets, ny, nx). The neighbours are visited one row of
    the (2r + 1)^2 window at a time (a strided view, no copy) with running sums num = sum v e^{Tv} and
    den = sum e^{Tv} (v <= 1, so e^{Tv} <= e^20 needs no max shift): the working set is (2r + 1) times that of
    the output instead of (2r + 1)^2 for an unfolded tensor. The backward pass recomputes v and uses
    d out / d v_k = e_k / den (1 + T (v_k - out)).
    """

    @staticmethod
    def forward(ctx, padded: Tensor, weight: Tensor, radius: int, temperature: float) -> Tensor:  # type: ignore[override]
        k = 2 * radius + 1
        n, o = padded.shape[0], weight.shape[1]
        ny, nx = padded.shape[2] - k + 1, padded.shape[3] - k + 1
        num = padded.new_zeros(n, o, ny, nx)
        den = torch.zeros_like(num)
        for rows in _row_chunks(n, o * ny * nx * k):  # chunks of rows whose working set stays in cache
            windows = padded[rows].unfold(3, k, 1)  # (n, 1, ny + 2r, nx, k): a view
            for dy in range(k):
                v = windows[:, :, dy : dy + ny] * weight[dy].view(1, o, 1, 1, k)  # (n, o, ny, nx, k)
                e = torch.exp(v * temperature)
                den[rows] += e.sum(-1)
                num[rows] += v.mul_(e).sum(-1)
        out = num.div_(den)
        ctx.save_for_backward(padded, weight, out, den)
        ctx.radius, ctx.temperature = radius, temperature
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        padded, weight, out, den = ctx.saved_tensors
        t = ctx.temperature
        k = 2 * ctx.radius + 1
        n, o = padded.shape[0], weight.shape[1]
        ny, nx = out.shape[2], out.shape[3]
        g = (grad / den)[..., None]
        grad_padded = torch.zeros_like(padded)
        for rows in _row_chunks(n, o * ny * nx * k):
            windows = padded[rows].unfold(3, k, 1)
            out_r, g_r, grad_r = out[rows][..., None], g[rows], grad_padded[rows]
            for dy in range(k):
                w = weight[dy].view(1, o, 1, 1, k)
                v = windows[:, :, dy : dy + ny] * w
                gv = torch.exp(v * t).mul_(g_r).mul_(v.sub_(out_r).mul_(t).add_(1)).mul_(w)
                gw = gv.sum(1)  # (n, ny, nx, k): gradient of each neighbour in this window row
                band = grad_r[:, 0, dy : dy + ny]
                for dx in range(k):
                    band[:, :, dx : dx + nx] += gw[..., dx]
        return grad_padded, None, None, None


CACHE_ELEMENTS = 1 << 19  # ~2 MB of float32 per working tensor of the smooth-max pooling


def _row_chunks(n: int, per_row: int) -> list[slice]:
    size = max(1, CACHE_ELEMENTS // max(per_row, 1))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class SmoothMaskGenerator:
    """Turns (N, 1, gh, gw) cell parameters into smooth (N, 1, H', W') masks (Fong et al. 2019, Sec. 3.3).

    Geometry as TorchRay's ``MaskGenerator``: parameter (i, j) sits at image pixel (step i, step j); the mask
    at pixel u is the smooth maximum over the (2r + 1)^2 parameters around u's cell, r = 1 + ceil(sigma / step),
    of w(|u - c_k|) p_k with w(d) = exp(-2 max(d / sigma - 1/2, 0)^2); parameters beyond the grid are 0.
    ``margin`` extra pixels are generated on every side (the grid on which TorchRay measures the area).

    ``resolution``: ``"pixel"`` evaluates the smooth maximum at every pixel, as TorchRay; ``"cell"`` evaluates
    it only at the parameter positions (one value per ``step`` x ``step`` cell, step^2 times cheaper) and
    interpolates bilinearly in between. The mask varies over ``sigma`` (3 cells), so the two agree closely.
    """

    def __init__(self, height: int, width: int, step: int, sigma: float, device: torch.device,
                 margin: int = 0, resolution: str = "pixel"):
        if resolution not in ("pixel", "cell"):
            raise ValueError(f"EP mask resolution must be pixel or cell, not {resolution!r}")
        self.h, self.w, self.step, self.sigma, self.margin = height, width, step, float(sigma), int(margin)
        self.resolution = resolution
        self.grid_shape = (math.ceil(height / step), math.ceil(width / step))
        self.radius = r = 1 + math.ceil(sigma / step)
        k = 2 * r + 1
        # pixels to produce, in image coordinates: [-margin, size + margin)
        self.span = [(-self.margin, n + self.margin) for n in (height, width)]
        if resolution == "pixel":  # cells whose pixels cover the span; every in-cell offset
            self.cells = [(math.floor(a / step), math.ceil(b / step)) for a, b in self.span]
            offsets = torch.arange(step, dtype=torch.float32)
        else:  # sample points at the parameter positions covering the span (last one at or past its end)
            self.cells = [(math.floor(a / step), math.ceil((b - 1) / step) + 1) for a, b in self.span]
            offsets = torch.zeros(1)
        o = offsets.numel()
        centre = (torch.arange(k, dtype=torch.float32) - r) * step  # neighbour positions relative to the cell
        delta = offsets[:, None] - centre[None, :]  # (o, k)
        d = torch.sqrt(delta.view(o, 1, k, 1) ** 2 + delta.view(1, o, 1, k) ** 2)  # (oy, ox, ky, kx)
        weight = torch.exp(-2 * ((d / sigma) - 0.5).clamp_min(0) ** 2)
        self.weight = weight.reshape(o * o, k, k).permute(1, 0, 2).contiguous().to(device)  # (ky, offsets, kx)

    def __call__(self, params: Tensor) -> Tensor:
        n = params.shape[0]
        r, s = self.radius, self.step
        (cy0, cy1), (cx0, cx1) = self.cells
        gh, gw = self.grid_shape
        # zero padding so that every needed neighbour exists, then one unfold: (n, K2, cells)
        padded = F.pad(params, (r - cx0, cx1 - 1 + r - (gw - 1), r - cy0, cy1 - 1 + r - (gh - 1)))
        ny, nx = cy1 - cy0, cx1 - cx0
        out = _SmoothMaxPool.apply(padded, self.weight, r, SMOOTH_MAX_TEMPERATURE).clamp(0, 1)  # (n, o, ny, nx)
        (y0, y1), (x0, x1) = self.span
        if self.resolution == "pixel":
            out = out.view(n, s, s, ny, nx).permute(0, 3, 1, 4, 2).reshape(n, 1, ny * s, nx * s)
        else:
            out = out.view(n, 1, ny, nx)
            out = F.interpolate(out, size=((ny - 1) * s + 1, (nx - 1) * s + 1), mode="bilinear", align_corners=True)
        oy, ox = y0 - cy0 * s, x0 - cx0 * s  # where pixel y0 / x0 sits in ``out``
        return out[:, :, oy : oy + (y1 - y0), ox : ox + (x1 - x0)]

    def crop(self, full: Tensor) -> Tensor:
        """The image part of a generated mask."""
        m = self.margin
        return full[:, :, m : m + self.h, m : m + self.w]


def blur_pyramid(images: Tensor, levels: int, max_blur: float) -> Tensor:
    """(B, L, 3, H, W): level l blurred with sigma = max_blur (1 - l / (L - 1)); the last level is the image."""
    out = [gaussian_blur(images, max_blur * (1 - lvl / (levels - 1))) for lvl in range(levels)]
    return torch.stack(out, 1)


def apply_pyramid(pyramid: Tensor, mask: Tensor) -> Tensor:
    """Perturbed images: row i of the (N, L, 3, H, W) pyramids read at level mask_i * (L - 1), linearly
    interpolated between the two neighbouring levels."""
    levels = pyramid.shape[1]
    t = mask * (levels - 1)  # (N, 1, H, W)
    lo = t.detach().floor().clamp(0, levels - 2)
    frac = t - lo
    idx = lo.long()[:, :, None].expand(-1, -1, pyramid.shape[2], -1, -1)  # (N, 1, 3, H, W)
    below = torch.gather(pyramid, 1, idx)[:, 0]
    above = torch.gather(pyramid, 1, idx + 1)[:, 0]
    return torch.lerp(below, above, frac)


def area_references(numel: int, areas: Tensor) -> Tensor:
    """(N, numel) r_a per row: a fraction (1 - a) of zeros followed by ones (ascending, like the sorted mask)."""
    zeros = torch.round(numel * (1 - areas)).long()  # (N,)
    return (torch.arange(numel, device=areas.device)[None, :] >= zeros[:, None]).float()


@torch.no_grad()
def preserved_reaches_clean(model: nn.Module, pyramid: Tensor, masks: Tensor, target: Tensor) -> Tensor:
    """(N,) bool: the class logit of each row's image preserved by its mask (``apply_pyramid``: blurred where the
    mask is 0) reaches the logit of the clean image (the pyramid's last level is the image itself)."""
    n = len(target)
    x = torch.cat([pyramid[:, -1], apply_pyramid(pyramid, masks)])
    logit = model(x).float().gather(1, target.repeat(2)[:, None])[:, 0]
    return logit[n:] >= logit[:n]


@register_method("extremal-perturbation")
@dataclass
class ExtremalPerturbation(AttributionMethod):
    areas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])
    max_iter: int = 800
    levels: int = 8
    step: int = 7  # at 224 px
    sigma: float = 21.0  # at 224 px
    max_blur: float = 20.0  # at 224 px
    lr: float = 0.01
    momentum: float = 0.9
    lambda_start: float = 300.0
    lambda_growth: float = 1.0035
    reward: str = "contrastive"  # contrastive | simple
    variant: str = "preserve"  # preserve | delete | dual
    jitter: bool = True
    area_domain: str = "image"  # image (the paper) | full (TorchRay: image plus a margin of sigma pixels)
    resolution: str = "pixel"  # pixel (TorchRay) | cell (smooth max at the parameter positions, interpolated)
    smooth: float = 0.09  # Gaussian smoothing of each mask, sigma = smooth * min(H, W); 0 = off
    combine: str = "select"  # select | mean | max
    max_batch: int = 256  # (image, class, area) rows optimised together
    not_in_key = ("max_batch",)  # memory knob: the masks do not depend on it

    label = "EP"
    family = "perturbation"
    paper = "Fong, Patrick & Vedaldi, ICCV 2019"
    version = "2"
    presets = {"fast": {"areas": [0.2], "max_iter": 100, "lambda_growth": 1.0035 ** (800 / 100),
                        "resolution": "cell"}}

    def __post_init__(self) -> None:
        super().__post_init__()
        areas = self.areas
        if not isinstance(areas, (list, tuple)) or not areas or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a < 1 for a in areas
        ):
            raise hyperparameter_error(self, "areas", areas, "a non-empty list of area fractions in (0, 1)")
        check_range(self, "max_iter", 1)
        check_range(self, "levels", 2)  # the blur pyramid needs the image and at least one blurred level
        check_range(self, "step", 1)
        check_range(self, "sigma", 0, low_open=True)
        check_range(self, "max_blur", 0, low_open=True)
        check_range(self, "lr", 0, low_open=True)
        check_range(self, "momentum", 0, 1, high_open=True)
        check_range(self, "lambda_start", 0)
        check_range(self, "lambda_growth", 1)
        check_choice(self, "reward", ("contrastive", "simple"))
        check_choice(self, "variant", ("preserve", "delete", "dual"))
        check_choice(self, "area_domain", ("image", "full"))
        check_choice(self, "resolution", ("pixel", "cell"))
        check_range(self, "smooth", 0, 1)
        check_choice(self, "combine", ("select", "mean", "max"))
        check_range(self, "max_batch", 1)

    def _reward(self, logits: Tensor, target: Tensor) -> Tensor:
        own = logits.gather(1, target[:, None])[:, 0]
        if self.reward == "simple":
            return own
        others = logits.scatter(1, target[:, None], float("-inf"))  # contrastive (the choices are checked when built)
        return own - others.amax(1)

    def _energy(self, model: nn.Module, pyramid: Tensor, mask: Tensor, target: Tensor, flip: bool) -> Tensor:
        """The reward of each row's perturbed image (preserve: keep the mask; delete: remove it; dual: both)."""
        shown = {"preserve": [mask], "delete": [1 - mask], "dual": [mask, 1 - mask]}[self.variant]
        x = torch.cat([apply_pyramid(pyramid, m) for m in shown])
        reward = self._reward(model(x.flip(-1) if flip else x).float(), target.repeat(len(shown)))
        if self.variant == "preserve":
            return reward
        if self.variant == "delete":
            return -reward
        return reward[: len(target)] - reward[len(target) :]

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        maps, reached = self.area_masks(model, images, classes)
        n_areas = maps.shape[2]
        if self.combine == "mean":
            out = maps.mean(2)
        elif self.combine == "max":
            out = maps.amax(2)
        else:  # smallest area whose preserved class logit reaches the clean one, else the largest area
            last = torch.full_like(reached[..., 0], n_areas - 1, dtype=torch.long)
            first = torch.where(reached.any(2), reached.float().argmax(2), last)
            idx = first[:, :, None, None, None].expand(-1, -1, 1, *maps.shape[-2:])
            out = torch.gather(maps, 2, idx)[:, :, 0]
        return normalize_maps(out)

    def area_masks(self, model: nn.Module, images: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """The (smoothed) extremal mask of every area, (B, K, A, H, W), and whether each one's preserved class
        logit reaches the clean logit, (B, K, A)."""
        b, k = classes.shape
        h, w = images.shape[-2:]
        scale = min(h, w) / 224.0
        step = max(1, int(round(self.step * scale)))
        sigma = self.sigma * scale
        margin = int(round(sigma)) if self.area_domain == "full" else 0
        gen = SmoothMaskGenerator(h, w, step, sigma, images.device, margin=margin, resolution=self.resolution)
        pyramid = blur_pyramid(images, self.levels, self.max_blur * scale)  # (B, L, 3, H, W)
        n_areas = len(self.areas)
        # rows: image-major, then class, then area
        owner = torch.arange(b, device=images.device).repeat_interleave(k * n_areas)
        target = classes.reshape(-1).repeat_interleave(n_areas)
        areas = torch.tensor(self.areas, device=images.device).repeat(b * k)
        maps = torch.empty(len(owner), 1, h, w, device=images.device)
        for s in range(0, len(owner), self.max_batch):
            sl = slice(s, s + self.max_batch)
            maps[sl] = self._optimise(model, gen, pyramid[owner[sl]], target[sl], areas[sl])
        if self.smooth > 0:
            maps = gaussian_blur(maps, self.smooth * min(h, w))
        # the area decision reads the masks that are returned (smoothed), as the NeurIPS 2022 pipeline reads
        # TorchRay's output
        reached = torch.empty(len(owner), dtype=torch.bool, device=images.device)
        for s in range(0, len(owner), self.max_batch):
            sl = slice(s, s + self.max_batch)
            reached[sl] = preserved_reaches_clean(model, pyramid[owner[sl]], maps[sl], target[sl])
        return maps.view(b, k, n_areas, h, w), reached.view(b, k, n_areas)

    def _optimise(self, model: nn.Module, gen: SmoothMaskGenerator, pyramid: Tensor, target: Tensor,
                  areas: Tensor) -> Tensor:
        """Optimise one mask per row; ``pyramid`` holds each row's (L, 3, H, W) blur pyramid."""
        n = len(target)
        params = torch.ones(n, 1, *gen.grid_shape, device=pyramid.device, requires_grad=True)
        opt = torch.optim.SGD([params], lr=self.lr, momentum=self.momentum, dampening=self.momentum)
        numel = (gen.h + 2 * gen.margin) * (gen.w + 2 * gen.margin)
        refs = area_references(numel, areas)  # (n, numel)
        lam = self.lambda_start
        with torch.enable_grad():
            for t in range(self.max_iter):
                full = gen(params)
                energy = self._energy(model, pyramid, gen.crop(full), target, flip=self.jitter and t % 2 == 0)
                area_loss = ((full.reshape(n, -1).sort(dim=1).values - refs) ** 2).mean(1)
                opt.zero_grad(set_to_none=True)
                (lam * area_loss.sum() - energy.sum()).backward()
                opt.step()
                with torch.no_grad():
                    params.clamp_(0, 1)
                lam *= self.lambda_growth
        with torch.no_grad():
            return gen.crop(gen(params))
