"""Model-parameter randomisation (benchmark/randomisation.py) on cases whose answers are known by construction."""

import math

import numpy as np
import pytest
import torch

from maskbench.benchmark import randomisation as rz
from maskbench.classifiers import SmallCNN, freeze
from maskbench.methods import build_method


def _model():
    torch.manual_seed(0)
    return freeze(SmallCNN(3))


def test_cascading_goes_top_down_and_independent_touches_one_layer():
    model = _model()
    names = [n for n, _ in rz.weight_layers(model)]
    plan = rz.steps(model)
    casc = [layers for mode, _, layers in plan if mode == "cascading"]
    assert casc == [names[-k:] for k in range(1, len(names) + 1)]  # head first, then downwards, cumulative
    assert [layers for mode, _, layers in plan if mode == "independent"] == [[n] for n in reversed(names)]
    rnd = rz.randomised(model, [names[-1]], seed=0)
    before, after = dict(model.named_parameters()), dict(rnd.named_parameters())
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == (not name.startswith(names[-1] + ".")), name  # only the randomised layer changed
    assert not rnd.training and not any(p.requires_grad for p in rnd.parameters())
    assert torch.equal(dict(rz.randomised(model, [names[-1]], 0).named_parameters())[names[-1] + ".weight"],
                       after[names[-1] + ".weight"])  # seeded


def test_a_model_blind_method_stays_at_1_gradients_drop_and_noise_passes():
    model = _model()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    methods = [build_method("centre-gaussian"), build_method("gradient")]
    rows = rz.randomisation_rows(methods, model, images, labels, ["a", "b", "c", "d"], None)
    full = rows[(rows["mode"] == "cascading") & (rows["layers"] == len(rz.weight_layers(model)))]
    by = full.groupby("method")[["spearman", "ssim"]].mean()
    assert by.loc["centre-gaussian"].tolist() == [1.0, 1.0]  # ignores the model: never changes
    assert by.loc["gradient", "spearman"] < 0.9  # the maps change with the weights
    assert abs(by.loc["noise", "spearman"]) < 0.1 and by.loc["noise", "ssim"] < 0.2  # noise "passes"
    summary = rz.summarise(rows, resamples=200)
    cg = summary[(summary["method"] == "centre-gaussian") & (summary["similarity"] == "spearman")]
    assert (cg["value"] == 1.0).all() and (cg["ci_low"] == 1.0).all() and (cg["images"] == 4).all()


def test_similarities_of_identical_and_reversed_maps():
    a = torch.linspace(0, 1, 64).view(1, 8, 8)
    rho, s = rz.similarities(a, a.clone())
    assert math.isclose(rho[0], 1.0) and math.isclose(s[0], 1.0, rel_tol=1e-5)
    rho, _ = rz.similarities(a, 1 - a)
    assert math.isclose(rho[0], -1.0)
    assert np.isnan(rz.similarities(torch.full((1, 8, 8), 0.5), a)[0][0])  # a constant map has no ranking


def test_a_resample_of_undefined_images_is_left_out_of_the_interval_never_0():
    import pandas as pd

    # 1 image of 3 defined, similarity 0.9: about (2/3)^3 = 30% of the draws hold no defined image
    rows = pd.DataFrame({"method": "m", "mode": "cascading", "step": "top 1", "layers": 1,
                         "image_id": ["a", "b", "c"], "spearman": [0.9, float("nan"), float("nan")],
                         "ssim": [0.5, 0.5, 0.5]})
    s = rz.summarise(rows, resamples=500).set_index("similarity")
    assert s.loc["spearman", ["value", "ci_low", "ci_high"]].tolist() == pytest.approx([0.9, 0.9, 0.9])
