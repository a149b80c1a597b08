"""Reference rows: constant masks (0, 0.5, 1), the ground-truth oracle, a centre Gaussian and uniform noise.

They go through exactly the same pipeline as real methods and give the ranges every metric can take
(Stalder et al., NeurIPS 2022, Table 2: columns "0", "0.5", "1" and "G.T."). The centre Gaussian is the
"center" baseline of the pointing game (Zhang et al., ECCV 2016); uniform noise is the chance row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from maskbench.core.errors import MethodError
from maskbench.core.images import generator, image_class_seed
from maskbench.datasets.base import box_union_masks

from .base import AttributionMethod, check_range, register_method


def _constant(images: Tensor, classes: Tensor, value: float) -> Tensor:
    b, _, h, w = images.shape
    return torch.full((b, classes.shape[1], h, w), float(value), device=images.device, dtype=images.dtype)


@register_method("constant-0")
@dataclass
class ConstantZero(AttributionMethod):
    """All-zero mask: keeps nothing."""

    label = "0"
    family = "reference"

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        return _constant(images, classes, 0.0)


@register_method("constant-0.5")
@dataclass
class ConstantHalf(AttributionMethod):
    """A mask of 0.5 everywhere."""

    label = "0.5"
    family = "reference"

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        return _constant(images, classes, 0.5)


@register_method("constant-1")
@dataclass
class ConstantOne(AttributionMethod):
    """All-one mask: keeps everything."""

    label = "1"
    family = "reference"

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        return _constant(images, classes, 1.0)


@register_method("ground-truth")
@dataclass
class GroundTruth(AttributionMethod):
    """The oracle: the ground-truth segmentation of each requested class (1 inside, 0 outside).

    Pixels of the ignore region (VOC's boundary band) are 0 here; every mask metric excludes them anyway.
    An image without segmentation (ImageNet, which has boxes only) gets the union of the class's boxes instead,
    the region its box metrics (M_I, the pointing game) score against; an image with neither is an error.
    """

    label = "G.T."
    family = "reference"
    uses_ground_truth = True

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        if batch is None:
            raise MethodError("ground-truth needs the batch's annotations (batch=...)")
        has_seg = batch.has_seg.tolist()
        no_gt = [i for i, seg, boxes in zip(batch.image_ids, has_seg, batch.boxes, strict=True)
                 if not seg and boxes.numel() == 0]
        if no_gt:
            raise MethodError(f"ground-truth: no segmentation and no boxes for image(s) {no_gt[:5]}")
        h, w = images.shape[-2:]
        out = box_union_masks(batch, h, w, classes.cpu()).to(images.device, images.dtype)
        if any(has_seg):
            idx = classes[:, :, None, None].expand(-1, -1, *batch.class_masks.shape[-2:])
            seg = torch.gather(batch.class_masks.to(images.device), 1, idx.to(images.device)).to(images.dtype)
            out = torch.where(batch.has_seg.to(images.device)[:, None, None, None], seg, out)
        return out


@register_method("centre-gaussian")
@dataclass
class CentreGaussian(AttributionMethod):
    """An isotropic Gaussian at the image centre, the same for every class (max 1).

    ``sigma`` is a fraction of the shorter image side.
    """

    sigma: float = 0.25
    label = "Centre"
    family = "reference"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "sigma", 0, low_open=True)

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        b, _, h, w = images.shape
        ys = torch.arange(h, device=images.device, dtype=images.dtype) - (h - 1) / 2
        xs = torch.arange(w, device=images.device, dtype=images.dtype) - (w - 1) / 2
        s = self.sigma * min(h, w)
        g = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * s * s))
        return g.expand(b, classes.shape[1], h, w).clone()


@register_method("random-uniform")
@dataclass
class RandomUniform(AttributionMethod):
    """Independent U(0, 1) noise per pixel: the chance row.

    Seeded per (seed, image bytes, class), so a map does not depend on which batch the image is in.
    """

    seed: int = 0
    label = "Random"
    family = "reference"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "seed", 0)

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        b, _, h, w = images.shape
        out = torch.empty(b, classes.shape[1], h, w, dtype=images.dtype)
        for i in range(b):
            for k in range(classes.shape[1]):
                out[i, k] = torch.rand(h, w, generator=generator(image_class_seed(images[i], self.seed,
                                                                                  int(classes[i, k]))))
        return out.to(images.device)
