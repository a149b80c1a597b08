"""The random-logit test (metrics/sanity.py) on maps whose answers are known by construction."""

import math

import numpy as np
import torch

from maskbench.datasets import collate
from maskbench.datasets.base import Sample
from maskbench.metrics import METRICS, MetricInputs
from maskbench.metrics.sanity import spearman_rows


def _batch(labels: list[list[float]]):
    return collate([Sample(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)), torch.tensor(lab), str(i))
                    for i, lab in enumerate(labels)])


def _score(masks, classes, batch):
    return METRICS.get("randomlogit").fn(MetricInputs(None, batch.images, masks, classes, batch))


def test_a_map_that_ignores_the_class_scores_1_and_a_reversed_one_minus_1():
    batch = _batch([[1.0, 0, 0], [0.0, 1, 0]])
    classes = torch.tensor([[0, 1, 2], [0, 1, 2]])
    ramp = torch.linspace(0, 1, 64).view(8, 8)
    same = ramp.expand(2, 3, 8, 8).clone()  # one map for every class: an edge detector would do this
    assert _score(same, classes, batch).tolist() == [1.0, 1.0]
    reversed_ = same.clone()
    reversed_[:, :, :, :] = 1 - ramp  # every absent class gets the reverse ranking of the true one
    reversed_[0, 0], reversed_[1, 1] = ramp, ramp
    assert torch.allclose(_score(reversed_, classes, batch), torch.tensor([-1.0, -1.0]), atol=1e-6)


def test_undefined_without_an_absent_class_or_with_a_constant_map_never_0():
    batch = _batch([[1.0, 1, 0], [1.0, 0, 0]])
    classes = torch.tensor([[0, 1, 0], [0, 1, 2]])  # image 0: both explained classes are present (padded slot)
    masks = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    masks[1] = 0.5  # constant maps: no ranking
    assert all(math.isnan(v) for v in _score(masks, classes, batch).tolist())


def test_the_random_class_is_seeded_and_the_same_for_every_method():
    batch = _batch([[1.0, 0, 0, 0, 0]])
    classes = torch.arange(5)[None]
    base = torch.linspace(0, 1, 64).view(8, 8)
    masks = torch.stack([base.roll(k, 1) for k in range(5)])[None]  # each class its own map
    a, b = _score(masks, classes, batch), _score(masks.clone(), classes, batch)
    assert a.tolist() == b.tolist()
    expected = [spearman_rows(masks[0, 0].reshape(1, -1).numpy(), masks[0, c].reshape(1, -1).numpy())[0]
                for c in range(1, 5)]
    assert any(math.isclose(a.item(), e, rel_tol=1e-6) for e in expected)  # one of the absent classes


def test_spearman_rows_equals_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, (4, 30)).astype(float), rng.normal(size=(4, 30))
    got = spearman_rows(a, b)
    for r in range(4):
        assert math.isclose(got[r], spearmanr(a[r], b[r]).statistic, rel_tol=1e-9)


def _ssim_score(masks, classes, batch):
    return METRICS.get("randomlogit_ssim").fn(MetricInputs(None, batch.images, masks, classes, batch))


def test_random_logit_ssim_is_1_for_one_map_per_image_and_matches_torchmetrics_on_the_drawn_class():
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    batch = collate([Sample(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)), torch.tensor(lab),
                            str(i)) for i, lab in enumerate([[1.0, 0, 0, 0], [0.0, 1, 1, 0]])])
    classes = torch.arange(4).expand(2, 4)
    ramp = torch.linspace(0, 1, 256).view(16, 16)
    assert torch.allclose(_ssim_score(ramp.expand(2, 4, 16, 16).clone(), classes, batch), torch.ones(2), atol=1e-5)
    masks = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    got = _ssim_score(masks, classes, batch)
    rho = _score(masks, classes, batch)  # the same drawn class c' for both similarities: find it through Spearman
    for i, true in [(0, [0]), (1, [1, 2])]:
        per_class = []
        for c in true:
            cands = [o for o in range(4) if o not in true]
            rhos = [spearman_rows(masks[i, c].reshape(1, -1).numpy(), masks[i, o].reshape(1, -1).numpy())[0]
                    for o in cands]
            per_class.append((c, cands, rhos))
        if len(true) == 1:
            c, cands, rhos = per_class[0]
            other = cands[int(np.argmin([abs(r - rho[i].item()) for r in rhos]))]
            want = ssim(masks[i, c][None, None], masks[i, other][None, None], data_range=1.0)
            assert math.isclose(got[i].item(), want.item(), rel_tol=1e-5, abs_tol=1e-6)
        else:
            assert -1.0 <= got[i].item() <= 1.0 and not math.isnan(got[i].item())
    assert got[0].item() < 0.5  # independent noise maps are not similar
