"""Contract tests run over every registered classifier: logits (B, C), the layers the methods read (their forward
hooks fire), ``freeze``, the checkpoint round trip and the errors of a damaged checkpoint; and the known answers
of ``class_average_precision`` (the classifiers' validation / test mAP).

The torchvision classifiers are built with ``pretrained_backbone=False`` (no download) on 32 x 32 inputs: VGG-16
and ResNet-50 stride 32, so their last stage is 1 x 1, which is all the contract needs. The random initialisations
run under ``torch.random.fork_rng`` so that the global random state is left as it was."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maskbench.classifiers import CLASSIFIERS, build_classifier, freeze, load_checkpoint
from maskbench.classifiers.base import class_average_precision
from maskbench.core.checkpoints import save_checkpoint
from maskbench.core.errors import MaskbenchError

C = 5
SIZE = 32
CPU = torch.device("cpu")
CONTRACT_CLASSIFIERS = CLASSIFIERS.list()
# options that keep a build offline (build_classifier passes them to the architecture)
OFFLINE = {"vgg16": {"pretrained_backbone": False}, "resnet50": {"pretrained_backbone": False}}
FROM_SCRATCH = {"smallcnn", "grid-smallcnn"}  # no pretrained weights at all (grid-smallcnn: smallcnn per grid cell)
# outputs of each classifier in these tests: grid-smallcnn has 4 cells x C (its head, per cell, has C rows)
CLASS_COUNTS = {"grid-smallcnn": 4 * C}


def classes_of(name: str) -> int:
    return CLASS_COUNTS.get(name, C)


def build(name: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(name, classes_of(name), **OFFLINE.get(name, {}))
        for m in model.modules():  # non-default BatchNorm statistics, so the buffers are part of the round trip
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=CONTRACT_CLASSIFIERS)
def built(request):
    """(name, model, another model of the same architecture with other weights), built once per classifier."""
    return request.param, build(request.param, 0), build(request.param, 1)


def test_torchvision_classifiers_are_built_offline_here():
    """Every registered classifier except the from-scratch ones (SmallCNN, and grid-smallcnn built of it) takes
    ``pretrained_backbone``: a new one must be added to OFFLINE (or the contract below would try to download its
    weights)."""
    for name in CONTRACT_CLASSIFIERS:
        if name not in FROM_SCRATCH:
            assert name in OFFLINE, f"add the offline build option of {name!r} to OFFLINE"


def test_logits_shape_and_dtype(built):
    name, model, _ = built
    model.eval()
    with torch.no_grad():
        out = model(images(3))
    assert out.shape == (3, classes_of(name)) and out.dtype == torch.float32, (name, out.shape, out.dtype)
    assert torch.isfinite(out).all()
    assert getattr(model, "num_classes", classes_of(name)) == classes_of(name)
    assert not torch.equal(out[0], out[1])  # depends on the input


def test_cam_and_feature_layers_fire_their_hooks(built):
    """``cam_layer`` and every ``feature_layers`` entry are submodules of the model that run in its forward
    pass (a forward hook on each fires once and sees a (B, channels, h, w) activation); the feature layers go
    from shallow to deep (non-increasing spatial size), the CAM layer's map is no larger than the deepest."""
    name, model, _ = built
    model.eval()
    layers = {"cam": model.cam_layer, **{f"feature{i}": m for i, m in enumerate(model.feature_layers)}}
    assert len(layers) >= 2, name
    members = {id(m) for m in model.modules()}
    seen: dict[str, list[tuple[int, ...]]] = {k: [] for k in layers}
    handles = []
    for key, layer in layers.items():
        assert isinstance(layer, nn.Module) and id(layer) in members, (name, key)
        handles.append(layer.register_forward_hook(lambda mod, inp, out, key=key: seen[key].append(tuple(out.shape))))
    try:
        with torch.no_grad():
            model(images(2))
    finally:
        for h in handles:
            h.remove()
    for key, shapes in seen.items():
        assert len(shapes) == 1, (name, key, shapes)
        assert len(shapes[0]) == 4 and shapes[0][0] == 2, (name, key, shapes)
    sizes = [seen[f"feature{i}"][0][2] * seen[f"feature{i}"][0][3] for i in range(len(model.feature_layers))]
    assert sizes == sorted(sizes, reverse=True), (name, sizes)
    assert seen["cam"][0][2] * seen["cam"][0][3] <= sizes[-1], name


