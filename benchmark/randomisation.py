"""Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018, Sec. 3.1),
``maskbench sanity``: does a method's map depend on the model's parameters?

The classifier's weight layers (every ``nn.Conv2d`` and ``nn.Linear``, in forward order; BatchNorm statistics and
affine parameters are kept, as they are not weight layers of Adebayo et al.'s figures) are re-initialised with
their own ``reset_parameters()`` (PyTorch's default initialisation; seeded) in two ways:

* **cascading**: from the top (logit) layer down, cumulatively: step k has the top k layers randomised;
* **independent**: one layer at a time, all others trained.

For each method, each (image, true class) of the first ``images`` test images gets its map on the trained model
and on every randomised one; the similarity of the two maps is Spearman's rank correlation (Pearson of average
ranks) and SSIM (``torchmetrics``' ``structural_similarity_index_measure``, data range 1, its default Gaussian
window). A method that passes keeps **low** similarity once the model is randomised; one whose maps stay similar
(the centre Gaussian: 1) does not depend on the model. Each cell is the mean over images of the image's mean over
its true classes, with the 95% percentile bootstrap interval over images (:mod:`maskbench.core.stats`).

Control row (Binder et al., "Shortcomings of Top-Down Randomization-Based Sanity Checks", CVPR 2023): ``noise``,
a map of independent uniform noise drawn anew for every model: it has no information at all and yet "passes"
(similarity about 0). A low similarity is therefore necessary, not sufficient: the caption says so.

Deviations: Adebayo et al. also report Spearman of absolute values and HOG similarity; every map of this benchmark
is already in [0, 1] (the methods' normalisation), so the absolute value changes nothing and only the rank
correlation and SSIM are reported. Learned methods are not retrained against the randomised models yet (they are
left out of this test; the issue that asks for it is still open).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from maskbench.core.render import csv_text, escape
from maskbench.core.stats import bootstrap_weights, column_means, percentile_interval
from maskbench.core.storage import atomic_write
from maskbench.metrics.sanity import spearman_rows

NOISE = "noise"


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's Conv2d and Linear layers in registration (forward) order, with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def randomised(model: nn.Module, names: list[str], seed: int) -> nn.Module:
    """A frozen copy of ``model`` with the layers ``names`` re-initialised (``reset_parameters``, seeded)."""
    out = copy.deepcopy(model)
    layers = dict(out.named_modules())
    for k, name in enumerate(names):
        torch.manual_seed(seed + k)
        layers[name].reset_parameters()
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def steps(model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """(mode, label, randomised layer names) of every step: cascading top-down, then each layer alone."""
    names = [n for n, _ in weight_layers(model)]
    out = [("cascading", f"top {k}: {names[-k]}", names[-k:]) for k in range(1, len(names) + 1)]
    out += [("independent", name, [name]) for name in reversed(names)]
    return out


def similarities(a: Tensor, b: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(Spearman, SSIM) per map of two (P, H, W) map stacks."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    rho = spearman_rows(a.flatten(1).double().numpy(), b.flatten(1).double().numpy())
    s = ssim(a[:, None].float(), b[:, None].float(), data_range=1.0, reduction="none")
    return rho, s.double().numpy()


def _true_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    img, cls = torch.nonzero(labels > 0, as_tuple=True)
    return img, cls


def explain_pairs(method: Any, model: nn.Module, images: Tensor, img: Tensor, cls: Tensor, batch: Any,
                  gen: torch.Generator | None, chunk: int = 8) -> Tensor:
    """(P, H, W) maps of the (image, class) pairs (sorted by image, as :func:`_true_pairs` gives them), explained
    ``chunk`` images at a time with each image's classes padded by repeating its first (as the runner does);
    the ``noise`` control draws uniform noise from ``gen``."""
    if method == NOISE:
        return torch.rand(len(img), *images.shape[-2:], generator=gen)
    per_image = [cls[img == i].tolist() for i in range(images.shape[0])]
    k = max(len(c) for c in per_image)
    classes = torch.tensor([c + [c[0]] * (k - len(c)) if c else [0] * k for c in per_image], dtype=torch.long)
    out = []
    for start in range(0, images.shape[0], chunk):
        rows = list(range(start, min(start + chunk, images.shape[0])))
        rows = [r for r in rows if per_image[r]]
        if not rows:
            continue
        masks = method.explain(model, images[rows], classes[rows].to(images.device),
                               batch=batch.select(rows) if method.uses_ground_truth else None)
        for j, r in enumerate(rows):
            out.append(masks[j, : len(per_image[r])].detach().float().cpu())
    return torch.cat(out)


def randomisation_rows(methods: list[Any], model: nn.Module, images: Tensor, labels: Tensor, image_ids: list[str],
                       batch: Any, seed: int = 0) -> pd.DataFrame:
    """Per (method, step, image): mean Spearman and SSIM over the image's true classes (see the module). Each
    randomised model is built once and explains for every method."""
    img, cls = _true_pairs(labels)
    entries = [*methods, NOISE]
    names = [NOISE if m == NOISE else m.name for m in entries]
    gens = {n: torch.Generator().manual_seed(seed) for n in names}  # the noise row's draws, in step order
    base = {n: explain_pairs(m, model, images, img, cls, batch, gens[n]) for n, m in zip(names, entries, strict=True)}
    recs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for mode, label, layers in steps(model):
        rnd = randomised(model, layers, seed)
        for name, method in zip(names, entries, strict=True):
            rho, s = similarities(base[name], explain_pairs(method, rnd, images, img, cls, batch, gens[name]))
            for i in sorted(set(img.tolist())):
                sel = (img == i).numpy()
                recs[name].append({"method": name, "mode": mode, "step": label, "layers": len(layers),
                                   "image_id": image_ids[i], "spearman": float(np.nanmean(rho[sel])) if
                                   (~np.isnan(rho[sel])).any() else math.nan,
                                   "ssim": float(np.nanmean(s[sel]))})
    return pd.DataFrame.from_records([r for n in names for r in recs[n]])


def summarise(rows: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean over images with the 95% percentile bootstrap interval, per (method, mode, step, similarity)."""
    recs = []
    for (method, mode, step), g in rows.groupby(["method", "mode", "step"], sort=False):
        g = g.sort_values("image_id")
        w = bootstrap_weights(len(g), resamples, seed)
        for col in ("spearman", "ssim"):
            v = g[col].to_numpy(dtype=np.float64)
            ok = ~np.isnan(v)
            if not ok.any():
                recs.append({"method": method, "mode": mode, "step": step, "similarity": col, "value": math.nan,
                             "ci_low": math.nan, "ci_high": math.nan, "images": 0})
                continue
            lo, hi = percentile_interval(column_means(v[:, None], w)[:, 0])  # a draw of undefined images: NaN
            recs.append({"method": method, "mode": mode, "step": step, "similarity": col, "value": float(v[ok].mean()),
                         "ci_low": float(lo), "ci_high": float(hi), "images": int(ok.sum())})
    return pd.DataFrame.from_records(recs)


