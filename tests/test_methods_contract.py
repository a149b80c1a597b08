"""Contract tests run over every registered method (timm/Captum style): shape, range, determinism,
batch invariance, and the explained model left frozen and in eval mode. Learned methods are first trained
for one short epoch on a tiny synthetic set. Methods registered by the tests themselves (``test-*``) are
left out."""

import dataclasses

import pytest
import torch
from mb_testutils import TwoRegionNet, make_batch, quadrant, region_scores, tiny_model

from maskbench.classifiers import freeze
from maskbench.core.errors import MaskbenchError, MethodError, UnknownNameError
from maskbench.methods import METHODS, build_method, check_masks, normalize_maps

H = W = 32
C = 6
CONTRACT_METHODS = METHODS.list(exclude="test-*")


@pytest.fixture(scope="module")
def learned_context(tmp_path_factory):
    from maskbench.datasets import build_dataset, generate_synthetic
    from maskbench.methods import MethodContext

    root = tmp_path_factory.mktemp("contract-synthetic")
    generate_synthetic(root, n_train=32, n_val=8, n_test=4, image_size=H, seed=7)
    return lambda model: MethodContext(
        model=model, dataset="synthetic", datasets=lambda split: build_dataset("synthetic", root=root, split=split),
        num_classes=C, device=torch.device("cpu"), cache_dir=root / "cache", seed=0, progress=False,
        classifier_key="contract",
    )


def fast(name, ctx_factory=None, model=None):
    overrides = {"rise": {"num_masks": 64}}.get(name, {})
    if METHODS.get(name).family == "learned":
        overrides = {"max_epochs": 1}
    method = build_method(name, preset="fast", **overrides)
    if method.family == "learned":
        method.setup(ctx_factory(model))
    return method


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(C)
    images = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(0))
    cm = torch.zeros(3, C, H, W)
    cm[0, 0, :16, :16] = 1
    cm[1, 1, 8:24, 8:24] = 1
    cm[1, 2, :8] = 1
    cm[2, 3, 16:, 16:] = 1
    batch = make_batch([[0], [1, 2], [3]], cm, images=images, num_classes=C)
    classes = torch.tensor([[0, 1], [1, 2], [3, 0]])
    return model, batch, classes


def explain(method, model, batch, classes, idx=None):
    if idx is not None:
        sub = make_batch(
            [torch.nonzero(batch.labels[i]).flatten().tolist() for i in idx],
            batch.class_masks[idx].float(), images=batch.images[idx], num_classes=C,
        )
        return method.explain(model, sub.images, classes[idx], batch=sub if method.uses_ground_truth else None)
    return method.explain(model, batch.images, classes, batch=batch if method.uses_ground_truth else None)


@pytest.mark.parametrize("name", CONTRACT_METHODS)
def test_contract(name, setup, learned_context):
    model, batch, classes = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    method = fast(name, learned_context, model)
    out = explain(method, model, batch, classes)
    assert out.shape == (3, 2, H, W)
    assert out.dtype.is_floating_point
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert not check_masks(out, batch.images, classes, name).any()
    # deterministic under a fixed seed
    again = explain(fast(name, learned_context, model), model, batch, classes)
    assert torch.equal(out, again)
    # batched == one image at a time
    single = torch.cat([explain(method, model, batch, classes, [i]) for i in range(3)])
    torch.testing.assert_close(single, out, atol=1e-5, rtol=1e-4)
    # the explained model stays frozen and in eval mode, its weights and BatchNorm buffers untouched
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


MEMORY_KNOBS = {n: [f for f in METHODS.get(n).not_in_key if f not in ("max_train_seconds", "checkpoint_every")]
                for n in CONTRACT_METHODS}


@pytest.mark.parametrize("name", [n for n in CONTRACT_METHODS if MEMORY_KNOBS[n]])
def test_memory_knobs_change_neither_the_masks_nor_the_cache_key(name, setup):
    """A field in ``not_in_key`` (``max_batch``, RISE's ``batch_size``) only says how much work goes through the
    model at once: with 1 (every row, or every mask, in its own pass) the masks equal those of the default
    chunking, and the cache key is the same, so changing it recomputes nothing and must change nothing."""
    model, batch, classes = setup
    for knob in MEMORY_KNOBS[name]:
        default = fast(name, model=model)
        small = fast(name, model=model)
        setattr(small, knob, 1)
        assert getattr(default, knob) != 1
        assert small.cache_key() == default.cache_key(), knob
        torch.testing.assert_close(explain(small, model, batch, classes), explain(default, model, batch, classes),
                                   atol=1e-5, rtol=1e-4)
        changed = fast(name, model=model)
        numeric = [f.name for f in dataclasses.fields(changed) if f.name not in changed.not_in_key
                   and type(getattr(changed, f.name)) in (int, float)]
        for other in numeric[:1]:  # a hyperparameter that matters is in the key (Grad-CAM has none besides)
            setattr(changed, other, getattr(changed, other) + 1)
            assert changed.cache_key() != default.cache_key(), other


def test_ground_truth_method_returns_the_class_masks(setup):
    model, batch, classes = setup
    out = explain(build_method("ground-truth"), model, batch, classes)
    assert torch.equal(out[1, 0], batch.class_masks[1, 1].float())
    assert torch.equal(out[1, 1], batch.class_masks[1, 2].float())
    assert out[2, 1].sum() == 0  # class 0 is not in image 2