def test_freeze_leaves_eval_mode_and_no_gradients(built):
    name, model, _ = built
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    assert freeze(model) is model
    assert not model.training and not any(m.training for m in model.modules()), name
    assert not any(p.requires_grad for p in model.parameters()), name
    with torch.no_grad():  # eval: the same input gives the same logits (no dropout, running BatchNorm statistics)
        x = images(2)
        assert torch.equal(model(x), model(x))


def test_checkpoint_round_trip(built, tmp_path):
    """The state dict saved with ``save_checkpoint`` and loaded with ``load_checkpoint`` into a freshly built
    model (other weights: the outputs differ before) gives the same logits and the same state. A checkpoint
    whose last layer has another class count does not fit: an error naming the file. (Each save is fsynced:
    one full save per architecture; the misfit holds only the mismatched tensor, also refused, by strictness.)"""
    name, model, other = built
    freeze(model)
    freeze(other)
    x = images(2, seed=1)
    with torch.no_grad():
        want = model(x)
        assert not torch.equal(other(x), want), name
    path = save_checkpoint(tmp_path / f"{name}.pt", model.state_dict())
    load_checkpoint(other, path, CPU)
    with torch.no_grad():
        assert torch.equal(other(x), want), name
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), (name, k)

    state = model.state_dict()
    head = [k for k, v in state.items() if v.dim() >= 1 and v.shape[0] == C][-1]  # the last layer's output rows
    misfit = save_checkpoint(tmp_path / f"{name}-misfit.pt", {head: torch.cat([state[head], state[head][:1]])})
    with pytest.raises(MaskbenchError, match="does not fit") as err:
        load_checkpoint(other, misfit, CPU)
    assert str(misfit) in str(err.value)


def test_checkpoint_in_a_state_dict_entry(tmp_path):
    """``load_checkpoint`` also reads ``{"state_dict": ..., <other entries>}`` (the loader's own unwrapping, the
    same for every architecture: shown on the smallest)."""
    model, other = freeze(build("smallcnn", 0)), freeze(build("smallcnn", 1))
    x = images(2, seed=1)
    path = save_checkpoint(tmp_path / "wrapped.pt", {"state_dict": model.state_dict(), "epoch": 3})
    load_checkpoint(other, path, CPU)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


DAMAGES = ["garbage", "truncated", "empty", "pickled-code", "missing"]


