"""Table statistics with bootstrap confidence intervals over images, and paired tests against the best method.

Every table cell is a :class:`Statistic` of the stored per-image rows: the per-image values of a few stored
metric columns are averaged over images (NaN values are undefined for that image and left out of that column's
mean), then the column means are reduced to one number (identity for a plain mean; the mean over classes for
the pointing game; a ratio of sums for precision and recall; diagonal minus off-diagonal for the class table).

Uncertainty is the percentile bootstrap over images (Efron & Tibshirani, 1993): ``resamples`` draws of the
image set with replacement, as multinomial counts ``W`` (R, n); a column mean under draw r is
``sum_i W[r, i] x_i / sum_i W[r, i] [x_i defined]``, i.e. all draws at once as two matrix products. The 95%
interval is the 2.5 and 97.5 percentiles of the R statistics. All methods of a table are resampled with the
same draws (paired), so for the best method b and any other method m, ``s_b - s_m`` has a bootstrap
distribution too; m is *not significantly different from the best* when the 95% interval of that difference
contains 0. Draws are seeded, so tables rebuild to the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95

Reduce = Callable[[np.ndarray, list[str]], np.ndarray]  # (R, C) column means, column names -> (R,)


@dataclass(frozen=True)
class Statistic:
    """One table column: which stored metric columns it reads and how their means become one number."""

    name: str
    label: str
    higher_is_better: bool
    select: Callable[[Sequence[str]], list[str]]
    reduce: Reduce
    description: str = ""


def _first(means: np.ndarray, cols: list[str]) -> np.ndarray:
    return means[:, 0]


def nanmean_rows(means: np.ndarray) -> np.ndarray:
    """Row-wise mean over the defined columns (NaN when a row has none), without RuntimeWarnings."""
    ok = ~np.isnan(means)
    total = np.where(ok, means, 0.0).sum(1)
    count = ok.sum(1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mean_of(metric: str, label: str, higher_is_better: bool, description: str = "") -> Statistic:
    """The mean over images of one stored per-image metric."""
    return Statistic(metric, label, higher_is_better, lambda cols: [metric] if metric in cols else [], _first,
                     description)


def class_mean(name: str, prefix: str, label: str, higher_is_better: bool, description: str = "",
               scale: float = 1.0) -> Statistic:
    """``scale`` x the mean over classes of per-class means: columns ``<prefix><k>`` hold one value per
    (image, class), e.g. ``pointing/c3`` = 1 hit / 0 miss, so ``scale=100`` gives the accuracy in %."""

    def select(cols: Sequence[str]) -> list[str]:
        return sorted((c for c in cols if c.startswith(prefix) and c[len(prefix):].isdigit()),
                      key=lambda c: int(c[len(prefix):]))

    return Statistic(name, label, higher_is_better, select, lambda means, cols: scale * nanmean_rows(means),
                     description)


def ratio_of_sums(name: str, num: Sequence[str], den: Sequence[str], label: str, higher_is_better: bool,
                  description: str = "") -> Statistic:
    """sum_i sum(num) / sum_i sum(den) over images (e.g. precision = TP / (TP + FP)), times 100.

    Means over the same images have the same ratio as sums, so the columns' means are used.
    """
    need = list(dict.fromkeys([*num, *den]))

    def reduce(means: np.ndarray, cols: list[str]) -> np.ndarray:
        idx = {c: i for i, c in enumerate(cols)}
        top = sum(means[:, idx[c]] for c in num)
        bottom = sum(means[:, idx[c]] for c in den)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(bottom > 0, 100.0 * top / bottom, np.nan)

    return Statistic(name, label, higher_is_better, lambda cols: need if set(need) <= set(cols) else [], reduce,
                     description)


def f_score(name: str, tp: str, fp: str, fn: str, label: str, description: str = "") -> Statistic:
    """F1 = 2 TP / (2 TP + FP + FN) from summed counts, times 100."""
    return ratio_of_sums(name, [tp, tp], [tp, tp, fp, fn], label, True, description)


@dataclass
class Estimate:
    value: float
    ci_low: float
    ci_high: float
    images: int  # images with at least one defined value among the statistic's columns
    undefined: int  # images of the table with no defined value
    samples: np.ndarray  # (R,) bootstrap statistics, aligned across methods of the same table


def bootstrap_weights(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(R, n) multinomial counts: R resamples of n images with replacement, seeded."""
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def column_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted means of each column over the defined (non-NaN) entries: (R, n) x (n, C) -> (R, C)."""
    ok = ~np.isnan(values)
    num = weights @ np.where(ok, values, 0.0)
    den = weights @ ok.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of the defined (non-NaN) bootstrap samples; NaNs when none is."""
    s = samples[~np.isnan(samples)]
    if not len(s):
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def column_intervals(values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
                     level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of an (n, C) matrix of per-image values (rows in a fixed image order, NaN = undefined): the
    mean over its defined entries and the ``level`` percentile bootstrap interval of that mean, as three (C,)
    arrays (NaN for a column with no defined entry)."""
    values = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = np.where(ok.any(0), np.where(ok, values, 0.0).sum(0) / ok.sum(0), np.nan)
    draws = column_means(values, bootstrap_weights(len(values), resamples, seed))
    bounds = np.array([percentile_interval(draws[:, j], level) for j in range(values.shape[1])]).reshape(-1, 2)
    return point, bounds[:, 0], bounds[:, 1]


def estimate(values: np.ndarray, cols: list[str], stat: Statistic, weights: np.ndarray) -> Estimate:
    """Point estimate, percentile interval and bootstrap samples of ``stat`` on an (n, C) value matrix."""
    point = float(stat.reduce(column_means(values, np.ones((1, len(values)))), cols)[0])
    samples = stat.reduce(column_means(values, weights), cols)
    lo, hi = percentile_interval(samples)
    defined = int((~np.isnan(values)).any(1).sum())
    return Estimate(point, lo, hi, defined, len(values) - defined, samples)


def wide_values(rows: pd.DataFrame, image_ids: list[str]) -> pd.DataFrame:
    """One method's rows as an (image, metric) matrix over ``image_ids`` (NaN where a cell is not stored)."""
    wide = rows.pivot_table(index="image_id", columns="metric", values="value", aggfunc="first", dropna=False)
    return wide.reindex(image_ids)


def best_index(values: Sequence[float], higher_is_better: bool, eligible: Sequence[bool]) -> int | None:
    """Index of the best eligible value (first on ties), or None."""
    best = None
    for i, (v, ok) in enumerate(zip(values, eligible, strict=True)):
        if not ok or v is None or np.isnan(v):
            continue
        if best is None or (v > values[best] if higher_is_better else v < values[best]):
            best = i
    return best


def same_as_best(best: np.ndarray, other: np.ndarray, level: float = LEVEL) -> bool:
    """Paired bootstrap: the ``level`` interval of ``best - other`` over shared resamples contains 0."""
    lo, hi = percentile_interval(best - other, level)
    return bool(lo <= 0.0 <= hi) if not np.isnan(lo) else False


def statistics_table(rows: pd.DataFrame, methods: list[str], stats: list[Statistic], eligible: dict[str, bool],
                     resamples: int = RESAMPLES, seed: int = SEED, *, image_ids: list[str] | None = None,
                     scored: dict[str, set[str]] | None = None) -> pd.DataFrame:
    """Long table: one row per (statistic, method) with value, 95% CI, image counts, best and tie flags.

    ``rows`` holds every method's per-image rows (columns method, image_id, metric, value); ``eligible`` tells
    which methods compete for best and for "not different from the best" (reference rows do not). The images are
    ``image_ids`` (the run's; default: the union over ``methods``), so the bootstrap draws, shared by all
    methods, do not depend on which other methods are in the folder. ``scored[m]``: the images method ``m`` was
    scored on; the others are counted as ``missing``, apart from ``undefined`` (scored, but no defined value).
    """
    if image_ids is None:
        image_ids = sorted(set(rows.loc[rows["method"].isin(methods), "image_id"]))
    else:
        image_ids = sorted(image_ids)
    weights = bootstrap_weights(len(image_ids), resamples, seed)
    per_method = {m: wide_values(rows[rows["method"] == m], image_ids) for m in methods}
    missing = {}
    for m in methods:
        present = scored[m] if scored is not None and m in scored else set(rows.loc[rows["method"] == m, "image_id"])
        missing[m] = sum(1 for i in image_ids if i not in present)
    records = []
    for stat in stats:
        ests: dict[str, Estimate] = {}
        for m in methods:
            wide = per_method[m]
            cols = stat.select(list(wide.columns))
            if not cols:
                continue
            ests[m] = estimate(wide[cols].to_numpy(dtype=np.float64), cols, stat, weights)
        names = list(ests)
        b = best_index([ests[m].value for m in names], stat.higher_is_better, [eligible.get(m, True) for m in names])
        for m in names:
            e = ests[m]
            is_best = b is not None and m == names[b]
            tied = (b is not None and not is_best and eligible.get(m, True)
                    and same_as_best(ests[names[b]].samples, e.samples))
            records.append({"statistic": stat.name, "label": stat.label, "higher_is_better": stat.higher_is_better,
                            "method": m, "value": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high,
                            "images": e.images, "undefined": e.undefined - missing[m], "missing": missing[m],
                            "best": is_best, "not_different_from_best": tied})
    return pd.DataFrame.from_records(records, columns=["statistic", "label", "higher_is_better", "method", "value",
                                                       "ci_low", "ci_high", "images", "undefined", "missing", "best",
                                                       "not_different_from_best"])


def statistic_samples(rows: pd.DataFrame, methods: list[str], stats: list[Statistic], image_ids: list[str],
                      resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict[str, Estimate]]:
    """Per statistic, each method's :class:`Estimate` (point value and the (R,) bootstrap samples), with the draws
    :func:`statistics_table` uses for the same images and seed, so the samples pair across methods and tables."""
    image_ids = sorted(image_ids)
    weights = bootstrap_weights(len(image_ids), resamples, seed)
    wide = {m: wide_values(rows[rows["method"] == m], image_ids) for m in methods}
    out: dict[str, dict[str, Estimate]] = {}
    for stat in stats:
        out[stat.name] = {}
        for m in methods:
            cols = stat.select(list(wide[m].columns))
            if cols:
                out[stat.name][m] = estimate(wide[m][cols].to_numpy(dtype=np.float64), cols, stat, weights)
    return out
