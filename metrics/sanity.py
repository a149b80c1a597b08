"""Random-logit test: does a method's map depend on the class it explains? (Sixt, Granz & Landgraf, "When
Explanations Lie: Why Many Modified BP Attributions Fail", ICML 2020, Sec. 5; Quantus ``RandomLogit``; xplique
``RandomLogitMetric``.)

For each true class c of an image (among the classes the run explained), a class c' is drawn uniformly among
the explained classes the image does not contain, seeded by the image and c
(:func:`~maskbench.core.images.image_class_seed`, seed 0, so every method is compared on the same c'). The value is
the Spearman rank correlation between the map of c and the map of c' (Pearson correlation of their average
ranks, ``scipy.stats.rankdata``, ``randomlogit``) and their SSIM (``torchmetrics``'
``structural_similarity_index_measure``, data range 1, its default 11-pixel Gaussian window, ``randomlogit_ssim``,
Quantus's default similarity); the image's value is the mean over its true classes. 1: the map ignores the
class (an edge detector, a saliency of the image alone); low or negative: class-sensitive. Undefined (NaN, never
0) when no absent class was explained for the image; Spearman also when either map is constant (no ranking;
SSIM of two equal constant maps is 1).

Deviations from the reference implementations, and why: Quantus compares the map of the *predicted* class with
that of a random other class. Here the true classes (the ones the benchmark explains). Spearman's rank
correlation compares rankings (what the faithfulness and localisation metrics read) and does not depend on the
maps' scales; SSIM compares the maps' local structure and scale.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from maskbench.core.images import image_class_seed

from .base import MetricInputs, TableSpec, metric_statistic, register_metric, register_table, true_class_slots


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between the rows of two (P, N) arrays (average ranks for ties); NaN for a constant row."""
    ra, rb = sps.rankdata(a, axis=1), sps.rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _random_class_pairs(inputs: MetricInputs) -> Tensor:
    """(P, 3) long rows (image, slot of a true class c, slot of its seeded random absent class c'); see the module."""
    classes, labels = inputs.classes, inputs.batch.labels.to(inputs.classes.device)
    first = true_class_slots(classes, labels).cpu()
    classes_cpu, labels_cpu = classes.cpu(), labels.cpu() > 0
    pairs: list[tuple[int, int, int]] = []
    for i in range(classes.shape[0]):
        slots = classes_cpu[i].tolist()
        absent = sorted({c for c in slots if not labels_cpu[i, c]})
        if not absent:
            continue
        for k in torch.nonzero(first[i]).flatten().tolist():
            g = torch.Generator().manual_seed(image_class_seed(inputs.images[i].cpu(), 0, slots[k]))
            other = absent[int(torch.randint(len(absent), (1,), generator=g))]
            pairs.append((i, k, slots.index(other)))
    return torch.tensor(pairs, dtype=torch.long).view(-1, 3)


def _per_image_mean(values: Tensor, image: Tensor, n: int) -> Tensor:
    """(n,) mean of the defined ``values`` of each image (NaN where it has none)."""
    out = torch.full((n,), float("nan"))
    for i in set(image.tolist()):
        vals = values[image == i]
        vals = vals[~torch.isnan(vals)]
        if len(vals):
            out[i] = vals.mean()
    return out


@register_metric("randomlogit", higher_is_better=False, table="sanity", label="Random-logit rho",
                 valid_range=(-1.0, 1.0))
@torch.no_grad()
def random_logit(inputs: MetricInputs) -> Tensor:
    """Spearman correlation of the map of each true class with the map of a random absent explained class."""
    idx = _random_class_pairs(inputs)
    if not len(idx):
        return torch.full((inputs.classes.shape[0],), float("nan"))
    flat = inputs.masks.float().flatten(2).cpu()
    rho = torch.from_numpy(spearman_rows(flat[idx[:, 0], idx[:, 1]].numpy(), flat[idx[:, 0], idx[:, 2]].numpy()))
    return _per_image_mean(rho, idx[:, 0], inputs.classes.shape[0])


@register_metric("randomlogit_ssim", higher_is_better=False, table="sanity", label="Random-logit SSIM",
                 valid_range=(-1.0, 1.0))
@torch.no_grad()
def random_logit_ssim(inputs: MetricInputs) -> Tensor:
    """SSIM of the map of each true class with the map of the same random absent class as ``randomlogit``."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    idx = _random_class_pairs(inputs)
    if not len(idx):
        return torch.full((inputs.classes.shape[0],), float("nan"))
    maps = inputs.masks.float().cpu()
    a, b = maps[idx[:, 0], idx[:, 1]][:, None], maps[idx[:, 0], idx[:, 2]][:, None]
    s = ssim(a, b, data_range=1.0, reduction="none").double().clamp(-1.0, 1.0)
    return _per_image_mean(s, idx[:, 0], inputs.classes.shape[0])


register_table(TableSpec(
    "sanity", (metric_statistic("randomlogit"), metric_statistic("randomlogit_ssim")),
    r"Random-logit test: Spearman correlation and SSIM between the map of a true class and the map of a random "
    r"class the image does not contain (the same seeded class for every method); 1 = the map ignores the class. "
    r"Spearman is undefined for constant maps.",
    r"Sixt et al.\ (2020); Quantus RandomLogit", order=70,
))