def test_damaged_checkpoint_is_an_error_naming_the_file(built, tmp_path):
    """A damaged file raises MaskbenchError (never a bare torch / pickle error) whose message names it: bytes that
    are no checkpoint, a truncated one, an empty file, a pickled object ``weights_only`` refuses, no file. None
    of these needs the model's full weights (the loader reads the file before it touches the model)."""
    name, model, _ = built
    small = save_checkpoint(tmp_path / "small.pt", {"w": torch.arange(4096.0)})
    for damage in DAMAGES:
        path = tmp_path / f"{damage}.pt"
        if damage == "garbage":
            path.write_bytes(b"not a checkpoint \x00\x01\x02" * 50)
        elif damage == "truncated":
            path.write_bytes(small.read_bytes()[: small.stat().st_size // 2])
        elif damage == "empty":
            path.write_bytes(b"")
        elif damage == "pickled-code":
            torch.save({"state_dict": {}, "hook": _NotATensor()}, path)
        with pytest.raises(MaskbenchError) as err:
            load_checkpoint(model, path, CPU)
        assert str(path) in str(err.value), (name, damage, str(err.value))


class _NotATensor:
    """An arbitrary object: pickling it stores a reference to code, which ``weights_only`` loading refuses."""


# ------------------------------------------------------------------------------------ class_average_precision


def ap(scores, targets) -> torch.Tensor:
    """AP of one class: scores and targets of N images, as an (N, 1) column."""
    return class_average_precision(torch.tensor(scores, dtype=torch.float32)[:, None],
                                   torch.tensor(targets, dtype=torch.float32)[:, None])


def test_class_average_precision_known_answers():
    # a perfect ranking: 1
    assert ap([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]).item() == 1.0
    # reversed: the positives come 3rd and 4th, precisions 1/3 and 2/4: AP = (1/3 + 1/2) / 2 = 5/12
    assert ap([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]).item() == pytest.approx(5 / 12, abs=1e-7)
    # one positive at rank 2 of 3: 1/2
    assert ap([0.5, 0.9, 0.1], [1, 0, 0]).item() == pytest.approx(0.5, abs=1e-7)
    # a class without positives: NaN (not 0), the other classes unaffected; (N, C) -> (C,) float
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.4, 0.3, 0.6]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    out = class_average_precision(scores, targets)
    assert out.shape == (3,) and out.dtype.is_floating_point
    assert out[0].item() == 1.0 and out[1].item() == 1.0 and math.isnan(out[2].item())
    assert math.isnan(ap([0.3, 0.2], [0, 0]).item())


def test_class_average_precision_ties_are_order_independent():
    """Tied scores form one retrieval step (scikit-learn's rule): the value does not depend on the order of the
    tied images. All scores tied: the positive fraction; a tie of a positive and a negative after a positive:
    (1 + 2/3) / 2 whichever of the two comes first."""
    assert ap([0.5] * 4, [1, 0, 0, 1]).item() == pytest.approx(0.5, abs=1e-7)
    first = ap([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]).item()
    second = ap([0.9, 0.5, 0.5, 0.1], [1, 0, 1, 0]).item()
    assert first == second == pytest.approx(5 / 6, abs=1e-7)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (40, 4), generator=gen).float()  # many ties
    targets = (torch.rand(40, 4, generator=gen) < 0.4).float()
    base = class_average_precision(scores, targets)
    for _ in range(5):
        perm = torch.randperm(40, generator=gen)
        torch.testing.assert_close(class_average_precision(scores[perm], targets[perm]), base, rtol=0, atol=1e-6)


# -- training recipes ------------------------------------------------------------------------------------------------
def test_the_papers_classifiers_follow_nn_explainers_recipe_and_old_keys_stay():
    from dataclasses import asdict

    from maskbench.classifiers.base import classifier_settings, recipe_key

    for name, lr in (("vgg16", 1e-5), ("resnet50", 1e-4)):
        voc, _ = classifier_settings(name, None, "voc")
        assert (voc.lr, voc.batch_size, voc.weight_decay, voc.seed, voc.epochs) == (lr, 16, 0.0, 42, 1000)
        assert (voc.schedule, voc.monitor, voc.min_delta, voc.patience) == ("constant", "val_loss", 1e-3, 5)
        assert voc.freeze_backbone and not voc.hflip
        assert classifier_settings(name, None, "coco")[0].patience == 2  # NN-Explainer's COCO configs
        assert classifier_settings(name, {"epochs": 2}, "coco")[0].epochs == 2  # --classifier-param last
    small = CLASSIFIERS.get("smallcnn").recipe
    # fields added later leave the key of a recipe that keeps their defaults as it was (the shipped checkpoint)
    assert recipe_key(small) == {k: v for k, v in asdict(small).items()
                                 if k not in ("schedule", "monitor", "min_delta")}
    with pytest.raises(MaskbenchError, match="Valid --classifier-param key"):
        classifier_settings("vgg16", {"epoch": 2})


@pytest.mark.parametrize("monitor", ["val_loss", "val_map"])
def test_early_stopping_keeps_the_first_epoch_when_nothing_improves(monitor):
    from maskbench.classifiers.base import TrainRecipe, train_classifier

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 16, 16, generator=gen), (torch.rand(12, 3, generator=gen) > 0.5).float()
    split = type("S", (), {"images": x, "labels": y})()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))  # no BatchNorm or dropout: lr 0 changes nothing
    recipe = TrainRecipe(epochs=50, batch_size=4, lr=0.0, weight_decay=0.0, patience=3, schedule="constant",
                         monitor=monitor, min_delta=1e-3, hflip=False)
    info = train_classifier(model, split, split, recipe, torch.device("cpu"), progress=False)
    # lr 0: the weights never change, so no epoch beats the first by min_delta: 1 + patience epochs, first kept
    assert len(info["history"]) == 4 and info["best_epoch"] == 1
    assert len({h[monitor] for h in info["history"]}) == 1
