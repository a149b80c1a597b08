"""Model-parameter randomisation (benchmark/randomisation.py) on cases whose answers are known by construction."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
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


class _FollowsItsModel:
    """A stand-in learned method: its maps are the input gradient of the model it was trained for (``trained``)."""

    family, uses_ground_truth = "learned", False

    def __init__(self, name, trained=None, blind=False):
        self.name, self.trained, self.blind = name, trained, blind

    def explain(self, model, images, classes, batch=None):
        if self.blind:  # segments "objects" whatever the model: a fixed function of the image
            return images.mean(1, keepdim=True).expand(-1, classes.shape[1], -1, -1).clamp(0, 1)
        x = images.clone().requires_grad_(True)
        logits = self.trained(x)
        grads = [torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)[0].abs().amax(1)
                 for c in range(logits.shape[1])]
        g = torch.stack(grads, 1)
        g = torch.gather(g, 1, classes[:, :, None, None].expand(-1, -1, *g.shape[-2:]))
        return g / g.flatten(2).amax(2).clamp_min(1e-12)[:, :, None, None]


def test_learned_methods_are_retrained_at_the_top_all_and_permuted_steps_only():
    model = _model()
    torch.manual_seed(5)
    permuted = freeze(SmallCNN(3))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    calls = []

    def retrain(method, rnd, tag):
        calls.append((method.name, tag))
        return _FollowsItsModel(method.name, rnd, method.blind)

    methods = [_FollowsItsModel("follows", model), _FollowsItsModel("blind", model, blind=True)]
    rows = rz.randomisation_rows(methods, model, images, labels, ["a", "b", "c"], None, retrain=retrain,
                                 permuted=permuted)
    n = len(rz.weight_layers(model))
    tags = ["randomised-top-seed0", "randomised-all-seed0", "permuted-labels"]
    assert calls == [(m, t) for t in tags for m in ("follows", "blind")]  # once per method and retrained model
    learned = rows[rows["method"] == "follows"]
    assert sorted(set(zip(learned["mode"], learned["layers"], strict=True))) == [("cascading", 1), ("cascading", n),
                                                                                ("data", 0)]
    by = rows.groupby(["method", "mode", "layers"])["spearman"].mean()
    assert by[("blind", "cascading", n)] == 1.0 and by[("blind", "data", 0)] == 1.0  # model-blind: never changes
    assert by[("follows", "cascading", n)] < 0.9 and by[("follows", "data", 0)] < 0.9
    # every non-learned method has every step and the permuted one; without ``retrain`` learned ones are left out
    assert len(rows[rows["method"] == "noise"]) == 3 * (2 * n + 1)
    assert set(rz.randomisation_rows(methods, model, images, labels, ["a", "b", "c"], None)["method"]) == {"noise"}


def test_sanity_command_retrains_learned_methods_and_trains_a_permuted_label_classifier(tmp_path_factory, tmp_path):
    from mb_testutils import tiny_synthetic

    from maskbench.benchmark.cli import main

    root = tiny_synthetic(tmp_path_factory, n_test=8, seed=4)
    plugin = str(Path(__file__).parent / "plugins" / "tiny_learned.py")
    code = main(["sanity", "--data-root", str(root), "--cache", str(tmp_path / "cache"), "--results",
                 str(tmp_path / "results"), "--methods", "gradient,test-tiny-learned", "--plugin", plugin,
                 "--images", "4", "--no-progress"])
    assert code == 0
    run = next((tmp_path / "results").glob("synthetic/*"))
    rows = pd.read_csv(run / "sanity" / "randomisation_rows.csv")
    tiny = rows[rows["method"] == "test-tiny-learned"]
    assert set(tiny["mode"]) == {"cascading", "data"} and tiny["layers"].nunique() == 3
    assert set(rows[rows["method"] == "gradient"]["mode"]) == {"cascading", "independent", "data"}
    info = json.loads((run / "sanity" / "permuted_classifier.json").read_text())
    assert 0.0 <= info["test_map_true_labels"] <= 1.0 and info["recipe"]["hflip"] is False
    assert (run / "randomisation.tex").read_text().count("perm.") == 2  # the column and the caption
    learned_ckpts = list((tmp_path / "cache" / "learned").glob("test-tiny-learned-*.pt"))
    assert len(learned_ckpts) == 4  # trained for the classifier, its top-1 and fully randomised copies, permuted
