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


@register_method("test-tiny-learned-noisy")
@dataclass
class TinyLearnedNoisy(TinyLearned):
    """TinyLearned drawing on every state a resumed training must restore: input noise from the training
    generator, dropout (the global random generator) and a learning-rate schedule (halved every 2 epochs: a
    schedule that restarts from its first epoch gives other rates)."""

    noise: float = 0.1
    dropout: float = 0.2

    def build_network(self, num_classes, image_size, model):
        return nn.Sequential(nn.Conv2d(3, num_classes, 3, padding=1), nn.Dropout2d(self.dropout))

    def lr_scheduler(self, opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def training_loss(self, net, model, images, labels, generator=None):
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        return super().training_loss(net, model, images + self.noise * noise, labels, generator)


@register_method("test-tiny-learned-noisy-twin")
@dataclass
class TinyLearnedNoisyTwin(TinyLearnedNoisy):
    """The same training under another name (so another checkpoint): a reference trained in the same run."""
