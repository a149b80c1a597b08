"""Distribution-guided mask predictor (methods/dgmp.py): controller, feature filter and fine-tuning on hand-made
values, then a very short training on a tiny synthetic set (shapes, range, frozen classifier, shared checkpoint)."""

import json
import math
from pathlib import Path

import pytest
import torch

from maskbench.classifiers import SmallCNN, freeze
from maskbench.core.images import gaussian_blur
from maskbench.methods import MethodContext, build_method
from maskbench.methods.dgmp import (
    basic_transform,
    blur,
    class_feature_filter,
    customised_transform,
    extra_importance,
    fine_tune_scores,
    insertion_points,
    instance_normalize,
    interpolate_curve,
    monotone_curve,
)

C = 6


# -- distribution controller ----------------------------------------------------------------------------------
def test_instance_normalisation_zero_mean_unit_variance_per_map():
    maps = torch.randn(3, 5, 7, 9, generator=torch.Generator().manual_seed(0)) * 4 + 3
    maps[0, 0] *= 100  # very different scales per map
    z = instance_normalize(maps)
    torch.testing.assert_close(z.mean(dim=(-2, -1)), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(dim=(-2, -1), unbiased=False), torch.ones(3, 5), atol=1e-3, rtol=0)
    assert torch.isfinite(instance_normalize(torch.ones(1, 4, 4))).all()  # constant map: no NaN


def test_transformers_on_known_values():
    z = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.equal(basic_transform(z), torch.tensor([0.0, 0.0, 0.0, 0.5, 3.0]))
    cf = customised_transform(z, eta=1.5, h=2.5)
    assert cf[2].item() == pytest.approx(0.5**2.5)
    assert cf[4].item() == pytest.approx((1 / (1 + math.exp(-4.5))) ** 2.5)
    assert cf[0].item() == pytest.approx((1 / (1 + math.exp(3.0))) ** 2.5)
    assert ((cf > 0) & (cf < 1)).all()


def test_transformers_are_rank_preserving():
    z = torch.randn(1000, generator=torch.Generator().manual_seed(1)).sort().values
    cf = customised_transform(z)
    assert (cf.diff() > 0).all()  # strictly increasing
    assert (basic_transform(z).diff() >= 0).all()
    pos = z > 0
    assert (basic_transform(z)[pos].diff() > 0).all()


def test_customised_transform_is_right_skewed_with_papers_setting():
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    m = customised_transform(z)
    assert m.median() < m.mean()  # long right tail (Sec. 3.2.3)
    assert m.median().item() == pytest.approx(0.5**2.5, abs=0.01)


# -- class feature filter (eq. 10) ------------------------------------------------------------------------------
def test_class_feature_filter_on_a_2x2_map():
    # X: 2 channels on a 2x2 map; C_s = (1, -1): X^T C_s = x0 - x1
    x = torch.tensor([[[[1.0, 0.0], [2.0, 0.5]],
                       [[0.0, 1.0], [2.0, 0.0]]]])
    emb = torch.tensor([[1.0, -1.0]])
    y, act = class_feature_filter(x, emb)
    expected_act = torch.tensor([[[1.0, -1.0], [0.0, 0.5]]])
    torch.testing.assert_close(act, expected_act)
    gate = torch.sigmoid(expected_act)
    torch.testing.assert_close(y, x * gate[:, None])
    assert y[0, 0, 1, 0].item() == pytest.approx(2.0 * 0.5)  # act 0 -> gate 1/2
    assert y[0, 1, 0, 1].item() == pytest.approx(1 / (1 + math.e))  # x = 1, act -1


# -- fine-tuning (Sec. 3.3) ---------------------------------------------------------------------------------------
def test_extra_importance_on_a_hand_made_curve():
    q = torch.tensor([0.1, 0.5, 0.3, 0.9])
    torch.testing.assert_close(monotone_curve(q), torch.tensor([0.1, 0.5, 0.5, 0.9]))
    torch.testing.assert_close(extra_importance(q), torch.tensor([0.8, 0.4, 0.4, 0.0]))


