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

from .base import AttributionMethod, normalize_maps, register_method


@register_method("gradcam")
@dataclass
class GradCAM(AttributionMethod):
    max_batch: int = 256  # (image, class) pairs per forward/backward pass

    label = "Grad-CAM"
    family = "gradient"
    paper = "Selvaraju et al., ICCV 2017"

    def explain(self, model: nn.Module, images: Tensor, classes: Tensor, *, batch=None) -> Tensor:
        from captum.attr import LayerGradCam

        b, k = classes.shape
        h, w = images.shape[-2:]
        cam = LayerGradCam(model, model.cam_layer)
        x = images.repeat_interleave(k, dim=0)  # (B*K, 3, H, W), image-major
        t = classes.reshape(-1)
        out = []
        for i in range(0, x.shape[0], self.max_batch):
            a = cam.attribute(x[i : i + self.max_batch], target=t[i : i + self.max_batch], relu_attributions=True)
            out.append(F.interpolate(a.detach(), size=(h, w), mode="bilinear", align_corners=False))
        maps = torch.cat(out)[:, 0].reshape(b, k, h, w)
        return normalize_maps(maps)