def _latex(summary: pd.DataFrame, labels: dict[str, str], where: str) -> str:
    casc = summary[(summary["mode"] == "cascading") & (summary["similarity"] == "spearman")]
    stepnames = list(dict.fromkeys(casc["step"]))
    methods = list(dict.fromkeys(casc["method"]))
    cell = {(r.method, r.step): r for r in casc.itertuples()}
    cols = "l" + "r" * len(stepnames)
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{Cascading model-parameter randomisation ({where}; Adebayo et al., 2018): Spearman "
             r"correlation between each method's maps on the trained classifier and on the classifier with its "
             r"top $k$ weight layers re-initialised (95\% bootstrap intervals over images in randomisation.csv, "
             r"with SSIM and the independent randomisation of each layer). Low is what a model-dependent method "
             r"shows; but the noise control row, which carries no information at all, is low too (Binder et al., "
             r"2023): passing is necessary, not sufficient.}", r"\label{tab:randomisation}",
             rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(["Method", *[f"top {k + 1}" for k in range(len(stepnames))]]) + r" \\", r"\midrule"]
    for m in methods:
        vals = []
        for st in stepnames:
            r = cell.get((m, st))
            vals.append("--" if r is None or math.isnan(r.value) else f"{r.value:.2f}")
        lines.append(" & ".join([escape(labels.get(m, m)), *vals]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def write_randomisation(run_dir: Path, rows: pd.DataFrame, labels: dict[str, str], where: str) -> list[Path]:
    """``sanity/randomisation_rows.csv`` (per image), ``randomisation.csv`` (summary) and ``randomisation.tex``."""
    summary = summarise(rows)
    (run_dir / "sanity").mkdir(parents=True, exist_ok=True)
    return [atomic_write(run_dir / "sanity" / "randomisation_rows.csv", csv_text(rows)),
            atomic_write(run_dir / "randomisation.csv", csv_text(summary)),
            atomic_write(run_dir / "randomisation.tex", _latex(summary, labels, where))]
