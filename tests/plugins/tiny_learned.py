"""A minimal learned method for the tests of the shared training machinery (not a real attribution method)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from maskbench.methods import register_method
from maskbench.methods.learned import LearnedMethod


@register_method("test-tiny-learned")
@dataclass
class TinyLearned(LearnedMethod):
    """One 3x3 convolution to C mask logits, trained to keep the classifier's answer on x * mask."""

    lr: float = 1e-2
    batch_size: int = 8
    max_epochs: int = 2
    patience: int = 10

    def build_network(self, num_classes, image_size, model):
        return nn.Conv2d(3, num_classes, 3, padding=1)

    def training_loss(self, net, model, images, labels, generator=None):
        masks = torch.sigmoid(net(images))
        m = (masks * labels[:, :, None, None]).amax(1, keepdim=True)
        bce = F.binary_cross_entropy_with_logits(model(images * m), labels)
        area = m.mean()
        return {"loss": bce + 0.1 * area, "bce": bce, "area": area}

    def predict(self, net, model, images):
        return torch.sigmoid(net(images))
