"""Whether a classifier's class probability is a sigmoid (multi-label) or a softmax (single-label) is a property
of the classifier (``probabilities``), and every method and metric that turns logits into a class probability
takes it from there (``score="auto"``; faithfulness's q; the masked classifier's predictions)."""

import math

import pytest
import torch
from mb_testutils import make_batch, tiny_model
from torch import nn

from maskbench.core.scores import class_probabilities, probability_kind, resolve_score
from maskbench.methods import build_method
from maskbench.metrics import METRICS, MetricInputs

C, H = 4, 32


class SoftmaxAsSigmoid(nn.Module):
    """A multi-label-looking model whose sigmoid equals ``inner``'s softmax: logit = log(p / (1 - p))."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        p = torch.softmax(self.inner(x).double(), -1).clamp(1e-12, 1 - 1e-12)
        return torch.log(p / (1 - p)).float()


class Scaled(nn.Module):
    """``inner``'s logits times ``gain``: logits far apart, where a sigmoid and a softmax rank scores apart."""

    def __init__(self, inner: nn.Module, gain: float = 20.0):
        super().__init__()
        self.inner, self.gain = inner, gain

    def forward(self, x):
        return self.gain * self.inner(x)


def single_label(model: nn.Module) -> nn.Module:
    model.probabilities = "softmax"
    return model


def test_the_kind_is_a_property_of_the_classifier():
    model = tiny_model(C)
    assert probability_kind(model) == "sigmoid" and resolve_score("auto", model) == "sigmoid"
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    torch.testing.assert_close(class_probabilities(model, logits), torch.sigmoid(logits))
    single_label(model)
    assert probability_kind(model) == "softmax" and resolve_score("auto", model) == "softmax"
    assert resolve_score("logit", model) == "logit"
    torch.testing.assert_close(class_probabilities(model, logits), torch.softmax(logits, -1))
    model.probabilities = "tanh"
    with pytest.raises(ValueError, match="'sigmoid' or 'softmax'"):
        probability_kind(model)


@pytest.mark.parametrize("name,preset,overrides,gain", [
    ("rise", "fast", {"num_masks": 64}, 20.0),
    ("igos++", "paper", {"iterations": 3, "ig_iter": 5}, 3.0),  # where the two scores give different masks
    ("meaningful-perturbation", "fast", {"max_iter": 5}, 20.0),
])
def test_methods_score_with_the_classifiers_own_probability(name, preset, overrides, gain):
    images = torch.randn(2, 3, H, H, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[0, 1], [2, 3]])
    model = single_label(Scaled(tiny_model(C), gain))

    def maps(score, m=model):
        return build_method(name, preset=preset, score=score, **overrides).explain(m, images, classes)

    auto = maps("auto")
    torch.testing.assert_close(auto, maps("softmax"))  # auto = the single-label classifier's softmax
    assert not torch.allclose(auto, maps("sigmoid"), atol=1e-3)  # and the choice matters
    multi = Scaled(tiny_model(C), gain)  # the same weights, multi-label: auto = sigmoid
    torch.testing.assert_close(maps("auto", multi), maps("sigmoid", multi))


def test_faithfulness_reads_the_classifiers_probability():
    """M_F, insertion and deletion of a softmax classifier equal those of a sigmoid classifier whose sigmoid is
    that softmax, and differ from reading the same logits through a sigmoid."""
    inner = tiny_model(C)
    cm = torch.zeros(2, C, H, H)
    cm[0, 0, :16, :16] = 1
    cm[1, 2, 8:24, 8:24] = 1
    batch = make_batch([[0], [2]], cm, num_classes=C)
    classes = torch.tensor([[0, 1], [2, 3]])
    masks = torch.rand(2, 2, H, H, generator=torch.Generator().manual_seed(2))

    def scores(model):
        inputs = MetricInputs(model, batch.images, masks, classes, batch)
        return torch.stack([METRICS.get(n).fn(inputs) for n in ("insertion", "deletion", "mf_clipped")])

    softmax = scores(single_label(tiny_model(C)))
    torch.testing.assert_close(softmax, scores(SoftmaxAsSigmoid(inner)), atol=1e-4, rtol=1e-4, equal_nan=True)
    sigmoid = scores(tiny_model(C))
    assert not torch.allclose(softmax.nan_to_num(), sigmoid.nan_to_num(), atol=1e-2)


def test_a_single_label_classifier_predicts_its_top_class_in_the_masked_classifier_table():
    model = single_label(tiny_model(C))
    cm = torch.zeros(3, C, H, H)
    cm[:, 0, :16] = 1
    batch = make_batch([[0], [0], [0]], cm, num_classes=C)
    classes = torch.tensor([[0], [0], [0]])
    out = METRICS.get("maskcls").fn(MetricInputs(model, batch.images, cm[:, :1], classes, batch))
    for prefix in ("orig_", ""):  # exactly one predicted class per image: tp + fp == 1
        assert torch.equal(out[prefix + "tp"] + out[prefix + "fp"], torch.ones(3))
        assert torch.equal(out[prefix + "tp"] + out[prefix + "fn"], torch.ones(3))
    top = model(batch.images).argmax(1)
    assert out["orig_tp"].tolist() == [float(t == 0) for t in top.tolist()]
    assert not math.isnan(out["tp"].sum().item())
