"""Class leakage through the removal mask (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022, Sec. 3-4: removing the pixels an attribution ranks first leaves a hole whose
*shape* can tell the class, whatever the classifier does with the pixels), measured, not assumed:
``maskbench leakage``.

For every (image, true class) of the run and each method, the removal masks of MoRF at the fractions
:data:`FRACTIONS` (the top-p pixels of the class's cached map, ties broken as every faithfulness metric breaks them:
:func:`~maskbench.metrics.faithfulness.reveal_fractions`) are the probe's data. Three measurements, each by
two-fold cross-validation over images (seeded split; every prediction is out-of-fold):

1. **mask only**: a small CNN (:class:`Probe`) predicts the class (one of C, softmax) from the binary removal mask
   alone. Its held-out accuracy above the majority-class rate is the class information the mask's shape carries:
   the most a perturbation metric can leak. A constant map (random tie order) gives chance; the ground-truth
   row gives the leakage of object-shaped holes.
2. **mask detection per substrate**: how visible the removal mask stays in the perturbed image the classifier
   sees, for each substrate: ``zero`` (deletion's: removed pixels set to 0 in normalised space, the mean colour),
   ``blur`` (M_F's and insertion's: the Gaussian blur of the image), ``road`` (ROAD's noisy linear imputation,
   :func:`~maskbench.metrics.road.linear_imputation` plus Gaussian noise of std
   ``NOISE_STD`` on the removed pixels). A small fully convolutional detector is trained to
   predict the removed pixels from the perturbed image (pooled over methods, at most
   :data:`DETECTOR_EXAMPLES` per fold); the value is its held-out pixel AUROC (0.5: the hole cannot be seen; 1:
   it can be read off exactly).
3. **leakage per method and substrate**: the class probe of 1, trained on the masks the detector of 2 recovers
   from the perturbed images: the class information an observer of the perturbed image alone can get from the
   hole. This is what a classifier could exploit; it is at most the mask-only value (up to noise).

Values are accuracies in %, with the majority-class rate of the same held-out examples and the 95% percentile
bootstrap interval over images (:mod:`maskbench.core.stats`). MoRF only: under LeRF the kept pixels are the object
itself, so a probe of the perturbed image would read the class from the content, not from the hole.

Deviations: Rong et al. show the leakage with a classifier trained on fixed-value imputations and argue from the
detectability of the mask; they do not define one number per method. The probes here are ours (architecture,
fractions, 32 px input, two folds, fixed epochs: see the constants). The detector reads the perturbed image, so
for MoRF at small fractions it may also learn where objects usually are; the mask-only row bounds what it can
recover.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskbench.core.images import gaussian_blur, scaled_sigma
from maskbench.core.render import csv_text, escape
from maskbench.core.stats import column_intervals
from maskbench.core.storage import atomic_write, read_json, write_json
from maskbench.metrics.faithfulness import MF_SIGMA_224, MF_TRUNCATE, PADDING, reveal_fractions, tie_seed
from maskbench.metrics.road import NOISE_STD, linear_imputation

FRACTIONS = (0.1, 0.3, 0.5)  # MoRF fractions removed (ROAD's grid starts at 10%)
PROBE_SIZE = 32  # masks and images are average-pooled to this side for the probes
EPOCHS = 12  # passes over the training fold, but at least MIN_STEPS optimiser steps (small folds)
MIN_STEPS = 300
BATCH = 64
LR = 3e-3
SUBSTRATES = ("zero", "blur", "road")
DETECTOR_EXAMPLES = 4000  # the detector of a fold trains on at most this many perturbed images (seeded subsample)


class Probe(nn.Module):
    """Three stride-2 3x3 convolutions (16, 32, 32 channels, ReLU), 4 x 4 average pooling, a linear layer."""

    def __init__(self, in_channels: int, outputs: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def detector(in_channels: int = 3) -> nn.Module:
    """Per-pixel logits of "removed" from a perturbed image: three 3x3 convolutions (16, 16 channels, ReLU)."""
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(),
                         nn.Conv2d(16, 1, 3, 1, 1))


def _fit(net: nn.Module, x: Tensor, y: Tensor, loss: Callable[[Tensor, Tensor], Tensor], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    net.train()
    for _ in range(max(EPOCHS, math.ceil(MIN_STEPS / math.ceil(len(x) / BATCH)))):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad(set_to_none=True)
            loss(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def folds(image_ids: list[str], seed: int = 0) -> dict[str, int]:
    """Image id -> fold 0 or 1 (a seeded half of the sorted ids each)."""
    ids = sorted(image_ids)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    return {ids[j]: int(k >= len(ids) // 2) for k, j in enumerate(order)}


@dataclass
class Examples:
    """The probe's data for one method: one row per (image, true class, fraction)."""

    masks: Tensor  # (N, 1, h, w) float 0/1 removal masks at PROBE_SIZE
    full: Tensor  # (N, H, W) bool removal masks at the image size
    image: Tensor  # (N,) long index into the run's images
    target: Tensor  # (N,) long class
    fraction: Tensor  # (N,) float


