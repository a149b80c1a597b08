"""The gradient family, through Captum: vanilla gradient, SmoothGrad and Integrated Gradients.

All three explain the class logit of the frozen classifier, batch every (image, class) pair through the
network together (chunked by ``max_batch``), and post-process as the distribution-guided paper's appendix A.2
describes for them: a per-pixel magnitude, outliers cropped at the ``clip_percentile`` of each map, then a
min-max normalisation to [0, 1]. Channel reduction, stated per method:

* vanilla gradient (Simonyan et al., ICLR-W 2014): Captum ``Saliency``, max over colour channels of |dy/dx|
  (TorchRay's convention);
* SmoothGrad (Smilkov et al., 2017): the mean of the gradient over ``samples`` noisy copies
  x + N(0, sigma^2), sigma = ``noise_level`` x the range of the normalised input domain (the paper's
  sigma / (x_max - x_min); 20 % and 50 samples as the paper recommends, not Captum's absolute sigma = 1 with 5
  samples), then |.| and max over channels. The noise is drawn per image from a generator seeded by
  (``seed``, image bytes), so a map does not depend on which batch its image is in; Captum's ``NoiseTunnel``
  draws from the global RNG for the whole batch at once and cannot promise that, so we stack the noisy copies
  ourselves and take their gradients with Captum's ``Saliency``;
* Integrated Gradients (Sundararajan et al., ICML 2017): Captum ``IntegratedGradients`` from a black image
  (pixel value 0, i.e. -mean/std after normalisation) with 200 steps of the trapezoidal Riemann rule, batched
  with ``internal_batch_size``; attribution summed over channels (completeness holds for the sum), then |.|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maskbench.core.images import generator, image_seed

from .base import (
    AttributionMethod,
    MethodContext,
    check_choice,
    check_range,
    image_class_pairs,
    normalize_maps,
    register_method,
)


def clip_and_normalize(maps: Tensor, percentile: float) -> Tensor:
    """Crop each (H, W) map at its ``percentile`` (outliers) and min-max normalise it to [0, 1]."""
    flat = maps.flatten(-2)
    if percentile < 100:
        hi = torch.quantile(flat.float(), percentile / 100, dim=-1, keepdim=True).to(flat.dtype)
        flat = torch.minimum(flat, hi)
    return normalize_maps(flat.view_as(maps))


@dataclass
class _GradientMethod(AttributionMethod):
    max_batch: int | None = None  # rows per forward/backward pass; None: see _rows
    not_in_key = ("max_batch",)  # memory knob: the masks do not depend on it
    clip_percentile: float = 99.0

    family = "gradient"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "max_batch", 1)
        check_range(self, "clip_percentile", 0, 100, low_open=True)  # 0 would clip every map to a constant

    def _rows(self, images: Tensor) -> int:
        """Rows per pass: ``max_batch``, or about 2^20 input pixels on the CPU (256 rows at 64 px, 20 at 224 px:
        larger batches of a large network fall out of the cache and ran 3-4x slower than one image at a time
        with ResNet-50 at 224 px here) and 2^24 on a GPU."""
        if self.max_batch:
            return self.max_batch
        budget = 1 << 24 if images.device.type == "cuda" else 1 << 20
        return max(1, budget // (images.shape[-2] * images.shape[-1]))

    def setup(self, ctx: MethodContext) -> dict[str, Any]:
        self._mean, self._std = tuple(ctx.mean), tuple(ctx.std)
        return {}

    def _norm(self, images: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(getattr(self, "_mean", (0.485, 0.456, 0.406)), device=images.device)
        std = torch.tensor(getattr(self, "_std", (0.229, 0.224, 0.225)), device=images.device)
        return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


@register_method("gradient")
@dataclass
class VanillaGradient(_GradientMethod):
    label = "Gradient"
    paper = "Simonyan et al., ICLR Workshops 2014"

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        from captum.attr import Saliency

        x, t = image_class_pairs(images, classes)
        sal = Saliency(model)
        n = self._rows(images)
        out = [sal.attribute(x[i : i + n], target=t[i : i + n], abs=True).detach() for i in range(0, len(x), n)]
        maps = torch.cat(out).amax(1).view(*classes.shape, *images.shape[-2:])
        return clip_and_normalize(maps, self.clip_percentile)


@register_method("smoothgrad")
@dataclass
class SmoothGrad(_GradientMethod):
    samples: int = 50
    noise_level: float = 0.2
    seed: int = 0

    label = "SmoothGrad"
    paper = "Smilkov et al., ICML Workshop 2017"
    presets = {"fast": {"samples": 20}}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "samples", 1)
        check_range(self, "noise_level", 0)
        check_range(self, "seed", 0)

    def _noise(self, images: Tensor) -> Tensor:
        """(B, samples, 3, H, W) standard normal noise, seeded per image."""
        out = []
        for img in images:
            out.append(torch.randn(self.samples, *img.shape, generator=generator(image_seed(img, self.seed))))
        return torch.stack(out).to(images.device)

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        from captum.attr import Saliency

        _, std = self._norm(images)
        sigma = self.noise_level / std.amin()  # the normalised input domain spans 1/std per channel
        b, k = classes.shape
        noise = self._noise(images) * sigma  # (B, S, 3, H, W)
        noisy = (images[:, None] + noise).repeat_interleave(k, dim=0).flatten(0, 1).requires_grad_(True)
        t = classes.reshape(-1).repeat_interleave(self.samples)
        sal = Saliency(model)
        n = self._rows(images)
        grads = [sal.attribute(noisy[i : i + n], target=t[i : i + n], abs=False).detach()
                 for i in range(0, len(noisy), n)]
        mean_grad = torch.cat(grads).view(b * k, self.samples, *images.shape[1:]).mean(1)
        maps = mean_grad.abs().amax(1).view(b, k, *images.shape[-2:])
        return clip_and_normalize(maps, self.clip_percentile)


@register_method("integrated-gradients")
@dataclass
class IntegratedGradients(_GradientMethod):
    steps: int = 200
    rule: str = "riemann_trapezoid"

    label = "IG"
    paper = "Sundararajan et al., ICML 2017"
    presets = {"fast": {"steps": 32}}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "steps", 2)
        check_choice(self, "rule", ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle",
                                    "gausslegendre"))

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch: Any = None) -> Tensor:
        from captum.attr import IntegratedGradients as CaptumIG

        mean, std = self._norm(images)
        x, t = image_class_pairs(images, classes)
        black = (-mean / std).expand_as(x[:1])
        ig = CaptumIG(model)
        per_pass = self._rows(images)
        rows = max(1, per_pass // self.steps)  # (image, class) pairs per call
        out = []
        for i in range(0, len(x), rows):
            xi = x[i : i + rows]
            out.append(ig.attribute(xi, baselines=black.expand_as(xi), target=t[i : i + rows], n_steps=self.steps,
                                    method=self.rule, internal_batch_size=max(per_pass, len(xi))).detach())
        maps = torch.cat(out).sum(1).abs().view(*classes.shape, *images.shape[-2:])
        return clip_and_normalize(maps, self.clip_percentile)
