"""Metrics judged against each other, and each method against the random row: pure functions of stored rows.

The leaderboard ranks methods by one headline statistic per table. Whether those statistics agree, whether each
separates methods beyond its own noise, and whether a method beats chance at all are questions about the
metrics (Tomsett et al., "Sanity Checks for Saliency Metrics", AAAI 2020; MetaQuantus, Hedstrom et al., TMLR
2023; AttriBench's "difference to the random baseline"). Every quantity below uses the run's bootstrap draws
over images (:func:`~maskbench.core.stats.statistic_samples`: the same draws as every table's intervals, shared
by all methods and statistics, so differences and rankings are paired):

* **Agreement** (``meta_agreement.csv`` / ``.tex``): for each pair of headline statistics, Kendall's tau-b
  (``scipy.stats.kendalltau``) between the methods' values, each oriented so that higher is better; its 95%
  interval is the percentile interval of tau over the draws, where tau-b is computed for all draws at once
  (:func:`kendall_draws`, the same formula as scipy's, checked against it in the tests: one scipy call per
  draw and pair took seconds per table rebuild). A statistic with itself gives 1, with its reverse -1.
* **Separation** (``meta_separation.csv``): the share of method pairs whose paired-bootstrap 95% interval of
  the difference excludes 0: 1 = the statistic tells every pair apart, 0 = none beyond its noise.
* **Against the random row** (``meta_vs_random.csv`` / ``.tex``): each method's oriented difference to
  ``random-uniform``, its 95% interval, the two-sided bootstrap p-value ``min(1, 2 min((#{d* <= 0} + 1),
  (#{d* >= 0} + 1)) / (R + 1))`` and the Benjamini-Hochberg q-value over all (method, statistic) tests of the
  run (``scipy.stats.false_discovery_control``); significant at q < 0.05.
* **Rank stability** (``meta_ranks.csv``): each method's rank (1 = best; ties share the mean rank,
  ``scipy.stats.rankdata``) on the point estimates and over the draws: median, 95% interval, and the share of
  draws in which it ranks first.

Methods: the competing ones (no reference rows, no pseudo-rows); the random row only as the baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from maskbench.core.render import csv_text, escape, plain_latex
from maskbench.core.stats import Estimate, Statistic, percentile_interval, statistic_samples
from maskbench.core.storage import atomic_write

RANDOM_ROW = "random-uniform"
ALPHA = 0.05


@dataclass(frozen=True)
class Headline:
    """A leaderboard statistic: its table, the statistic, and its leaderboard label."""

    table: str
    stat: Statistic
    label: str


def oriented(est: dict[str, Estimate], methods: list[str], higher_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """(M,) point values and (M, R) samples of ``methods``, signed so that higher is better."""
    sign = 1.0 if higher_is_better else -1.0
    point = np.array([sign * est[m].value for m in methods], dtype=np.float64)
    samples = np.stack([sign * est[m].samples for m in methods]) if methods else np.zeros((0, 0))
    return point, samples


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two vectors, methods with a NaN in either left out; NaN with fewer than 2 left."""
    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 2:
        return math.nan
    return float(sps.kendalltau(a[ok], b[ok]).statistic)


