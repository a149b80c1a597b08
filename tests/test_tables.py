"""Tables from stored rows: every table file, byte-for-byte rebuilds, LaTeX structure, CI columns, class table."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
from mb_testutils import make_batch

from maskbench.benchmark.tables import load_current_rows, write_all_tables, write_tables
from maskbench.core.store import RowStore, rows_from_values, with_markers
from maskbench.metrics import METRICS, MetricInputs, TableInputs
from maskbench.metrics.class_table import class_table
from maskbench.metrics.masked_classifier import UNMASKED

TABLES = ["segmentation", "faithfulness", "explainability", "pointing", "class_contrast", "masked_classifier",
          "compute_time", "leaderboard", "class_table"]
METHODS = {"constant-0": "reference", "alpha": "gradient", "beta": "learned"}
N = 40


def _values(quality: float, rng: np.random.Generator) -> dict[str, list[float]]:
    """Per-image values of every stored metric, better with ``quality`` (0..1)."""
    def u(lo, hi):
        return list(rng.uniform(lo, hi, N))

    hits = (rng.uniform(0, 1, N) < quality).astype(float)
    v = {"acc": u(60, 60 + 30 * quality), "iou": u(10, 10 + 70 * quality), "sal": u(1, 3), "mae": u(40, 60),
         "mf": u(50, 60 + 30 * quality), "mf_clipped": u(20, 20 + 70 * quality), "insertion": u(30, 60),
         "deletion": u(10, 40), "mi": u(20, 20 + 70 * quality),
         "pointing/c0": list(hits), "pointing/c1": list(1 - hits), "pointing/d0": list(hits),
         "pointing/constant": [0.0] * N, "pointing/tied": [1.0] + [0.0] * (N - 1), "pointing/no_gt": [0.0] * N,
         "pointing/skipped_difficult": [0.0] * N,
         "maskcls/tp": u(0, 2), "maskcls/fp": u(0, 1), "maskcls/fn": u(0, 1),
         "maskcls/orig_tp": [1.0] * N, "maskcls/orig_fp": [0.0] * N, "maskcls/orig_fn": [1.0] * N}
    for t in (0, 1):
        v[f"classmask/t{t}/none"] = u(60, 90)
        for m in (0, 1):
            v[f"classmask/t{t}/m{m}"] = u(50, 90) if t == m else u(0, 40 * (1 - quality))
    v["mi"][3] = float("nan")  # an undefined value, counted
    return v


@pytest.fixture()
def results(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "synthetic" / "smallcnn"
    store = RowStore(run)
    ids = [f"{i:04d}" for i in range(N)]
    for q, (m, fam) in zip((0.0, 0.3, 0.9), METHODS.items(), strict=True):
        store.save(m, with_markers(rows_from_values(ids, _values(q, rng), run_key="k")))
        store.save_meta(m, {"method": m, "label": m.title(), "family": fam, "preset": "fast", "run_key": "k",
                            "timing": {"explain_seconds": 2.0 * (1 + q), "images": N, "warmup_seconds": 0.5,
                                       "device": "cpu"},
                            "setup": {"train_seconds": 100.0} if fam == "learned" else {}})
    return tmp_path


def _tabular_rows(tex: str) -> list[str]:
    body = tex.split(r"\midrule", 1)[1].split(r"\bottomrule")[0]
    return [ln for ln in body.splitlines() if ln.endswith(r"\\") and not ln.startswith(r"\multicolumn")]


def test_every_table_is_written_and_rebuilds_byte_for_byte(results):
    written = write_all_tables(results)
    run = results / "synthetic" / "smallcnn"
    names = {p.name for p in written}
    for t in TABLES:
        assert f"{t}.csv" in names and f"{t}.tex" in names, t
    assert {"pointing_per_class.csv", "diagnostics.csv"} <= names
    before = {p: p.read_bytes() for p in written}
    for p in written:
        p.unlink()
    write_all_tables(results)
    assert {p: p.read_bytes() for p in before} == before
    # two competing methods and no random row: their agreement, separation and ranks, no test against random
    assert {p.name for p in run.glob("*.tex")} == {f"{t}.tex" for t in TABLES} | {"meta_agreement.tex"}
    assert {"meta_agreement.csv", "meta_separation.csv", "meta_ranks.csv"} <= names


@pytest.mark.parametrize("name", [t for t in TABLES if t != "class_table"])
def test_latex_is_structurally_valid_with_one_row_per_method(results, name):
    write_all_tables(results)
    tex = (results / "synthetic" / "smallcnn" / f"{name}.tex").read_text()
    for env in ("table", "tabular"):
        assert tex.count(rf"\begin{{{env}}}") == tex.count(rf"\end{{{env}}}") == 1
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert tex.count("{") == tex.count("}")
    ncols = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1))
    header = [ln for ln in tex.splitlines() if ln.startswith("Method")]
    rows = _tabular_rows(tex)
    expected = len(METHODS) + (name == "masked_classifier")  # + the unmasked classifier
    assert len(header) == 1 and len(rows) == expected
    for line in header + rows:
        assert line.count("&") == ncols - 1, line
    if name != "compute_time":
        assert r"$\uparrow$" in tex or r"$\downarrow$" in tex
        assert tex.count(r"\textbf{") >= 1 and r"$\pm$" in tex


def test_long_csv_has_intervals_flags_and_counts(results):
    write_all_tables(results)
    run = results / "synthetic" / "smallcnn"
    board = pd.read_csv(run / "leaderboard.csv")
    assert {"value", "ci_low", "ci_high", "images", "undefined", "best", "not_different_from_best"} <= set(board)
    assert (board["ci_low"] <= board["value"] + 1e-9).all() and (board["value"] <= board["ci_high"] + 1e-9).all()
    assert set(board["statistic"]) == {"iou", "mf_clipped", "mi", "pointing", "class_contrast", "masked_f"}
    # the reference row never wins; the best method is the high-quality one
    assert not board.loc[board["method"] == "constant-0", "best"].any()
    assert board.loc[(board["statistic"] == "iou") & board["best"], "method"].tolist() == ["beta"]
    mi = pd.read_csv(run / "explainability.csv").set_index("method")
    assert (mi.loc["beta", "images"], mi.loc["beta", "undefined"]) == (N - 1, 1)
    masked = pd.read_csv(run / "masked_classifier.csv")
    unmasked = masked[(masked["method"] == UNMASKED) & (masked["statistic"] == "masked_precision")]
    assert unmasked["value"].tolist() == [pytest.approx(100.0)]  # orig tp 1, fp 0 on every image
    diag = pd.read_csv(run / "diagnostics.csv").set_index("method")
    assert diag.loc["alpha", "tied_maxima"] == 1 and diag.loc["alpha", "undefined"] == "mi=1"
    times = pd.read_csv(run / "compute_time.csv").set_index("method")
    assert times.loc["beta", "images_per_second"] == pytest.approx(N / times.loc["beta", "seconds"], abs=1e-4)
    assert times.loc["beta", "train_seconds"] == 100.0 and np.isnan(times.loc["alpha", "train_seconds"])


def test_tables_options_change_only_what_they_say(results):
    run = results / "synthetic" / "smallcnn"
    write_tables(run)
    with_ci = (run / "leaderboard.tex").read_text()
    write_tables(run, ci=False)
    assert r"$\pm$" in with_ci and r"$\pm$" not in (run / "leaderboard.tex").read_text().split(r"\toprule")[1]
    write_tables(run, seed=1)
    a = pd.read_csv(run / "leaderboard.csv")
    write_tables(run, seed=0)
    b = pd.read_csv(run / "leaderboard.csv")
    assert np.allclose(a["value"], b["value"]) and not np.allclose(a["ci_low"], b["ci_low"])


class QuadrantClasses(torch.nn.Module):
    """Class c's logit is 10 x the mean of channel 0 over quadrant c: each class is read from its own quadrant."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        quads = [x[:, 0, :h, :w], x[:, 0, :h, w:], x[:, 0, h:, :w], x[:, 0, h:, w:]]
        return 10 * torch.stack([q.mean((1, 2)) for q in quads], 1)


