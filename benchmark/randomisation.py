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

**Learned methods** (the Explainer, RTIS, DGMP) are retrained against the randomised classifier, as a learned
explainer's maps come from its own network: explaining a randomised classifier with the network trained for the
trained one would test nothing. A full training per model is expensive, so they are retrained at the first and
the last cascading step only (top layer; every layer) and for the permuted-label classifier, each with the
method's own recipe, keyed by the randomised model (cached: a rerun loads them). Their other steps are ``--``.
The question this answers: does a learned explainer follow the model it was trained for, or segment objects
whatever the model does?

**Data randomisation** (Adebayo et al., Sec. 3.2): :func:`permuted_label_classifier` trains the classifier's
architecture on training labels permuted among the images; mode ``data``, step ``permuted labels``.

Deviations: Adebayo et al. also report Spearman of absolute values and HOG similarity; every map of this benchmark
is already in [0, 1] (the methods' normalisation), so the absolute value changes nothing and only the rank
correlation and SSIM are reported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from maskbench.classifiers.base import (
    build_classifier,
    class_average_precision,
    classifier_settings,
    freeze,
    predict,
    recipe_key,
    train_classifier,
)
from maskbench.core.checkpoints import load_checkpoint, save_checkpoint
from maskbench.core.render import csv_text, escape
from maskbench.core.stats import column_intervals
from maskbench.core.storage import atomic_write, read_json, stable_hash, write_json
from maskbench.datasets.base import stack_split
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


# A learned method is retrained against these cascading steps only (each retraining is a full training): the
# top layer alone and the whole network (Adebayo et al.'s first and last cascading steps), and the classifier
# trained on permuted labels.
RETRAINED_STEPS = ("top", "all")
DATA_MODE, DATA_STEP = "data", "permuted labels"

Retrain = Callable[[Any, nn.Module, str], Any]  # (set-up method, frozen model, tag) -> the method trained for it


def variants(model: nn.Module, seed: int) -> list[tuple[str, str, int, Callable[[], nn.Module], str | None]]:
    """(mode, step label, randomised layers, model builder, retraining tag or None) of every weight-randomisation
    step (:func:`steps`); the retraining tag is set at the cascading steps of :data:`RETRAINED_STEPS`."""
    plan = steps(model)
    n = len(weight_layers(model))
    out = []
    for mode, label, layers in plan:
        which = "top" if len(layers) == 1 else "all" if len(layers) == n else None
        tag = f"randomised-{which}-seed{seed}" if mode == "cascading" and which in RETRAINED_STEPS else None
        out.append((mode, label, len(layers), lambda layers=layers: randomised(model, layers, seed), tag))
    return out


def randomisation_rows(methods: list[Any], model: nn.Module, images: Tensor, labels: Tensor, image_ids: list[str],
                       batch: Any, seed: int = 0, retrain: Retrain | None = None,
                       permuted: nn.Module | None = None) -> pd.DataFrame:
    """Per (method, step, image): mean Spearman and SSIM over the image's true classes (see the module). Each
    randomised model is built once and explains for every method.

    Learned methods (``family == "learned"``) are explained only where they can be retrained: with ``retrain``
    given, at the tagged steps of :func:`variants` (and against ``permuted``); without it they are left out.
    ``permuted``: the classifier trained on permuted labels (data randomisation), one more step (mode ``data``).
    """
    img, cls = _true_pairs(labels)
    learned = {m.name for m in methods if m != NOISE and getattr(m, "family", "") == "learned"}
    entries = [m for m in methods if retrain is not None or getattr(m, "name", "") not in learned] + [NOISE]
    names = [NOISE if m == NOISE else m.name for m in entries]
    gens = {n: torch.Generator().manual_seed(seed) for n in names}  # the noise row's draws, in step order
    base = {n: explain_pairs(m, model, images, img, cls, batch, gens[n]) for n, m in zip(names, entries, strict=True)}
    recs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    plan = variants(model, seed)
    if permuted is not None:
        plan.append((DATA_MODE, DATA_STEP, 0, lambda: permuted, "permuted-labels"))
    for mode, label, n_layers, build, tag in plan:
        rnd = build()
        for name, method in zip(names, entries, strict=True):
            if name in learned:
                if tag is None:
                    continue
                assert retrain is not None
                method = retrain(method, rnd, tag)
            rho, s = similarities(base[name], explain_pairs(method, rnd, images, img, cls, batch, gens[name]))
            for i in sorted(set(img.tolist())):
                sel = (img == i).numpy()
                recs[name].append({"method": name, "mode": mode, "step": label, "layers": n_layers,
                                   "image_id": image_ids[i], "spearman": float(np.nanmean(rho[sel])) if
                                   (~np.isnan(rho[sel])).any() else math.nan,
                                   "ssim": float(np.nanmean(s[sel]))})
    return pd.DataFrame.from_records([r for n in names for r in recs[n]])


def permuted_label_classifier(name: str, datasets: Callable[[str], Any], num_classes: int, data_key: str,
                              device: torch.device, cache_dir: Path, params: dict[str, Any] | None = None,
                              dataset: str | None = None, seed: int = 0, progress: bool = True
                              ) -> tuple[nn.Module, dict[str, Any]]:
    """Adebayo et al.'s data randomisation test (Sec. 3.2): the run's classifier architecture trained on the
    training split with its label vectors permuted among the images (seeded), cached like any classifier.

    The recipe is the classifier's own (:func:`~maskbench.classifiers.base.classifier_settings`) with two changes,
    because the aim is to memorise labels that carry no information, as Adebayo et al. trained to high training
    accuracy: no horizontal flips, and model selection on the (permuted) training split itself, over every epoch
    (no early stop). The record holds the training mAP reached (memorisation) and the test mAP on the true
    labels (chance level if the permutation removed the signal)."""
    recipe, build = classifier_settings(name, params, dataset)
    recipe = replace(recipe, hflip=False, patience=recipe.epochs)
    key = stable_hash({"model": name, "recipe": recipe_key(recipe), "data": data_key, "permuted_labels": seed,
                       **({"build": build} if build else {})})
    path = cache_dir / "classifiers" / f"{name}-permuted-{key}.pt"
    model = build_classifier(name, num_classes, **build)
    if path.is_file() and path.with_suffix(".json").is_file():
        model.load_state_dict(load_checkpoint(path, device))
        info = read_json(path.with_suffix(".json"))
    else:
        x, y = stack_split(datasets("train"))
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        shuffled = SimpleNamespace(images=x, labels=y[perm])
        info = train_classifier(model, shuffled, shuffled, recipe, device, progress)
        freeze(model)
        x_test, y_test = stack_split(datasets("test"))
        info = {"recipe": asdict(recipe), "permutation_seed": seed,
                "train_map_permuted": info["val_map"], "best_epoch": info["best_epoch"],
                "train_seconds": info["train_seconds"],
                "test_map_true_labels": round(float(class_average_precision(
                    predict(model, x_test, device), y_test).nanmean()), 5)}
        save_checkpoint(path, model.state_dict())
        write_json(path.with_suffix(".json"), info)
    model.to(device)
    return freeze(model), {**info, "checkpoint": str(path)}


def summarise(rows: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean over images with the 95% percentile bootstrap interval, per (method, mode, step, similarity)."""
    recs = []
    for (method, mode, step), g in rows.groupby(["method", "mode", "step"], sort=False):
        v = g.sort_values("image_id")[["spearman", "ssim"]].to_numpy(dtype=np.float64)
        mean, lo, hi = column_intervals(v, resamples, seed)  # a draw of undefined images only: NaN, left out
        for j, col in enumerate(("spearman", "ssim")):
            recs.append({"method": method, "mode": mode, "step": step, "similarity": col, "value": float(mean[j]),
                         "ci_low": float(lo[j]), "ci_high": float(hi[j]), "images": int((~np.isnan(v[:, j])).sum())})
    return pd.DataFrame.from_records(recs)


def _latex(summary: pd.DataFrame, labels: dict[str, str], where: str) -> str:
    spear = summary[summary["similarity"] == "spearman"]
    casc = spear[spear["mode"] == "cascading"]
    stepnames = list(dict.fromkeys(casc["step"]))
    data = spear[spear["mode"] == DATA_MODE]
    methods = list(dict.fromkeys(spear["method"]))
    cell = {(r.method, r.step): r for r in spear.itertuples()}
    heads = [f"top {k + 1}" for k in range(len(stepnames))] + (["perm."] if len(data) else [])
    columns = stepnames + ([DATA_STEP] if len(data) else [])
    cols = "l" + "r" * len(columns)
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{Model-parameter and data randomisation ({where}; Adebayo et al., 2018): Spearman "
             r"correlation between each method's maps on the trained classifier and on the classifier with its "
             r"top $k$ weight layers re-initialised (cascading)"
             + (r", and on the classifier trained on permuted labels (perm.)" if len(data) else "")
             + r". Learned methods are retrained against the top-1, the fully randomised and the permuted-label "
             r"classifiers only (-- elsewhere). 95\% bootstrap intervals over images, SSIM and the independent "
             r"randomisation of each layer in randomisation.csv. Low is what a model-dependent method shows; but "
             r"the noise control row, which carries no information at all, is low too (Binder et al., 2023): "
             r"passing is necessary, not sufficient.}", r"\label{tab:randomisation}",
             rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(["Method", *heads]) + r" \\", r"\midrule"]
    for m in methods:
        vals = []
        for st in columns:
            r = cell.get((m, st))
            vals.append("--" if r is None or math.isnan(r.value) else f"{r.value:.2f}")
        lines.append(" & ".join([escape(labels.get(m, m)), *vals]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def write_randomisation(run_dir: Path, rows: pd.DataFrame, labels: dict[str, str], where: str, *,
                        resamples: int = 1000, seed: int = 0) -> list[Path]:
    """``sanity/randomisation_rows.csv`` (per image) and ``sanity/randomisation.json`` (row labels, caption), then
    the summary ``randomisation.csv`` and ``randomisation.tex`` from the rows *as stored*, so that
    :func:`rebuild_randomisation` (run by ``maskbench tables``) remakes them byte for byte without a model."""
    (run_dir / "sanity").mkdir(parents=True, exist_ok=True)
    text = csv_text(rows)
    written = [atomic_write(run_dir / "sanity" / "randomisation_rows.csv", text),
               write_json(run_dir / "sanity" / "randomisation.json", {"labels": labels, "where": where})]
    return written + rebuild_randomisation(run_dir, resamples=resamples, seed=seed)


def rebuild_randomisation(run_dir: Path, *, resamples: int = 1000, seed: int = 0) -> list[Path]:
    """``randomisation.csv`` / ``.tex`` from a run's stored ``sanity/randomisation_rows.csv`` and
    ``sanity/randomisation.json`` (nothing when the run has none): a pure function of them."""
    rows_file, info_file = run_dir / "sanity" / "randomisation_rows.csv", run_dir / "sanity" / "randomisation.json"
    if not (rows_file.is_file() and info_file.is_file()):
        return []
    info = read_json(info_file)
    rows = pd.read_csv(rows_file, dtype={"image_id": str}, keep_default_na=False, na_values=[""])
    summary = summarise(rows, resamples, seed)
    return [atomic_write(run_dir / "randomisation.csv", csv_text(summary)),
            atomic_write(run_dir / "randomisation.tex", _latex(summary, info["labels"], info["where"]))]