def test_insertion_points_and_interpolation():
    assert insertion_points(10, 4).tolist() == [0, 3, 7, 10]
    assert insertion_points(4, 5).tolist() == [0, 1, 2, 3, 4]
    out = interpolate_curve(torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([0, 2, 4]), 4)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 1.0, 2.0, 3.0]]))
    # more points than pixels: repeated positions [0, 0, 1, 2, 2], the later sample wins
    pos = insertion_points(2, 5)
    assert pos.tolist() == [0, 0, 1, 2, 2]
    out = interpolate_curve(torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8]), pos, 2)
    torch.testing.assert_close(out, torch.tensor([0.2, 0.4, 0.8]))


def test_fine_tune_scores_weights_by_the_insertion_curve():
    # 4 pixels, scores in shuffled order; q sampled at 0..4 kept pixels
    scores = torch.tensor([[0.4, 0.9, 0.1, 0.7]])  # ranks: 0.9 (1st), 0.7, 0.4, 0.1
    q = torch.tensor([[0.05, 0.1, 0.5, 0.3, 0.9]])  # monotone: .05 .1 .5 .5 .9 -> v_1..4 = .8 .4 .4 0
    out = fine_tune_scores(scores, q, insertion_points(4, 5))
    expected = torch.tensor([[0.4 * 0.4, 0.9 * 0.8, 0.0, 0.7 * 0.4]]) / (0.9 * 0.8)
    torch.testing.assert_close(out, expected)
    v_pos = out > 0
    assert torch.equal(out[v_pos].argsort(), scores[v_pos].argsort())  # order kept where v > 0
    # tied scores share the mean of their v: pixels 0 and 2 take ranks 1 and 2 (v = .8 and .4)
    tied = fine_tune_scores(torch.tensor([[0.5, 0.2, 0.5, 0.1]]), q, insertion_points(4, 5))
    torch.testing.assert_close(tied, torch.tensor([[1.0, 0.2 * 0.4 / (0.5 * 0.6), 1.0, 0.0]]))
    # a flat curve (the perturbed image already scores the maximum) keeps the untuned ranking
    flat = fine_tune_scores(scores, torch.full((1, 5), 0.7), insertion_points(4, 5))
    torch.testing.assert_close(flat, scores / 0.9)


def test_fine_tune_scores_rank_order_on_random_maps():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 100, generator=g)
    q = torch.rand(5, 11, generator=g)
    out = fine_tune_scores(scores, q, insertion_points(100, 11))
    assert out.min() >= 0 and out.max() <= 1
    for r, o in zip(scores, out, strict=True):
        order = r.argsort(descending=True)
        assert (o[order].diff() <= 1e-6).all()  # non-increasing along the score ranking


def test_matrix_blur_equals_the_shared_gaussian_blur():
    x = torch.randn(2, 3, 20, 24, generator=torch.Generator().manual_seed(4))
    for sigma in (0.7, 2.86, 8.0):
        torch.testing.assert_close(blur(x, sigma), gaussian_blur(x, sigma), atol=1e-5, rtol=0)


# -- a very short training on a tiny synthetic set -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from maskbench.datasets import build_dataset, generate_synthetic

    root = generate_synthetic(tmp_path_factory.mktemp("dgmp") / "synth", n_train=64, n_val=16, n_test=8,
                              image_size=32)

    def datasets(split):
        return build_dataset("synthetic", root=root, split=split)

    # a briefly trained classifier (its output must depend on the image for the mask to matter)
    torch.manual_seed(0)
    model = SmallCNN(C, widths=(4, 8, 8, 8))
    train = datasets("train")
    x = torch.stack([train[i].image for i in range(len(train))])
    y = torch.stack([train[i].label for i in range(len(train))])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    freeze(model)

    cache = tmp_path_factory.mktemp("dgmp-cache")
    ctx = MethodContext(model, "synthetic-tiny", datasets, C, torch.device("cpu"), Path(cache), progress=False,
                        classifier_key="tiny")
    return model, datasets, ctx