def test_ground_truth_masks_give_a_high_diagonal(tmp_path):
    size = 8
    cm = torch.zeros(2, 4, size, size)
    cm[:, 0, :4, :4] = 1
    cm[:, 1, :4, 4:] = 1  # classes 0 and 1 in their quadrants, in both images
    images = torch.zeros(2, 3, size, size)
    images[:, 0] = cm[:, 0] + cm[:, 1]
    batch = make_batch([[0, 1], [0, 1]], cm, images=images)
    classes = torch.tensor([[0, 1], [0, 1]])
    gt_masks = torch.gather(cm, 1, classes[:, :, None, None].expand(-1, -1, size, size))
    values = METRICS.get("classmask").fn(MetricInputs(QuadrantClasses(), images, gt_masks, classes, batch))
    rows = rows_from_values(["a", "b"], {f"classmask/{k}": v.tolist() for k, v in values.items()}, "k")
    rows = rows.assign(method="ground-truth")
    inputs = TableInputs(rows, {"ground-truth": {"label": "G.T."}}, ["ground-truth"], {}, "", "", 200, 0,
                         ["a", "b"], {"ground-truth": {"a", "b"}})
    table = class_table(inputs)
    cells = table.set_index(["target", "mask"])["value"]
    assert cells[("0", "0")] > 99 and cells[("1", "1")] > 99  # own mask keeps the class's quadrant
    assert cells[("0", "1")] < 1 and cells[("1", "0")] < 1  # the other class's mask removes it
    # unmasked: both quadrants bright, classes 0 and 1 share the probability
    assert cells[("0", "none")] == pytest.approx(50.0, abs=0.1)


