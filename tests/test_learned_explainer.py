"""The learned methods (Explainer, Stalder et al. NeurIPS 2022; adapted RTIS): every loss term against values
computed by hand, the perturbations, and short end-to-end trainings on a tiny synthetic set (shape/range of
the masks, the classifier left bit-identical, checkpoint caching, determinism)."""

import math

import pytest
import torch
from torch import nn

from maskbench.classifiers import SmallCNN, freeze
from maskbench.core.errors import MaskbenchError, UnknownNameError
from maskbench.core.images import colour_noise, gaussian_blur, gaussian_kernel1d, scaled_sigma
from maskbench.datasets import build_dataset, generate_synthetic
from maskbench.methods import MethodContext, build_method
from maskbench.methods.explainer import (
    Explainer,
    aggregate_masks,
    area_bound,
    area_bound_sorted,
    classification_loss,
    mask_area,
    mean_over_true_classes,
    negative_entropy,
    total_variation,
)
from maskbench.methods.rtis import RTIS, destroyer_loss, perturb, preserver_loss, squared_total_variation
from maskbench.methods.segnets import SmallSegNet, build_segnet

GRID = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0]])

# -- loss terms --------------------------------------------------------------------------------------------------


def test_classification_loss_is_bce_averaged_over_classes():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # p = sigmoid: image 0 -> (0.5, 0.75), image 1 -> (sigmoid(2), sigmoid(-1))
    s = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    expected = [-(math.log(0.5) + math.log(1 - 0.75)) / 2, -(math.log(1 - s(2.0)) + math.log(s(-1.0))) / 2]
    torch.testing.assert_close(classification_loss(logits, labels), torch.tensor(expected))


def test_negative_entropy_of_a_known_softmax():
    p = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    expected = [(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / 3, math.log(1 / 3) / 3]
    torch.testing.assert_close(negative_entropy(p.log()), torch.tensor(expected))
    # a one-hot prediction: p clamped at 1e-16, so the value is (about) 0 and finite, not NaN
    one_hot = negative_entropy(torch.tensor([[0.0, -1e4, -1e4]]))
    assert torch.isfinite(one_hot).all() and abs(float(one_hot)) < 1e-12


def test_mask_area():
    m = torch.zeros(2, 4, 5)
    m[0, :2] = 1  # 10 of 20 pixels
    m[1] = 0.25
    torch.testing.assert_close(mask_area(m), torch.tensor([0.5, 0.25]))


def test_area_bound_counts_the_penalties_of_a_known_mask():
    # 10 pixels, a = 0.2 -> q_min has 2 ones; b = 0.5 -> q_max has 5 ones
    values = torch.tensor([0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    s = values[torch.tensor([3, 7, 0, 9, 5, 1, 8, 2, 6, 4])].view(2, 5)  # any pixel order
    # min part: (1 - 0.9) + (1 - 0.8) = 0.3; max part: 0.3 + 0.2 + 0.1 + 0 + 0 = 0.6 (ranks 5..9)
    torch.testing.assert_close(area_bound(s, 0.2, 0.5), torch.tensor((0.3 + 0.6) / 10))
    # a mask of 3 ones (between 2 and 5) is not penalised at all; batched over leading dims
    ok = torch.zeros(10)
    ok[:3] = 1
    too_small, too_big = torch.zeros(10), torch.ones(10)
    out = area_bound(torch.stack([ok, too_small, too_big]).view(3, 1, 2, 5), 0.2, 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.0], [2 / 10], [5 / 10]]))


def test_area_bound_topk_form_equals_the_sorted_form():
    gen = torch.Generator().manual_seed(0)
    for shape, a, b in [((3, 4, 9, 11), 0.05, 0.3), ((2, 8, 8), 0.0, 1.0), ((2, 8, 8), 0.3, 0.3)]:
        s = (torch.randn(*shape, generator=gen) * 1.5 + 0.3).requires_grad_()  # also values outside [0, 1]
        s2 = s.detach().clone().requires_grad_()
        fast, ref = area_bound(s, a, b), area_bound_sorted(s2, a, b)
        torch.testing.assert_close(fast, ref)
        fast.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(s.grad, s2.grad)


