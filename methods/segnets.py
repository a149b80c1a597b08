"""Segmentation networks used as the *Explainer* of the learned attribution methods (Stalder et al., NeurIPS 2022).

Every network maps (B, 3, H, W) normalised images to (B, C, H, W) per-class mask **logits** at input
resolution; the methods apply the sigmoid.

* :class:`SmallSegNet` (``arch="small"``): a small U-Net-like encoder-decoder for the 64 px synthetic set
  and CPU training. The first convolution has stride 2, the encoder goes down to 1/8 of the input, the decoder
  comes back to 1/2 with skip connections, and the per-class logits are upsampled bilinearly to the input size
  (so, like DeepLab's stride-8 logits, the masks are smooth at the finest scale).
* :func:`deeplabv3_resnet50` (``arch="deeplabv3_resnet50"``): the paper's Explainer, torchvision's
  DeepLabV3-ResNet50 (output stride 8, ASPP head, no auxiliary head) returning its ``out`` logits.
  ``pretrained_backbone=False`` (default) trains everything from scratch, as Sec. 4 of the paper states;
  ``True`` starts the ResNet-50 backbone from torchvision's ImageNet weights, which is what the published code
  actually did (torchvision 0.11's ``deeplabv3_resnet50(pretrained=False)`` kept ``pretrained_backbone=True``).
  The weights must be downloadable or already in ``$TORCH_HOME/hub/checkpoints``; otherwise a
  :class:`~maskbench.core.errors.MaskbenchError` says so.

:func:`build_segnet` builds one by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskbench.core.errors import MaskbenchError, UnknownNameError

SEGNETS = ("small", "deeplabv3_resnet50")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallSegNet(nn.Module):
    """A small encoder-decoder producing per-class mask logits at input resolution.

    Layout for width w (64 px input): stem conv stride 2 -> w @ 32, conv stride 2 -> 2w @ 16, conv stride 2 ->
    4w @ 8 followed by a dilated 3x3 conv (receptive field > 60 px, enough to see a whole object and its
    context), then two decoder stages (bilinear x2, concatenation with the encoder feature of that scale,
    3x3 conv) back to w @ 32, a 1x1 conv to C logits and bilinear upsampling to the input size
    (``align_corners=False``). Every conv is followed by BatchNorm and ReLU except the last. With w = 16 it
    has ~0.1 M parameters and costs ~25 MMAC per 64 px image.
    """

    def __init__(self, num_classes: int, image_size: int | None = None, width: int = 16):
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        w = int(width)
        self.enc1 = nn.Sequential(_conv_bn_relu(3, w, stride=2), _conv_bn_relu(w, w))  # 1/2
        self.enc2 = nn.Sequential(_conv_bn_relu(w, 2 * w, stride=2), _conv_bn_relu(2 * w, 2 * w))  # 1/4
        self.enc3 = nn.Sequential(_conv_bn_relu(2 * w, 4 * w, stride=2), _conv_bn_relu(4 * w, 4 * w),
                                  _conv_bn_relu(4 * w, 4 * w, dilation=2))  # 1/8
        self.dec2 = _conv_bn_relu(4 * w + 2 * w, 2 * w)  # 1/4
        self.dec1 = _conv_bn_relu(2 * w + w, w)  # 1/2
        self.head = nn.Conv2d(w, num_classes, 1)

    @staticmethod
    def _up(x: Tensor, like: Tensor) -> Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        f1 = self.enc1(x)
        f2 = self.enc2(f1)
        f3 = self.enc3(f2)
        d2 = self.dec2(torch.cat([self._up(f3, f2), f2], dim=1))
        d1 = self.dec1(torch.cat([self._up(d2, f1), f1], dim=1))
        logits = self.head(d1)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class DeepLabV3Explainer(nn.Module):
    """torchvision's DeepLabV3-ResNet50 returning only the ``out`` logits (B, C, H, W)."""

    def __init__(self, num_classes: int, pretrained_backbone: bool = False):
        super().__init__()
        import torchvision
        from torchvision.models.segmentation import deeplabv3_resnet50 as tv_deeplab

        weights_backbone = None
        if pretrained_backbone:
            weights_backbone = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
        try:
            self.net = tv_deeplab(weights=None, weights_backbone=weights_backbone, num_classes=num_classes,
                                  aux_loss=False)
        except Exception as exc:  # no internet and no cached weight file
            raise MaskbenchError(
                f"Could not load the ImageNet ResNet-50 backbone weights for the DeepLabV3 Explainer "
                f"({weights_backbone}): {type(exc).__name__}: {exc}. Without internet, put the torchvision "
                f"weight file in $TORCH_HOME/hub/checkpoints, or use pretrained_backbone=False (the paper's "
                f"from-scratch setting)."
            ) from None
        self.num_classes = num_classes
        self.pretrained_backbone = pretrained_backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)["out"]


def deeplabv3_resnet50(num_classes: int, pretrained_backbone: bool = False) -> DeepLabV3Explainer:
    """The paper's Explainer: DeepLabV3-ResNet50 with ``num_classes`` output channels (see module docstring)."""
    return DeepLabV3Explainer(num_classes, pretrained_backbone=pretrained_backbone)


def build_segnet(arch: str, num_classes: int, image_size: int | None = None, **kw: Any) -> nn.Module:
    """Build an Explainer network by name: ``"small"`` (``width``) or ``"deeplabv3_resnet50"``
    (``pretrained_backbone``). Options that do not apply to the chosen architecture are ignored."""
    if arch == "small":
        return SmallSegNet(num_classes, image_size, width=int(kw.get("width", 16)))
    if arch == "deeplabv3_resnet50":
        return deeplabv3_resnet50(num_classes, pretrained_backbone=bool(kw.get("pretrained_backbone", False)))
    raise UnknownNameError("segmentation network", arch, SEGNETS)
