"""Bootstrap statistics of the tables on value sets whose answers are known by construction."""

import numpy as np
import pandas as pd
import pytest

from maskbench.core.stats import (
    bootstrap_weights,
    class_mean,
    column_intervals,
    column_means,
    estimate,
    f_score,
    mean_of,
    ratio_of_sums,
    statistics_table,
)


def _rows(method, values: dict[str, list[float]]):
    recs = [(method, f"i{i:04d}", metric, v) for metric, vals in values.items() for i, v in enumerate(vals)]
    return pd.DataFrame.from_records(recs, columns=["method", "image_id", "metric", "value"])


def test_column_means_leave_out_undefined_values():
    x = np.array([[1.0, np.nan], [3.0, 4.0], [np.nan, 8.0]])
    assert column_means(x, np.ones((1, 3))).tolist() == [[2.0, 6.0]]
    # counts weight repeated images: image 0 twice, image 2 once
    assert column_means(x, np.array([[2.0, 0.0, 1.0]])).tolist() == [[1.0, 8.0]]


def test_column_intervals_per_column_mean_and_interval():
    rng = np.random.default_rng(3)
    n = 400
    x = np.column_stack([np.full(n, 7.0), rng.normal(50.0, 10.0, n), np.full(n, np.nan), rng.normal(0.0, 1.0, n)])
    x[::4, 3] = np.nan  # a quarter undefined: left out of the mean, not counted as 0
    mean, lo, hi = column_intervals(x, resamples=500, seed=1)
    assert mean[0] == lo[0] == hi[0] == 7.0  # a constant has no spread
    assert mean[1] == pytest.approx(x[:, 1].mean()) and lo[1] < mean[1] < hi[1]
    # the 95% interval of a mean of n N(50, 10) draws is about +-1.96 * 10 / sqrt(n) wide
    assert (hi[1] - lo[1]) / 2 == pytest.approx(1.96 * x[:, 1].std() / np.sqrt(n), rel=0.2)
    assert np.isnan(mean[2]) and np.isnan(lo[2]) and np.isnan(hi[2])
    assert mean[3] == pytest.approx(np.nanmean(x[:, 3])) and lo[3] < mean[3] < hi[3]
    # the same draws as the tables' bootstrap: a column's interval does not depend on its neighbours
    alone = column_intervals(x[:, 1:2], resamples=500, seed=1)
    assert (alone[1][0], alone[2][0]) == pytest.approx((lo[1], hi[1]), rel=1e-12)


def test_interval_contains_the_estimate_and_shrinks_with_more_images():
    rng = np.random.default_rng(5)
    stat = mean_of("iou", "IoU", True)
    widths = {}
    for n in (50, 800):
        x = rng.normal(60.0, 10.0, size=(n, 1))
        e = estimate(x, ["iou"], stat, bootstrap_weights(n, 1000, seed=0))
        assert e.value == pytest.approx(x.mean())
        assert e.ci_low < e.value < e.ci_high
        widths[n] = e.ci_high - e.ci_low
    # the standard error falls as 1/sqrt(n): 16x the images -> about a quarter of the width
    assert widths[800] < 0.4 * widths[50]
    assert widths[50] == pytest.approx(2 * 1.96 * 10 / np.sqrt(50), rel=0.3)


def test_draws_are_seeded():
    assert np.array_equal(bootstrap_weights(30, 10, seed=3), bootstrap_weights(30, 10, seed=3))
    assert not np.array_equal(bootstrap_weights(30, 10, seed=3), bootstrap_weights(30, 10, seed=4))
    w = bootstrap_weights(30, 10, seed=3)
    assert (w.sum(1) == 30).all()  # each draw resamples all 30 images


def test_class_mean_averages_classes_not_pairs():
    # class 0: 3 images, all hits; class 1: 1 image, a miss -> 50 over classes (75 over pairs)
    rows = _rows("m", {"pointing/c0": [1.0, 1.0, 1.0, np.nan], "pointing/c1": [np.nan, np.nan, np.nan, 0.0]})
    table = statistics_table(rows, ["m"], [class_mean("pointing", "pointing/c", "All", True)], {}, 200, 0)
    assert table["value"].iloc[0] == pytest.approx(0.5)


def test_ratio_of_sums_is_micro_precision_and_f_score():
    # image 0: tp 2 fp 0 fn 1; image 1: tp 1 fp 3 fn 0 -> P = 3/6, R = 3/4, F = 2*3/(6+3+1)
    rows = _rows("m", {"tp": [2, 1], "fp": [0, 3], "fn": [1, 0]})
    stats = [ratio_of_sums("p", ["tp"], ["tp", "fp"], "P", True), ratio_of_sums("r", ["tp"], ["tp", "fn"], "R", True),
             f_score("f", "tp", "fp", "fn", "F")]
    table = statistics_table(rows, ["m"], stats, {}, 100, 0).set_index("statistic")
    assert table.loc["p", "value"] == pytest.approx(50.0)
    assert table.loc["r", "value"] == pytest.approx(75.0)
    assert table.loc["f", "value"] == pytest.approx(60.0)


def test_paired_bootstrap_flags_only_methods_within_noise_of_the_best():
    rng = np.random.default_rng(0)
    base = rng.normal(50, 15, size=200)  # image difficulty shared by all methods
    rows = pd.concat([
        _rows("best", {"iou": list(base + 2.0)}),
        _rows("close", {"iou": list(base + 2.0 - rng.normal(0.0, 0.5, size=200))}),
        _rows("worse", {"iou": list(base + rng.normal(0, 0.5, size=200))}),
        _rows("ref", {"iou": list(base + 40.0)}),  # a reference row: never the best
        _rows("ref2", {"iou": list(base + 2.0)}),  # a reference row equal to the best: never flagged either
    ])
    table = statistics_table(rows, ["best", "close", "worse", "ref", "ref2"], [mean_of("iou", "IoU", True)],
                             {"ref": False, "ref2": False}, 1000, 0).set_index("method")
    assert not table.loc["ref2", "best"] and not table.loc["ref2", "not_different_from_best"]
    assert not table.loc["ref", "best"]
    assert table.loc["best", "best"] != table.loc["close", "best"]  # one of the two equals is the best ...
    other = "close" if table.loc["best", "best"] else "best"
    assert table.loc[other, "not_different_from_best"]  # ... and the other is not significantly different
    assert not table.loc["worse", "not_different_from_best"]
    # unpaired intervals of "best" and "worse" overlap (image difficulty dominates), the paired test still separates
    assert table.loc["worse", "ci_high"] > table.loc["best", "ci_low"]


def test_lower_is_better_picks_the_minimum():
    rows = pd.concat([_rows("a", {"mae": [10.0, 12.0, 11.0]}), _rows("b", {"mae": [30.0, 31.0, 29.0]})])
    table = statistics_table(rows, ["a", "b"], [mean_of("mae", "MAE", False)], {}, 100, 0).set_index("method")
    assert table.loc["a", "best"] and not table.loc["b", "best"]


def test_undefined_images_are_counted():
    rows = _rows("m", {"mi": [50.0, np.nan, 70.0, np.nan]})
    row = statistics_table(rows, ["m"], [mean_of("mi", "M_I", True)], {}, 100, 0).iloc[0]
    assert (row["images"], row["undefined"]) == (2, 2)
    assert row["value"] == pytest.approx(60.0)