def examples(maps: dict[str, tuple[np.ndarray, np.ndarray]], labels: dict[str, Tensor],
             image_ids: list[str]) -> Examples:
    """MoRF removal masks of every true class of every image from its cached ``(classes, maps)``."""
    full, image, target, frac = [], [], [], []
    for i, iid in enumerate(image_ids):
        classes, m = maps[iid]
        true = labels[iid]
        seen: set[int] = set()
        for k, c in enumerate(classes.tolist()):
            if c in seen or not true[c] > 0:
                continue
            seen.add(c)
            removed = reveal_fractions(torch.from_numpy(m[k : k + 1].astype(np.float32)), FRACTIONS,
                                       [tie_seed(iid, c)])[0] > 0.5
            full.append(removed)
            image += [i] * len(FRACTIONS)
            target += [c] * len(FRACTIONS)
            frac += list(FRACTIONS)
    f = torch.cat(full) if full else torch.zeros(0, 1, 1, dtype=torch.bool)
    return Examples(_pool(f[:, None].float()), f, torch.tensor(image, dtype=torch.long),
                    torch.tensor(target, dtype=torch.long), torch.tensor(frac))


def _pool(x: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(x, PROBE_SIZE) if x.shape[-1] != PROBE_SIZE else x


def substrate(name: str, images: Tensor, removed: Tensor, seeds: list[int]) -> Tensor:
    """The perturbed images (N, 3, H, W) the classifier would see: ``removed`` (N, H, W) pixels filled by the
    substrate ``name`` (see the module)."""
    keep = (~removed)[:, None].float()
    if name == "zero":
        return images * keep
    if name == "blur":
        blurred = gaussian_blur(images, scaled_sigma(MF_SIGMA_224, images.shape[-1]), MF_TRUNCATE, PADDING)
        return images * keep + blurred * (1 - keep)
    if name == "road":
        noise = torch.stack([torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(int(sd)))
                             for sd in seeds]).to(images.device) if len(seeds) else torch.zeros_like(images)
        return linear_imputation(images, removed) + NOISE_STD * noise * (1 - keep)
    raise ValueError(f"unknown substrate {name!r}; valid: {', '.join(SUBSTRATES)}")