def test_load_current_rows_ignores_stale_rows(results):
    run = results / "synthetic" / "smallcnn"
    store = RowStore(run)
    stale = with_markers(rows_from_values(["9999"], {"iou": [1.0]}, run_key="old"))
    store.save("alpha", pd.concat([store.load("alpha"), stale]))
    rows = load_current_rows(run).rows
    assert "9999" not in set(rows.loc[rows["method"] == "alpha", "image_id"])


@pytest.mark.parametrize("size, text", [([224, 224], r"$\tau = 15.00$ px"), ([64, 64], r"$\tau = 4.29$ px"),
                                        (None, "15 px at 224 px, scaled with the image")])
def test_pointing_caption_states_the_tolerance_at_the_run_size(results, size, text):
    from maskbench.core.storage import write_json

    run = results / "synthetic" / "smallcnn"
    write_json(run / "manifest.json", {"dataset": {"image_size": size, "classes": ["a", "b"]}})
    write_tables(run)
    assert text in (run / "pointing.tex").read_text()


def test_class_table_keeps_only_the_table_classes(results):
    from maskbench.core.storage import write_json

    run = results / "synthetic" / "smallcnn"
    write_tables(run)
    everything = pd.read_csv(run / "class_table.csv")
    assert set(everything["target"].astype(str)) == {"0", "1"}  # no manifest: every stored cell
    write_json(run / "manifest.json", {"dataset": {"classes": ["a", "b"], "table_classes": [1]}})
    write_tables(run)
    table = pd.read_csv(run / "class_table.csv")
    assert set(table["target"]) == {"b"} and set(table["mask"]) == {"none", "b"}
    contrast = pd.read_csv(run / "class_contrast.csv")
    assert contrast.loc[contrast["statistic"] == "class_off_diagonal", "value"].isna().all()  # no other class
