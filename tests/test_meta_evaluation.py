"""Meta-evaluation (benchmark/meta_evaluation.py) on cases whose answers are known by construction."""

import math

import numpy as np
import pandas as pd
import pytest

from maskbench.benchmark import meta_evaluation as me
from maskbench.core.stats import mean_of


def test_kendall_tau_of_a_statistic_with_itself_is_1_and_with_its_reverse_minus_1():
    rng = np.random.default_rng(0)
    point = np.arange(6, dtype=float)
    samples = point[:, None] + rng.normal(0, 0.01, (6, 200))  # rankings never change over the draws
    table = me.agreement({"a": (point, samples), "same": (point.copy(), samples.copy()),
                          "reverse": (-point, -samples)}).set_index(["statistic_a", "statistic_b"])
    assert table.loc[("a", "same"), ["tau", "ci_low", "ci_high"]].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert table.loc[("a", "reverse"), ["tau", "ci_low", "ci_high"]].tolist() == pytest.approx([-1.0, -1.0, -1.0])
    assert table.loc[("reverse", "a"), "tau"] == pytest.approx(-1.0)
    assert table.loc[("a", "a"), "tau"] == pytest.approx(1.0)
    assert me.kendall(np.array([1.0, 2, np.nan]), np.array([1.0, 2, 3])) == 1.0  # NaN methods left out
    assert math.isnan(me.kendall(np.array([1.0, np.nan]), np.array([1.0, 2])))


def test_separation_counts_the_pairs_a_statistic_tells_apart():
    rng = np.random.default_rng(1)
    apart = np.array([[0.0], [10.0], [20.0]]) + rng.normal(0, 0.1, (3, 500))
    assert me.separation(apart) == (3, 3)
    noise = rng.normal(0, 1, (1, 500)).repeat(3, 0) + rng.normal(0, 0.01, (3, 500))
    noise -= noise.mean(1, keepdims=True)  # the same centre: no pair differs beyond its noise
    assert me.separation(noise) == (3, 0)


def test_bootstrap_p_values():
    assert me.bootstrap_p(np.full(999, 2.0)) == pytest.approx(2 / 1000)  # never <= 0 in 999 draws
    assert me.bootstrap_p(np.linspace(-1, 1, 1001)) == 1.0  # centred on 0
    assert math.isnan(me.bootstrap_p(np.array([np.nan])))


def test_methods_against_the_random_row_with_benjamini_hochberg_and_ranks():
    rng = np.random.default_rng(2)
    images = [f"{i:03d}" for i in range(60)]
    base = rng.uniform(0, 1, 60)
    values = {"random-uniform": base, "same": base, "better": base + 1.0, "worse": base - 0.5}
    rows = pd.DataFrame([(m, i, "x", float(v)) for m, vs in values.items() for i, v in zip(images, vs, strict=True)],
                        columns=["method", "image_id", "metric", "value"])
    heads = [me.Headline("t", mean_of("x", "X", True), "X")]
    out = me.meta_tables(rows, ["same", "better", "worse"], heads, images, resamples=400, seed=0)
    vs = out["vs_random"].set_index("method")
    assert vs.loc["better", "delta"] == pytest.approx(1.0) and vs.loc["worse", "delta"] == pytest.approx(-0.5)
    assert vs.loc["same", "delta"] == 0.0 and vs.loc["same", "p_value"] == 1.0 and not vs.loc["same", "significant"]
    assert vs.loc["better", "significant"] and vs.loc["worse", "significant"]
    # BH: q = p * m / rank, monotone; here p(better) = p(worse) = 2 / 401, so q = 3/2 of it (3 tests)
    assert vs.loc["better", "q_value"] == pytest.approx(2 / 401 * 3 / 2)
    ranks = out["ranks"].set_index("method")
    assert ranks["rank"].to_dict() == {"same": 2.0, "better": 1.0, "worse": 3.0}
    assert ranks.loc["better", "p_best"] == 1.0 and ranks.loc["worse", "rank_ci_low"] == 3.0
    lower = me.meta_tables(rows.assign(value=-rows["value"]), ["same", "better", "worse"],
                           [me.Headline("t", mean_of("x", "X", False), "X")], images, 400, 0)
    # lower is better on the negated values: the same ranking once oriented
    assert lower["ranks"].set_index("method")["rank"].to_dict() == {"same": 2.0, "better": 1.0, "worse": 3.0}
    sep = out["separation"].iloc[0]
    assert (sep["pairs"], sep["separated"]) == (3, 3)


def test_ties_share_the_mean_rank():
    point, samples = me.ranks(np.array([1.0, 1.0, 0.0]), np.array([[1.0], [1.0], [0.0]]))
    assert point.tolist() == [1.5, 1.5, 3.0] and samples[:, 0].tolist() == [1.5, 1.5, 3.0]


def test_the_vectorised_tau_b_equals_scipys_for_every_draw():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, (7, 50)).astype(float)  # many ties
    b = a + rng.integers(-2, 3, (7, 50))
    a[2, :5] = np.nan  # a method undefined in some draws
    got = me.kendall_draws(a, b)
    for r in range(50):
        ok = ~(np.isnan(a[:, r]) | np.isnan(b[:, r]))
        want = kendalltau(a[ok, r], b[ok, r]).statistic
        assert (math.isnan(got[r]) and math.isnan(want)) or got[r] == pytest.approx(want), r
