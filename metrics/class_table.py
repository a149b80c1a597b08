"""Class-specific masking (Stalder et al., NeurIPS 2022, Sec. 4.2, Table 1).

For an image that contains target class t, the image is masked with the mask of class c (for every explained
class c), thresholded at each of 0.1, 0.2, ..., 0.9 (a hard mask on the normalised image, as the paper's code),
and the classifier's softmax probability of t is averaged over the thresholds; the "none" column is the softmax
probability of t on the unmasked image. Values in %. A good class-specific attribution keeps t's probability
with t's own mask (the diagonal) and destroys it with the masks of other classes (off the diagonal).

Per image the metric returns one value per (target t in the image's labels, mask class c among the explained
classes), named ``t<t>/m<c>`` (and ``t<t>/none``); the tables average them over images and summarise each
method by the mean diagonal minus the mean off-diagonal cell ("contrast").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from maskbench.core.render import csv_text, matrix_latex
from maskbench.core.stats import Statistic, mean_of, nanmean_rows, statistics_table

from .base import MetricInputs, TableInputs, TableSpec, forward_in_chunks, register_metric, register_table

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


@register_metric("classmask", higher_is_better=True, table="class_contrast", label="Class masking",
                 valid_range=(0.0, 100.0))
@torch.no_grad()
def class_masking(inputs: MetricInputs) -> dict[str, Tensor]:
    """Softmax probability (%) of each true class under each class's thresholded mask (NeurIPS 2022 Table 1)."""
    b, k = inputs.classes.shape
    masks, images, labels = inputs.masks, inputs.images, inputs.batch.labels
    thr = torch.tensor(THRESHOLDS, device=masks.device, dtype=masks.dtype)
    hard = (masks[:, :, None] > thr[None, None, :, None, None]).to(images.dtype)  # (B, K, T, H, W)
    x = (images[:, None, None] * hard[:, :, :, None]).flatten(0, 2)  # (B*K*T, 3, H, W)
    probs = torch.softmax(forward_in_chunks(inputs.model, x), 1)
    probs = probs.view(b, k, len(THRESHOLDS), -1).mean(2)  # (B, K, C): mean over thresholds
    clean = torch.softmax(forward_in_chunks(inputs.model, images), 1)  # (B, C)
    out: dict[str, Tensor] = {}
    nan = torch.full((b,), float("nan"), device=masks.device)
    for t in torch.nonzero(labels.sum(0) > 0).flatten().tolist():
        has_t = labels[:, t] > 0
        out[f"t{t}/none"] = torch.where(has_t, 100 * clean[:, t], nan)
        for c in sorted(set(inputs.classes.flatten().tolist())):
            # column of class c in each image's explained classes (first occurrence), if explained at all
            match = inputs.classes == c
            present = match.any(1)
            col = match.float().argmax(1)
            val = probs[torch.arange(b, device=masks.device), col, t]
            out[f"t{t}/m{c}"] = torch.where(has_t & present, 100 * val, nan)
    return out


# ------------------------------------------------------------------------------------------------- tables


def class_cell(col: str) -> tuple[int, int] | None:
    """``classmask/t<t>/m<c>`` -> (t, c); None for the "none" column and other metrics."""
    parts = col.split("/")
    if len(parts) != 3 or parts[0] != "classmask" or not parts[2].startswith("m"):
        return None
    return int(parts[1][1:]), int(parts[2][1:])


def _class_statistic(name: str, label: str, higher: bool, part: str) -> Statistic:
    def select(cols: list[str]) -> list[str]:
        return sorted(c for c in cols if class_cell(c) is not None)

    def reduce(means: np.ndarray, cols: list[str]) -> np.ndarray:
        cells = [class_cell(c) for c in cols]
        diag = np.array([t == m for t, m in cells])
        d = nanmean_rows(np.where(diag, means, np.nan))
        o = nanmean_rows(np.where(~diag, means, np.nan))
        return {"diagonal": d, "off_diagonal": o, "contrast": d - o}[part]

    return Statistic(name, label, higher, select, reduce)