def test_total_variation_of_a_3x3_array():
    # vertical |diffs|: 0+1+2 + 3+0+1 = 7; horizontal: 1+1 + 0+0 + 3+1 = 6; Z = 9
    torch.testing.assert_close(total_variation(GRID), torch.tensor(13 / 9))
    torch.testing.assert_close(total_variation(torch.stack([GRID, torch.ones(3, 3)])), torch.tensor([13 / 9, 0.0]))


def test_squared_total_variation_of_a_3x3_array():
    # vertical squares: 0+1+4 + 9+0+1 = 15; horizontal: 1+1 + 0+0 + 9+1 = 12; Z = 9
    torch.testing.assert_close(squared_total_variation(GRID), torch.tensor(27 / 9))


def test_target_and_non_target_aggregation():
    s = torch.tensor([
        [[[0.1, 0.9]], [[0.7, 0.2]], [[0.3, 0.4]]],  # image 0: classes 0 and 2 true, class 1 not
        [[[0.5, 0.1]], [[0.2, 0.6]], [[0.8, 0.3]]],  # image 1: every class true -> n = 0
        [[[0.5, 0.1]], [[0.2, 0.6]], [[0.8, 0.3]]],  # image 2: no true class -> m = 0
    ])  # (3, 3, 1, 2)
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    m, n = aggregate_masks(s, labels)
    torch.testing.assert_close(m, torch.tensor([[[0.3, 0.9]], [[0.8, 0.6]], [[0.0, 0.0]]]))
    torch.testing.assert_close(n, torch.tensor([[[0.7, 0.2]], [[0.0, 0.0]], [[0.8, 0.6]]]))
    per_class = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    torch.testing.assert_close(mean_over_true_classes(per_class, labels), torch.tensor([2.0, 2.0, 0.0]))