SHORT = {"max_epochs": 1, "filter_images": 64, "decoder_width": 4, "batch_size": 16}


def test_training_loss_is_deterministic_under_the_generator(tiny):
    model, datasets, _ = tiny
    method = build_method("dgmp-cf", preset="fast", **SHORT)
    torch.manual_seed(0)
    net = method.build_network(C, 32, model).eval()
    val = datasets("val")
    x = torch.stack([val[i].image for i in range(8)])
    y = torch.stack([val[i].label for i in range(8)])
    with torch.no_grad():
        a = method.training_loss(net, model, x, y, torch.Generator().manual_seed(5))
        b = method.training_loss(net, model, x, y, torch.Generator().manual_seed(5))
        c = method.training_loss(net, model, x, y, torch.Generator().manual_seed(6))
    assert torch.equal(a["loss"], b["loss"])
    assert not torch.equal(a["loss"], c["loss"])  # the substrate is drawn from the generator
    assert 0 < a["mask"] < 1 and torch.isfinite(a["loss"])


def test_training_reduces_the_masked_classification_loss(tiny):
    model, datasets, _ = tiny
    method = build_method("dgmp-cf", preset="fast", **SHORT)
    torch.manual_seed(0)
    net = method.build_network(C, 32, model)
    train = datasets("train")
    x = torch.stack([train[i].image for i in range(16)])
    y = torch.stack([train[i].label for i in range(16)])
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(25):
        loss = method.training_loss(net, model, x, y, torch.Generator().manual_seed(0))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name", ["dgmp-bf", "dgmp-cf"])