def _class_probe(x: Tensor, ex: Examples, fold_of: Tensor, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Out-of-fold (correct, majority-correct) per example of the class probe on inputs ``x``."""
    correct = torch.zeros(len(x), dtype=torch.bool)
    chance = torch.zeros(len(x), dtype=torch.bool)
    for k in (0, 1):
        tr, te = fold_of != k, fold_of == k
        if not tr.any() or not te.any():
            continue
        net = _fit(Probe(x.shape[1], classes), x[tr], ex.target[tr], F.cross_entropy, seed + k)
        with torch.no_grad():
            correct[te] = net(x[te]).argmax(1) == ex.target[te]
        chance[te] = ex.target[te] == torch.bincount(ex.target[tr], minlength=classes).argmax()
    return correct, chance


def leakage_rows(maps: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], images: Tensor,
                 labels: dict[str, Tensor], image_ids: list[str], classes: int, seed: int = 0,
                 progress: Callable[[str], None] | None = None, substrates: tuple[str, ...] = SUBSTRATES
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (method, probe, image): held-out accuracy and majority rate (%, mean over the image's examples), and
    per substrate the detector's held-out pixel AUROC. ``maps``: method -> image id -> cached (classes, maps);
    ``images`` (N, 3, H, W) in ``image_ids`` order."""
    from torchmetrics.functional.classification import binary_auroc

    fold_img = folds(image_ids, seed)
    exs = {m: examples(v, labels, image_ids) for m, v in maps.items()}
    recs: list[dict[str, Any]] = []
    detection: list[dict[str, Any]] = []

    def record(method: str, probe: str, ex: Examples, correct: Tensor, chance: Tensor) -> None:
        for i in sorted(set(ex.image.tolist())):
            sel = ex.image == i
            recs.append({"method": method, "probe": probe, "image_id": image_ids[i],
                         "accuracy": 100.0 * float(correct[sel].float().mean()),
                         "majority": 100.0 * float(chance[sel].float().mean())})

    for method, ex in exs.items():
        if progress:
            progress(f"leakage: {method}: mask only")
        fold_of = torch.tensor([fold_img[image_ids[i]] for i in ex.image.tolist()], dtype=torch.long)
        record(method, "mask", ex, *_class_probe(ex.masks, ex, fold_of, classes, seed))
    for sub in substrates:
        if progress:
            progress(f"leakage: substrate {sub}")
        perturbed, seeds_all = {}, {}
        for method, ex in exs.items():
            seeds = [tie_seed(f"{image_ids[i]}/{method}/{f:.2f}", c) for i, c, f in
                     zip(ex.image.tolist(), ex.target.tolist(), ex.fraction.tolist(), strict=True)]
            chunks = [substrate(sub, images[ex.image[j : j + 256]], ex.full[j : j + 256], seeds[j : j + 256])
                      for j in range(0, len(ex.image), 256)]
            perturbed[method] = _pool(torch.cat(chunks)) if chunks else torch.zeros(0, 3, PROBE_SIZE, PROBE_SIZE)
            seeds_all[method] = seeds
        recovered = {m: torch.zeros_like(ex.masks) for m, ex in exs.items()}
        scores, truth = [], []
        for k in (0, 1):
            xs, ys = [], []
            for method, ex in exs.items():
                tr = torch.tensor([fold_img[image_ids[i]] != k for i in ex.image.tolist()], dtype=torch.bool)
                xs.append(perturbed[method][tr])
                ys.append(ex.masks[tr])
            x_tr, y_tr = torch.cat(xs), (torch.cat(ys) > 0.5).float()
            if len(x_tr) > DETECTOR_EXAMPLES:
                pick = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed + k))[:DETECTOR_EXAMPLES]
                x_tr, y_tr = x_tr[pick], y_tr[pick]
            net = _fit(detector(), x_tr, y_tr, F.binary_cross_entropy_with_logits, seed + 10 + k)
            with torch.no_grad():
                for method, ex in exs.items():
                    te = torch.tensor([fold_img[image_ids[i]] == k for i in ex.image.tolist()], dtype=torch.bool)
                    if te.any():
                        logits = net(perturbed[method][te])
                        recovered[method][te] = torch.sigmoid(logits)
                        scores.append(logits.flatten())
                        truth.append((ex.masks[te] > 0.5).flatten().long())
        auc = float(binary_auroc(torch.cat(scores), torch.cat(truth))) if scores else math.nan
        detection.append({"substrate": sub, "auroc": auc})
        for method, ex in exs.items():
            fold_of = torch.tensor([fold_img[image_ids[i]] for i in ex.image.tolist()], dtype=torch.long)
            record(method, sub, ex, *_class_probe(recovered[method], ex, fold_of, classes, seed))
    return pd.DataFrame.from_records(recs), pd.DataFrame.from_records(detection)