class FixedLogits(nn.Module):
    """A stand-in classifier returning given logits (for the masked then the inverted batch), recording inputs."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        return self.logits


def test_explainer_total_loss_composition():
    torch.manual_seed(0)
    b, c = 2, 3
    s_logits = torch.randn(b, c, 4, 5)
    images = torch.randn(b, 3, 4, 5)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = torch.randn(2 * b, c)
    method = Explainer(lambda_e=2.0, lambda_tv=0.5, lambda_ac=3.0, lambda_ta=0.7, lambda_nc=0.2, min_area=0.1,
                       max_area=0.4)
    clf = FixedLogits(out)
    terms = method.loss_terms(s_logits, clf, images, labels)
    s = torch.sigmoid(s_logits)
    m = torch.maximum(s[:, 0], s[:, 2]) * torch.tensor([1.0, 0.0])[:, None, None] + s[:, 1] * torch.tensor(
        [0.0, 1.0])[:, None, None]
    n = torch.stack([s[0, 1], torch.maximum(s[1, 0], s[1, 2])])
    # masked image x * m and inverted x * (1 - m) in one batch
    torch.testing.assert_close(clf.inputs[0], torch.cat([images * m[:, None], images * (1 - m[:, None])]))
    # eq. 6: mean of B over the true classes (image 0: classes 0 and 2; image 1: class 1)
    bnd = area_bound(s, 0.1, 0.4)
    bound = ((bnd[0, 0] + bnd[0, 2]) / 2 + bnd[1, 1]) / 2
    expected = (classification_loss(out[:b], labels).mean() + 2.0 * negative_entropy(out[b:]).mean()
                + 0.7 * m.mean() + 0.2 * n.mean() + 3.0 * bound
                + 0.5 * (total_variation(m) + total_variation(n)).mean())
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["bound"], bound)


def test_rtis_preserver_destroyer_and_total():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(1 / 3), 5.0]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # pairs (0,0), (0,1), (1,0): sigmoid = 0.5, 0.75, 0.25
    torch.testing.assert_close(preserver_loss(logits, labels),
                               torch.tensor(-(math.log(0.5) + math.log(0.75) + math.log(0.25)) / 3))
    torch.testing.assert_close(destroyer_loss(logits, labels), torch.tensor(0.5))
    # total: 10 TV2 + 1 A + P + 5 D^0.3, Phi(x, m) = m x + (1 - m) alt and Phi(x, 1 - m)
    torch.manual_seed(1)
    s_logits = torch.randn(2, 2, 3, 3)
    images, alt = torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3)
    out = torch.cat([torch.randn(2, 2), logits])  # preserved batch, then destroyed batch
    clf = FixedLogits(out)
    terms = RTIS().loss_terms(s_logits, clf, images, labels, alt)
    m = torch.stack([torch.sigmoid(s_logits[0]).amax(0), torch.sigmoid(s_logits[1, 0])])
    torch.testing.assert_close(clf.inputs[0], torch.cat([perturb(images, m, alt), perturb(images, 1 - m, alt)]))
    expected = (10 * squared_total_variation(m).mean() + m.mean() + preserver_loss(out[:2], labels)
                + 5 * 0.5**0.3)
    torch.testing.assert_close(terms["loss"], expected)


# -- perturbations ------------------------------------------------------------------------------------------------


def test_colour_noise_std_and_per_channel_offset():
    gen = torch.Generator().manual_seed(5)
    x = colour_noise((4, 3, 128, 128), generator=gen)
    again = torch.Generator().manual_seed(5)
    torch.randn(4, 3, 128, 128, generator=again)  # same draw order: noise, then offsets
    offset = (torch.rand(4, 3, 1, 1, generator=again) * 2 - 1) * 0.33
    std = x.flatten(2).std(-1)
    mean = x.flatten(2).mean(-1)
    assert torch.allclose(std, torch.full_like(std, 0.11), atol=0.004)
    assert torch.allclose(mean, offset.view(4, 3), atol=0.003)
    assert offset.abs().max() < 0.33 and offset.std() > 0.05
    assert torch.equal(x, colour_noise((4, 3, 128, 128), generator=torch.Generator().manual_seed(5)))


def test_gaussian_blur_matches_a_2d_convolution():
    k = gaussian_kernel1d(1.5)
    assert k.numel() == 2 * math.ceil(4 * 1.5) + 1 and abs(float(k.sum()) - 1) < 1e-6
    x = torch.randn(2, 3, 20, 17, generator=torch.Generator().manual_seed(0))
    k2 = torch.outer(k, k)[None, None].repeat(3, 1, 1, 1)
    r = (k.numel() - 1) // 2
    ref = torch.nn.functional.conv2d(x, k2, padding=r, groups=3)  # zero padding
    torch.testing.assert_close(gaussian_blur(x, 1.5), ref, atol=1e-5, rtol=1e-5)
    const = torch.full((1, 1, 8, 8), 2.0)
    torch.testing.assert_close(gaussian_blur(const, 3.0, padding="replicate"), const)
    assert gaussian_blur(const, 3.0)[0, 0, 0, 0] < 2.0  # zero padding fades to the mean colour
    assert scaled_sigma(10.0, 64) == pytest.approx(10 * 64 / 224)


# -- networks ----------------------------------------------------------------------------------------------------


def test_segnets_shapes_and_errors(monkeypatch):
    net = build_segnet("small", 6, 40, width=4)
    assert isinstance(net, SmallSegNet)
    assert net(torch.randn(2, 3, 40, 40)).shape == (2, 6, 40, 40)
    with pytest.raises(UnknownNameError, match="deeplabv3_resnet50"):
        build_segnet("unet", 6, 64)
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no internet")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(MaskbenchError, match="pretrained_backbone=False"):
        build_segnet("deeplabv3_resnet50", 6, 64, pretrained_backbone=True)


def test_presets():
    paper = build_method("explainer")
    assert (paper.arch, paper.lr, paper.batch_size, paper.patience, paper.seed) == ("deeplabv3_resnet50", 1e-5, 16,
                                                                                     5, 42)
    assert (paper.lambda_e, paper.lambda_tv, paper.lambda_ac, paper.lambda_ta, paper.lambda_nc) == (1, 1, 1, .1, .3)
    assert (paper.min_area, paper.max_area) == (0.05, 0.3)
    assert set(Explainer.HYPERPARAMETERS) == {"vgg16-voc", "resnet50-voc", "vgg16-coco", "resnet50-coco"}
    fast = build_method("explainer.fast")
    assert (fast.arch, fast.lr, fast.batch_size) == ("small", 3e-3, 32)
    assert (fast.max_steps, fast.max_train_seconds) == (2000, None)  # a step budget, no wall-clock cap
    rtis = build_method("rtis")
    assert (rtis.lambda_tv, rtis.lambda_area, rtis.lambda_preserver, rtis.lambda_destroyer) == (10, 1, 1, 5)
    assert build_method("rtis.fast").arch == "small"


# -- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, n_train=64, n_val=16, n_test=8, image_size=32)
    torch.manual_seed(0)
    model = SmallCNN(6, widths=(4, 8, 8, 8))
    for mod in model.modules():  # non-trivial BatchNorm statistics: train() would change them
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    freeze(model)

    def datasets(split):
        return build_dataset("synthetic", root=root, split=split, image_size=32)

    return model, datasets


def _context(tiny, cache_dir):
    model, datasets = tiny
    return MethodContext(model, "synthetic-tiny", datasets, 6, torch.device("cpu"), cache_dir, progress=False,
                         classifier_key="tiny")


def _method(name):
    return build_method(name, preset="fast", max_epochs=1, width=4, batch_size=16)


@pytest.mark.parametrize("name", ["explainer", "rtis"])
def test_training_end_to_end(name, tiny, tmp_path):
    model, datasets = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = _method(name)
    info = method.setup(_context(tiny, tmp_path / "a"))
    assert info["trained_here"] and info["epochs"] == 1 and info["steps"] == 4
    # the classifier's parameters and BatchNorm buffers are bit-identical, still frozen and in eval()
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    test = datasets("test")
    images = torch.stack([test[i].image for i in range(4)])
    classes = torch.tensor([[0, 3], [1, 1], [5, 2], [4, 0]])
    masks = method.explain(model, images, classes)
    assert masks.shape == (4, 2, 32, 32) and masks.dtype == torch.float32
    assert torch.isfinite(masks).all() and masks.min() >= 0 and masks.max() <= 1
    torch.testing.assert_close(masks[1, 0], masks[1, 1])  # a repeated class gives the same map
    # a second setup loads the cached checkpoint instead of training
    cached = _method(name)
    info2 = cached.setup(_context(tiny, tmp_path / "a"))
    assert info2["trained_here"] is False and info2["checkpoint"] == info["checkpoint"]
    assert torch.equal(cached.explain(model, images, classes), masks)
    # deterministic under the seed: training again from scratch elsewhere gives the same network and masks, and
    # another seed another network (the training machinery: test_learned_base.py, with a noisier tiny method)
    again = _method(name)
    info3 = again.setup(_context(tiny, tmp_path / "b"))
    assert info3["trained_here"] and info3["best_val_loss"] == info["best_val_loss"]
    for k, v in again._net.state_dict().items():
        assert torch.equal(v, method._net.state_dict()[k]), k
    assert torch.equal(again.explain(model, images, classes), masks)
    other = build_method(name, preset="fast", max_epochs=1, width=4, batch_size=16, seed=7)
    assert other.setup(_context(tiny, tmp_path / "c"))["trained_here"]
    assert not all(torch.equal(v, method._net.state_dict()[k]) for k, v in other._net.state_dict().items())