@pytest.mark.parametrize("name", ["gradcam", "gradcam++"])
def test_gradcam_is_class_sensitive_and_normalised(name):
    """TwoRegionNet (mb_testutils): class 0's evidence lies only in the top-left quadrant, class 1's only in the
    bottom-right one, and the two share no feature of the CAM layer. The map of class c, ReLU(sum_k w_k^c A^k),
    weighs only class c's channels, which are zero outside its quadrant: class 0's map must lie in the top-left
    quadrant and class 1's in the bottom-right one, whichever slot the class takes and when it is repeated.
    A class-blind map (both classes' evidence, class 1's weighted 3x) would peak bottom-right for class 0 too.
    Every map is min-max normalised: minimum 0, maximum 1."""
    model = freeze(TwoRegionNet(H))
    images = torch.randn(4, 3, H, W, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[0, 1], [1, 0], [0, 0], [1, 1]])
    out = build_method(name).explain(model, images, classes)
    assert out.shape == (4, 2, H, W) and out.min() >= 0 and out.max() <= 1
    flat = out.flatten(2)
    torch.testing.assert_close(flat.amax(2), torch.ones(4, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat.amin(2), torch.zeros(4, 2), rtol=0, atol=1e-6)
    for c, which in ((0, "top-left"), (1, "bottom-right")):
        maps = out[classes == c]  # (4, H, W): every map of class c
        region = quadrant(H, which)
        share_top, inside, outside = region_scores(maps, region)
        assert (share_top == 1).all(), (c, share_top)  # the top 10 % of each map's pixels lie in the quadrant
        assert region.flatten()[maps.flatten(1).argmax(1)].bool().all(), c  # and so does the peak
        assert (outside <= 0.01 * inside).all(), (c, inside, outside)  # (exactly 0 outside, before the resize)


def test_normalize_maps_constant_and_range():
    maps = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 3.0), torch.arange(16.0).view(4, 4)])
    out = normalize_maps(maps)
    assert torch.equal(out[0], torch.zeros(4, 4))
    assert torch.equal(out[1], torch.ones(4, 4))
    assert out[2].min() == 0 and out[2].max() == 1


def test_presets_and_errors():
    assert build_method("rise").num_masks == 8000  # paper defaults
    assert build_method("rise", preset="fast").num_masks == 1000
    assert build_method("rise.paper", preset="fast").num_masks == 8000  # dotted preset wins
    assert build_method("constant-0.5").name == "constant-0.5"
    with pytest.raises(UnknownNameError, match="Valid method names"):
        build_method("gradcamm")
    with pytest.raises(UnknownNameError, match="fast, paper"):
        build_method("rise.huge")
    with pytest.raises(MaskbenchError, match="num_maskz"):
        build_method("rise", num_maskz=3)


def test_check_masks_rejects_contract_violations():
    images = torch.zeros(2, 3, 4, 4)
    classes = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(MethodError, match="shape"):
        check_masks(torch.zeros(2, 4, 4), images, classes, "m")
    with pytest.raises(MethodError, match=r"\[0, 1\]"):
        check_masks(torch.full((2, 1, 4, 4), 2.0), images, classes, "m")
    nan = torch.zeros(2, 1, 4, 4)
    nan[1, 0, 0, 0] = float("nan")
    assert check_masks(nan, images, classes, "m").tolist() == [False, True]


def test_the_paper_preset_selects_each_published_settings_values():
    """NN-Explainer's four training configs (src/config_files/explainer_training/*.cfg): the Explainer's paper
    preset differs between VGG16-VOC, ResNet50-VOC, VGG16-COCO and ResNet50-COCO exactly as they do, on the
    ImageNet-pretrained DeepLabV3 backbone; other presets and unknown settings keep the preset's values."""
    published = {  # lr, lambda_e, lambda_tv, lambda_ac, lambda_ta, lambda_nc, patience
        "vgg16-voc": (1e-5, 1.0, 1.0, 1.0, 0.1, 0.3, 5),
        "resnet50-voc": (1e-4, 3.0, 1.0, 0.8, 0.01, 0.3, 5),
        "vgg16-coco": (1e-5, 1.0, 0.3, 0.3, 0.03, 0.1, 2),
        "resnet50-coco": (1e-5, 3.0, 0.05, 0.1, 0.01, 0.03, 2),
    }
    fields_ = ("lr", "lambda_e", "lambda_tv", "lambda_ac", "lambda_ta", "lambda_nc", "patience")
    for setting, values in published.items():
        m = build_method("explainer", setting=setting)
        assert tuple(getattr(m, f) for f in fields_) == values, setting
        assert m.arch == "deeplabv3_resnet50" and m.pretrained_backbone and m.setting == setting
        assert build_method("rtis", setting=setting).pretrained_backbone
    keys = {build_method("explainer", setting=s).cache_key() for s in published}
    assert len(keys) == 4  # four different networks
    fast = build_method("explainer", preset="fast", setting="resnet50-voc")
    assert fast.lr == 3e-3 and fast.setting is None  # a preset other than paper is not a published run
    assert build_method("explainer", setting="smallcnn-synthetic").setting is None
    assert build_method("explainer", setting="resnet50-voc", lr=0.5).lr == 0.5  # --param still wins