def summarise(rows: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (method, probe): mean accuracy and majority rate over images with the 95% bootstrap interval of the
    accuracy and of the excess (accuracy - majority)."""
    recs = []
    for (method, probe), g in rows.groupby(["method", "probe"], sort=False):
        v = g.sort_values("image_id")[["accuracy", "majority"]].to_numpy(dtype=np.float64)
        mean, lo, hi = column_intervals(np.column_stack([v, v[:, 0] - v[:, 1]]), resamples, seed)
        recs.append({"method": method, "probe": probe, "accuracy": float(mean[0]), "ci_low": float(lo[0]),
                     "ci_high": float(hi[0]), "majority": float(mean[1]), "excess": float(mean[2]),
                     "excess_low": float(lo[2]), "excess_high": float(hi[2]), "images": len(v)})
    return pd.DataFrame.from_records(recs)


def _latex(summary: pd.DataFrame, detection: pd.DataFrame, labels: dict[str, str], where: str) -> str:
    probes = ["mask", *SUBSTRATES]
    cell = {(r.method, r.probe): r for r in summary.itertuples()}
    auc = {r.substrate: r.auroc for r in detection.itertuples()}
    heads = ["mask only", *[f"{s} (AUC {auc.get(s, math.nan):.2f})" for s in SUBSTRATES]]
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{Class leakage through the removal mask ({where}; after Rong et al., 2022): held-out "
             r"accuracy (\%) of a small CNN predicting the explained class from the MoRF removal masks "
             rf"(fractions {', '.join(f'{f:g}' for f in FRACTIONS)}) minus the majority-class rate, from the mask "
             r"alone and from the mask a detector recovers from the perturbed image of each substrate (zero: "
             r"deletion; blur: M\textsubscript{F}, insertion; road: noisy linear imputation); the detector's "
             r"held-out pixel AUROC in the header (0.5: the hole is invisible). 95\% bootstrap intervals over "
             r"images in leakage.csv.}", r"\label{tab:leakage}",
             r"\begin{tabular}{l" + "r" * len(probes) + "}", r"\toprule",
             " & ".join(["Method", *heads]) + r" \\", r"\midrule"]
    for m in dict.fromkeys(summary["method"]):
        vals = []
        for p in probes:
            r = cell.get((m, p))
            vals.append("--" if r is None or math.isnan(r.excess) else f"{r.excess:+.1f}")
        lines.append(" & ".join([escape(labels.get(m, m)), *vals]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def write_leakage(run_dir: Path, rows: pd.DataFrame, detection: pd.DataFrame, labels: dict[str, str],
                  where: str, *, resamples: int = 1000, seed: int = 0) -> list[Path]:
    """``sanity/leakage_rows.csv`` (per image), ``sanity/leakage_detection.csv`` (detector AUROC per substrate) and
    ``sanity/leakage.json`` (row labels, caption), then ``leakage.csv`` (summary, detector AUROC rows with probe
    ``detector``) and ``leakage.tex`` from them as stored (:func:`rebuild_leakage`, run by ``maskbench tables``)."""
    (run_dir / "sanity").mkdir(parents=True, exist_ok=True)
    written = [atomic_write(run_dir / "sanity" / "leakage_rows.csv", csv_text(rows)),
               atomic_write(run_dir / "sanity" / "leakage_detection.csv", csv_text(detection)),
               write_json(run_dir / "sanity" / "leakage.json", {"labels": labels, "where": where})]
    return written + rebuild_leakage(run_dir, resamples=resamples, seed=seed)


def rebuild_leakage(run_dir: Path, *, resamples: int = 1000, seed: int = 0) -> list[Path]:
    """``leakage.csv`` / ``.tex`` from a run's stored leakage rows (nothing when it has none): no probe runs."""
    sanity = run_dir / "sanity"
    files = [sanity / "leakage_rows.csv", sanity / "leakage_detection.csv", sanity / "leakage.json"]
    if not all(f.is_file() for f in files):
        return []
    rows = pd.read_csv(files[0], dtype={"image_id": str}, keep_default_na=False, na_values=[""])
    detection = pd.read_csv(files[1], keep_default_na=False, na_values=[""])
    info = read_json(files[2])
    summary = summarise(rows, resamples, seed)
    det = detection.rename(columns={"substrate": "probe", "auroc": "accuracy"}).assign(method="detector")
    return [atomic_write(run_dir / "leakage.csv", csv_text(pd.concat([summary, det], ignore_index=True))),
            atomic_write(run_dir / "leakage.tex", _latex(summary, detection, info["labels"], info["where"]))]