def kendall_draws(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between the columns of two (M, R) arrays, for every draw r at once: ``(C - D) /
    sqrt((P - T_a) (P - T_b))`` over the pairs of rows defined in both (P pairs, C concordant, D discordant,
    T ties in one variable). NaN where fewer than 2 rows are defined or one variable is constant."""
    ok = ~(np.isnan(a) | np.isnan(b))  # (M, R)
    da = np.sign(a[:, None, :] - a[None, :, :])  # (M, M, R)
    db = np.sign(b[:, None, :] - b[None, :, :])
    both = ok[:, None, :] & ok[None, :, :] & np.triu(np.ones((a.shape[0],) * 2, dtype=bool), 1)[:, :, None]
    da, db = np.where(both, da, 0.0), np.where(both, db, 0.0)
    pairs = both.sum((0, 1)).astype(np.float64)
    s = (da * db).sum((0, 1))
    untied_a, untied_b = (da != 0).sum((0, 1)), (db != 0).sum((0, 1))
    den = np.sqrt(untied_a.astype(np.float64) * untied_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((den > 0) & (pairs > 0), s / np.where(den > 0, den, 1.0), np.nan)


def agreement(values: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Kendall tau (point and percentile interval over the draws) for every ordered pair of statistics (tau is
    symmetric: each unordered pair is computed once)."""
    names = list(values)
    done: dict[tuple[str, str], dict] = {}
    for i, a in enumerate(names):
        for b in names[i:]:
            (pa, sa), (pb, sb) = values[a], values[b]
            draws = kendall_draws(sa, sb)
            lo, hi = percentile_interval(draws)
            done[(a, b)] = {"tau": kendall(pa, pb), "ci_low": lo, "ci_high": hi,
                            "methods": int((~(np.isnan(pa) | np.isnan(pb))).sum())}
    recs = [{"statistic_a": a, "statistic_b": b, **done.get((a, b), done.get((b, a), {}))}
            for a in names for b in names]
    return pd.DataFrame.from_records(recs, columns=["statistic_a", "statistic_b", "tau", "ci_low", "ci_high",
                                                    "methods"])


def separation(samples: np.ndarray) -> tuple[int, int]:
    """(pairs, pairs whose paired-bootstrap interval of the difference excludes 0) among the rows of (M, R)."""
    pairs = separated = 0
    for i, j in combinations(range(samples.shape[0]), 2):
        lo, hi = percentile_interval(samples[i] - samples[j])
        if math.isnan(lo):
            continue
        pairs += 1
        separated += int(lo > 0 or hi < 0)
    return pairs, separated


def bootstrap_p(diff: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0 (see the module docstring)."""
    d = diff[~np.isnan(diff)]
    if not len(d):
        return math.nan
    below, above = (d <= 0).sum() + 1, (d >= 0).sum() + 1
    return float(min(1.0, 2 * min(below, above) / (len(d) + 1)))


def ranks(point: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M,) ranks of the point values and (M, R) ranks per draw; 1 = best (highest), ties share the mean rank."""
    def rank(v: np.ndarray) -> np.ndarray:
        out = np.full(v.shape, np.nan)
        ok = ~np.isnan(v)
        out[ok] = sps.rankdata(-v[ok])
        return out

    draws = sps.rankdata(-samples, axis=0, nan_policy="omit") if samples.size else samples
    return rank(point), draws


def meta_tables(rows: pd.DataFrame, methods: list[str], headlines: list[Headline], image_ids: list[str],
                resamples: int, seed: int) -> dict[str, pd.DataFrame]:
    """The four meta-evaluation tables (see the module docstring) of ``methods`` on ``headlines``."""
    values, sep, vs_random, rank_rows = {}, [], [], []
    with_random = [*methods, RANDOM_ROW] if (rows["method"] == RANDOM_ROW).any() else methods
    estimates = statistic_samples(rows, with_random, [h.stat for h in headlines], image_ids, resamples, seed)
    for h in headlines:
        est = estimates[h.stat.name]
        present = [m for m in methods if m in est]
        point, samples = oriented(est, present, h.stat.higher_is_better)
        if len(present) < 2:
            continue
        values[h.label] = (point, samples)
        pairs, separated = separation(samples)
        sep.append({"statistic": h.label, "table": h.table, "methods": len(present), "pairs": pairs,
                    "separated": separated, "separation": separated / pairs if pairs else math.nan})
        if RANDOM_ROW in est:
            rp, rs = oriented(est, [RANDOM_ROW], h.stat.higher_is_better)
            for k, m in enumerate(present):
                diff = samples[k] - rs[0]
                lo, hi = percentile_interval(diff)
                vs_random.append({"statistic": h.label, "method": m, "delta": point[k] - rp[0], "ci_low": lo,
                                  "ci_high": hi, "p_value": bootstrap_p(diff)})
        rp_, rs_ = ranks(point, samples)
        first = np.fmin.reduce(rs_, axis=0)  # the best rank of each draw (NaN where no method is defined)
        for k, m in enumerate(present):
            lo, hi = percentile_interval(rs_[k])
            defined = rs_[k][~np.isnan(rs_[k])]
            rank_rows.append({"statistic": h.label, "method": m, "rank": rp_[k],
                              "rank_median": float(np.median(defined)) if len(defined) else math.nan,
                              "rank_ci_low": lo, "rank_ci_high": hi,
                              "p_best": float(np.mean(rs_[k] == first)) if len(defined) else math.nan})
    vs = pd.DataFrame.from_records(vs_random, columns=["statistic", "method", "delta", "ci_low", "ci_high",
                                                       "p_value"])
    if len(vs):
        ok = vs["p_value"].notna()
        vs["q_value"] = math.nan
        vs.loc[ok, "q_value"] = sps.false_discovery_control(vs.loc[ok, "p_value"].to_numpy(), method="bh")
        vs["significant"] = vs["q_value"] < ALPHA
    return {"agreement": agreement(values), "separation": pd.DataFrame.from_records(sep),
            "vs_random": vs, "ranks": pd.DataFrame.from_records(rank_rows)}


def _agreement_latex(table: pd.DataFrame, where: str, resamples: int, seed: int) -> str:
    names = list(dict.fromkeys(table["statistic_a"]))
    cell = {(r.statistic_a, r.statistic_b): r for r in table.itertuples()}
    frame = pd.DataFrame([{"row": escape(a), **{b: "--" if math.isnan(cell[(a, b)].tau) else
                                                 f"{cell[(a, b)].tau:.2f} {{\\scriptsize[{cell[(a, b)].ci_low:.2f}, "
                                                 f"{cell[(a, b)].ci_high:.2f}]}}" for b in names}} for a in names])
    caption = (rf"Agreement of the leaderboard statistics ({where}): Kendall's $\tau_b$ between the methods' values "
               rf"(each oriented so that higher is better), with the 95\% percentile interval over {resamples} "
               rf"bootstrap draws of the images (seed {seed}). 1: the same ranking; -1: reversed; reference rows "
               rf"left out.")
    return plain_latex(frame, {"row": "", **{n: n for n in names}}, caption, "tab:meta-agreement")


def _vs_random_latex(table: pd.DataFrame, labels: dict[str, str], where: str) -> str:
    stats_ = list(dict.fromkeys(table["statistic"]))
    cell = {(r.statistic, r.method): r for r in table.itertuples()}

    def text(r: Any) -> str:
        if r is None or math.isnan(r.delta):
            return "--"
        return rf"\textbf{{{r.delta:+.2f}}}" if bool(r.significant) else f"{r.delta:+.2f}"

    frame = pd.DataFrame([{"method": escape(labels.get(m, m)), **{s: text(cell.get((s, m))) for s in stats_}}
                          for m in dict.fromkeys(table["method"])])
    caption = (rf"Each method against the uniform-random row ({where}): difference of the leaderboard statistic "
               r"(oriented so that positive is better than random), bold where the Benjamini-Hochberg q-value of "
               r"the paired-bootstrap test is below 0.05 (all tests of the run corrected together), -- where "
               r"undefined.")
    return plain_latex(frame, {"method": "Method", **{s: s for s in stats_}}, caption, "tab:meta-vs-random")


def write_meta_tables(run_dir, rows: pd.DataFrame, methods: list[str], headlines: list[Headline],
                      image_ids: list[str], labels: dict[str, str], where: str, resamples: int,
                      seed: int) -> list:
    """Write the meta-evaluation files of a run (nothing when fewer than two methods or statistics)."""
    if len(methods) < 2 or not headlines:
        return []
    tables = meta_tables(rows, methods, headlines, image_ids, resamples, seed)
    out = []
    if len(tables["agreement"]):
        out.append(atomic_write(run_dir / "meta_agreement.csv", csv_text(tables["agreement"])))
        out.append(atomic_write(run_dir / "meta_agreement.tex",
                                _agreement_latex(tables["agreement"], where, resamples, seed)))
    if len(tables["separation"]):
        out.append(atomic_write(run_dir / "meta_separation.csv", csv_text(tables["separation"])))
    if len(tables["vs_random"]):
        out.append(atomic_write(run_dir / "meta_vs_random.csv", csv_text(tables["vs_random"])))
        out.append(atomic_write(run_dir / "meta_vs_random.tex", _vs_random_latex(tables["vs_random"], labels, where)))
    if len(tables["ranks"]):
        out.append(atomic_write(run_dir / "meta_ranks.csv", csv_text(tables["ranks"])))
    return out