def table_class_cells(rows: pd.DataFrame, data_info: dict) -> pd.DataFrame:
    """Keep the class-masking cells whose target and mask are both table classes (NeurIPS 2022 Table 1: the five
    VOC classes against each other). Cells of other true classes are stored too (the rows keep everything) but
    would mix classes with very different image counts into the contrast."""
    table_classes = data_info.get("table_classes")
    if not table_classes:
        return rows
    keep = {f"t{t}" for t in table_classes}
    masks = {f"m{m}" for m in table_classes} | {"none"}
    cm = rows["metric"].str.startswith("classmask/")
    parts = rows.loc[cm, "metric"].str.split("/", expand=True)
    ok = pd.Series(True, index=rows.index)
    ok[cm] = parts[1].isin(keep) & parts[2].isin(masks)
    return rows[ok]


def class_table(inputs: TableInputs) -> pd.DataFrame:
    """Long table of NeurIPS 2022 Table 1: mean softmax probability (%) of target t under the mask of class m."""
    rows, metas = inputs.rows, inputs.metas
    sub = rows[rows["metric"].str.startswith("classmask/")]
    cols = ["method", "label", "target", "mask", "value", "ci_low", "ci_high", "images"]
    if sub.empty:
        return pd.DataFrame(columns=cols)
    stats = []
    for metric in sorted(set(sub["metric"])):
        _, t, m = metric.split("/")
        stats.append(mean_of(metric, f"{t}/{m}", True))
    long = statistics_table(sub, [m for m in inputs.order if m in set(sub["method"])], stats, {},
                            inputs.resamples, inputs.seed, image_ids=inputs.image_ids, scored=inputs.scored)
    parts = long["statistic"].str.split("/", expand=True)
    out = pd.DataFrame({
        "method": long["method"], "label": [metas[m].get("label", m) for m in long["method"]],
        "target": [inputs.class_name(int(t[1:])) for t in parts[1]],
        "mask": ["none" if m == "none" else inputs.class_name(int(m[1:])) for m in parts[2]],
        "value": long["value"], "ci_low": long["ci_low"], "ci_high": long["ci_high"], "images": long["images"],
        "_t": [int(t[1:]) for t in parts[1]], "_m": [-1 if m == "none" else int(m[1:]) for m in parts[2]],
    })
    order = {m: i for i, m in enumerate(inputs.order)}
    out = out.sort_values(["method", "_t", "_m"], key=lambda c: c.map(order) if c.name == "method" else c)
    return out[cols].reset_index(drop=True)


def _class_blocks(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    blocks = []
    for method, sub in table.groupby("method", sort=False):
        masks = ["none"] + [m for m in dict.fromkeys(sub["mask"]) if m != "none"]
        wide = sub.pivot(index="target", columns="mask", values="value")
        wide = wide.reindex(index=list(dict.fromkeys(sub["target"])), columns=masks)
        label = str(sub["label"].iloc[0])
        blocks.append((label if label == method else f"{label} ({method})", wide))
    return blocks


def class_table_files(inputs: TableInputs) -> dict[str, str]:
    """``class_table.csv`` (every cell with its interval) and ``class_table.tex`` (one block per method)."""
    table = class_table(inputs)
    if table.empty:
        return {}
    cap = (rf"Class-specific masking ({inputs.where}), after Stalder et al.\ (2022), Table 1: mean softmax "
           r"probability (\%) of the target class (rows) when the image is masked with the mask of the column's "
           r"class thresholded at 0.1--0.9, or not masked (none); diagonal in bold.")
    return {"class_table.csv": csv_text(table),
            "class_table.tex": matrix_latex(_class_blocks(table), cap, f"tab:class-table-{inputs.label_suffix}")}


register_table(TableSpec(
    "class_contrast",
    (_class_statistic("class_diagonal", "Diagonal", True, "diagonal"),
     _class_statistic("class_off_diagonal", "Off-diagonal", False, "off_diagonal"),
     _class_statistic("class_contrast", "Contrast", True, "contrast")),
    r"Class-specific masking: softmax probability (\%) of a target class under its own class's "
    r"thresholded mask (diagonal) or another class's (off-diagonal), thresholds 0.1--0.9; "
    r"contrast = diagonal $-$ off-diagonal. All cells in class\_table.csv.",
    r"Stalder et al.\ (2022), Table 1", order=50,
    headline=("class_contrast", "Class contrast", "class-masking contrast"),
    keep_rows=table_class_cells, files=class_table_files,
))
