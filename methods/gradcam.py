"""Grad-CAM (Selvaraju et al., ICCV 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization"), through Captum's ``LayerGradCam``.

Map for class c: ReLU(sum_k alpha_k^c A^k) with alpha_k^c the spatial mean of d y^c / d A^k (eq. 1-2 of the
paper), read at the classifier's ``cam_layer`` (the last convolutional stage), where y^c is the class logit.
Post-processing as the NeurIPS 2022 evaluation did with pytorch-grad-cam: ReLU (Captum's default is no ReLU,
so ``relu_attributions=True``), bilinear upsampling to the input size (Captum's default is nearest), then a
per-(image, class) min-max normalisation to [0, 1]. All (image, class) pairs go through the network as one
batch (chunked by ``max_batch``), one backward pass for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AttributionMethod, check_range, image_class_pairs, normalize_maps, register_method


@register_method("gradcam")
@dataclass
class GradCAM(AttributionMethod):
    max_batch: int = 256  # (image, class) pairs per forward/backward pass
    not_in_key = ("max_batch",)  # memory knob: the masks do not depend on it

    label = "Grad-CAM"
    family = "gradient"
    paper = "Selvaraju et al., ICCV 2017"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "max_batch", 1)

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        from captum.attr import LayerGradCam

        b, k = classes.shape
        h, w = images.shape[-2:]
        cam = LayerGradCam(model, model.cam_layer)
        x, t = image_class_pairs(images, classes)  # (B*K, 3, H, W), image-major
        out = []
        for i in range(0, x.shape[0], self.max_batch):
            a = cam.attribute(x[i : i + self.max_batch], target=t[i : i + self.max_batch], relu_attributions=True)
            out.append(F.interpolate(a.detach(), size=(h, w), mode="bilinear", align_corners=False))
        maps = torch.cat(out)[:, 0].reshape(b, k, h, w)
        return normalize_maps(maps)


def layer_activations_and_gradients(model: nn.Module, layer: nn.Module, x: Tensor, targets: Tensor
                                    ) -> tuple[Tensor, Tensor]:
    """Activations A of ``layer`` and d y_t / d A for each row's target logit, in one forward/backward pass."""
    store: dict[str, Tensor] = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: store.__setitem__("a", out))
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # the frozen model's activations need a graph to the input
            score = model(xg).gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
    return store["a"].detach(), grad.detach()


@register_method("gradcam++")
@dataclass
class GradCAMPlusPlus(AttributionMethod):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018), our implementation (Captum does not have it).

    Weights w_k^c = sum_ij alpha_ij^kc ReLU(g_ij^k) with the closed form of eq. 19 under the exponential
    score assumption: alpha = g^2 / (2 g^2 + sum_ab A_ab^k g^3), set to 0 where the denominator is 0, g the
    gradient of the class logit w.r.t. the activations A of ``cam_layer``; map = ReLU(sum_k w_k^c A^k),
    bilinear upsampling and per-(image, class) min-max normalisation as for Grad-CAM.
    """

    max_batch: int = 256
    not_in_key = ("max_batch",)  # memory knob: the masks do not depend on it

    label = "Grad-CAM++"
    family = "gradient"
    paper = "Chattopadhay et al., WACV 2018"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "max_batch", 1)

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        b, k = classes.shape
        h, w = images.shape[-2:]
        x, t = image_class_pairs(images, classes)
        out = []
        for i in range(0, x.shape[0], self.max_batch):
            a, g = layer_activations_and_gradients(model, model.cam_layer, x[i : i + self.max_batch],
                                                   t[i : i + self.max_batch])
            g2, g3 = g * g, g * g * g
            denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
            alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
            weights = (alpha * torch.relu(g)).sum(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * a).sum(1, keepdim=True))
            out.append(F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False))
        return normalize_maps(torch.cat(out)[:, 0].reshape(b, k, h, w))
