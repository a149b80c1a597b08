"""A complete maskbench method plugin: Input x Gradient (Shrikumar et al., 2016), through Captum.

Run it with
    maskbench bench --plugin examples/input_x_gradient.py --methods input-x-gradient,gradcam --limit 20
or list it with
    maskbench methods --plugin examples/input_x_gradient.py
"""

from dataclasses import dataclass

import torch

from maskbench.methods import AttributionMethod, image_class_pairs, normalize_maps, register_method


@register_method("input-x-gradient")
@dataclass
class InputXGradient(AttributionMethod):
    """|x * d y_c / d x| summed over colour channels, min-max normalised per (image, class)."""

    label = "Input x Grad"
    family = "plugin"
    paper = "Shrikumar et al., 2016 (arXiv:1605.01713)"

    def explain(self, model, images, classes, *, batch=None):
        from captum.attr import InputXGradient as CaptumIxG

        b, k = classes.shape
        x, targets = image_class_pairs(images, classes)  # one row per (image, class)
        attr = CaptumIxG(model).attribute(x, target=targets)
        maps = attr.detach().abs().sum(1).view(b, k, *images.shape[-2:])
        return normalize_maps(maps)


if __name__ == "__main__":  # a quick self-check on random input
    from maskbench.classifiers import SmallCNN, freeze

    model = freeze(SmallCNN(3))
    masks = InputXGradient().explain(model, torch.randn(2, 3, 32, 32), torch.tensor([[0, 1], [2, 2]]))
    print(masks.shape, float(masks.min()), float(masks.max()))