def test_short_training_masks_and_frozen_classifier(tiny, name):
    model, datasets, ctx = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method(name, preset="fast", **SHORT)
    info = method.setup(ctx)
    assert info["trained_here"] and info["filter_steps"] == 4 and info["epochs"] == 1
    assert Path(info["checkpoint"]).is_file()
    # the classifier: frozen, eval, parameters and BatchNorm buffers bit-identical
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    test = datasets("test")
    images = torch.stack([test[i].image for i in range(4)])
    classes = torch.tensor([[0, 1, 5], [2, 2, 3], [4, 0, 1], [5, 3, 2]])
    masks = method.explain(model, images, classes)
    assert masks.shape == (4, 3, 32, 32) and torch.isfinite(masks).all()
    assert masks.min() >= 0 and masks.max() <= 1
    assert torch.equal(masks[1, 0], masks[1, 1])  # a repeated class gives the same map
    assert not torch.allclose(masks[0, 0], masks[0, 1])  # class-specific
    if name == "dgmp-bf":
        assert torch.allclose(masks.flatten(2).amax(2), torch.ones(4, 3), atol=0.05)  # divided by the max
    # all classes at once (predict) agree with explain; one image at a time agrees with the batch
    full = method.predict(method._net, model, images)
    torch.testing.assert_close(torch.gather(full, 1, classes[:, :, None, None].expand(-1, -1, 32, 32)), masks)
    single = torch.cat([method.explain(model, images[i : i + 1], classes[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(single, masks, atol=1e-5, rtol=1e-4)


def test_fine_tuned_variant_reuses_the_dgmp_cf_checkpoint(tiny):
    model, datasets, ctx = tiny
    cf = build_method("dgmp-cf", preset="fast", **SHORT)
    cf_info = cf.setup(ctx)  # trained by the previous test or here
    files = sorted((ctx.cache_dir / "learned").iterdir())
    ft = build_method("dgmp-cf-ft", preset="fast", ft_points=9, **SHORT)
    assert ft.training_key(ctx) == cf.training_key(ctx)
    info = ft.setup(ctx)
    assert info["trained_here"] is False and info["checkpoint"] == cf_info["checkpoint"]
    assert info["network_of"] == "dgmp-cf"
    assert sorted((ctx.cache_dir / "learned").iterdir()) == files  # nothing new written
    assert json.loads(Path(info["checkpoint"]).with_suffix(".json").read_text())["epochs"] == 1
    test = datasets("test")
    images = torch.stack([test[i].image for i in range(3)])
    classes = torch.tensor([[0, 4], [1, 2], [3, 5]])
    raw = ft.raw_masks(ft._net, model, images, classes)  # dgmp-cf's masks, one image per pass
    torch.testing.assert_close(raw, cf.explain(model, images, classes), atol=1e-5, rtol=0)
    tuned = ft.explain(model, images, classes)
    assert tuned.shape == raw.shape and tuned.min() >= 0 and tuned.max() <= 1
    assert torch.allclose(tuned.flatten(2).amax(2), torch.ones(3, 2))
    # ranks of the raw map are kept (weakly): sorting by the raw score gives non-increasing tuned scores
    r, t = raw.flatten(2), tuned.flatten(2)
    order = r.argsort(dim=-1, descending=True, stable=True)
    assert (torch.gather(t, -1, order).diff(dim=-1) <= 1e-6).all()
    assert torch.equal(tuned, ft.explain(model, images, classes))  # deterministic


# -- objective: the paper's (predicted class, softmax CE) on a softmax classifier, multi-label BCE otherwise --------
def _softmax_smallcnn() -> SmallCNN:
    torch.manual_seed(0)
    model = freeze(SmallCNN(C))
    model.probabilities = "softmax"
    return model


def test_training_targets_follow_the_classifiers_probabilities():
    from maskbench.methods.dgmp import training_targets

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1.0, 1, 0, 0, 0, 0]] * 4)
    sigmoid_model = freeze(SmallCNN(C))
    assert training_targets("auto", sigmoid_model, images, labels) == (labels, False)
    model = _softmax_smallcnn()
    targets, softmax = training_targets("auto", model, images, labels)
    top = model(images).argmax(1)
    assert softmax and torch.equal(targets, torch.nn.functional.one_hot(top, C).float())  # labels ignored
    assert torch.equal(training_targets("multilabel", model, images, labels)[0], labels)
    assert training_targets("predicted", sigmoid_model, images, labels)[1]


def test_the_predicted_objective_is_the_softmax_cross_entropy_of_the_top1_class():
    model = _softmax_smallcnn()
    method = build_method("dgmp-cf", preset="fast")
    net = method.build_network(C, 32, model)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(3, C)
    labels[:, 5] = 1  # true labels the paper's objective must not use
    out = method.training_loss(net, model, images, labels, torch.Generator().manual_seed(7))
    # the same pairs and substrate by hand: one pair per image, the classifier's top-1 class
    top = model(images).argmax(1)
    idx = torch.arange(3)
    m = method.masks(net, method._features(model, images), idx, top, (32, 32))[:, None]
    a = method.substrate(images, idx, torch.Generator().manual_seed(7))
    expected = torch.nn.functional.cross_entropy(model(images * m + a * (1 - m)), top)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    # the multi-label objective on the same model explains class 5 of every image with its own sigmoid
    ml = build_method("dgmp-cf", preset="fast", objective="multilabel")
    out_ml = ml.training_loss(net, model, images, labels, torch.Generator().manual_seed(7))
    five = torch.full((3,), 5)
    m5 = ml.masks(net, ml._features(model, images), idx, five, (32, 32))[:, None]
    logit = model(images * m5 + a * (1 - m5))[:, 5]
    torch.testing.assert_close(out_ml["loss"], torch.nn.functional.softplus(-logit).mean(), rtol=1e-5, atol=1e-6)
