"""Published numbers beside ours: a run of a published setting gets ``reproduction.csv`` / ``.md`` with each
published cell, our value, our interval and whether the published value lies inside it (known answers)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from maskbench.benchmark.reproduction import published
from maskbench.benchmark.tables import write_tables
from maskbench.core.store import RowStore, rows_from_values, with_markers
from maskbench.datasets import VOC_CLASSES

N = 12
CAT = VOC_CLASSES.index("cat")


def test_the_shipped_tables_are_complete():
    for setting in ("vgg16-voc", "resnet50-voc", "vgg16-coco", "resnet50-coco"):
        rows = published(setting)
        seg = rows[rows["paper_table"] == "Table 2"]
        assert len(seg) == 40 and set(seg["statistic"]) == {"acc", "iou", "sal", "mae"}  # 10 methods x 4
        assert len(rows[rows["paper_table"] == "Table 4"]) == 6  # Cl. and Expl. x P, R, F
    t1 = published("vgg16-voc")
    t1 = t1[t1["paper_table"] == "Table 1"]
    assert len(t1) == 4 * 5 * 6  # Explainer, Grad-CAM, RISE, RTIS x 5 targets x (none + 5 masks)
    row = t1[(t1["method"] == "explainer") & (t1["statistic"] == "cat/cat")]
    assert row["value"].item() == 60.55  # spot checks against the paper's text
    seg = published("resnet50-coco").set_index(["method", "statistic"])["value"]
    assert seg[("explainer", "iou")] == 27.42 and seg[("extremal-perturbation", "sal")] == -0.24
    assert published("smallcnn-synthetic").empty
    dgmp = published("resnet50-imagenet").set_index(["paper_table", "method"])["value"]
    assert len(dgmp) == 27 and dgmp[("Table 1", "dgmp-cf")] == 71.35 and dgmp[("Table 3", "mgnet")] == 88.63
    tr = published("resnet50-voc")
    row = tr[tr["source"].str.startswith("TorchRay") & (tr["method"] == "gradcam")
             & (tr["statistic"] == "pointing_difficult")]
    assert row["value"].item() == 82.3


def _run(tmp_path, config: dict) -> "Path":  # noqa: F821
    run = tmp_path / "voc" / "vgg16"
    store = RowStore(run)
    ids = [f"{i:04d}" for i in range(N)]
    rng = np.random.default_rng(0)
    methods = {
        "constant-0": {"iou": [0.0] * N, "acc": [66.29] * N},
        "constant-0.5": {"acc": [50.0] * N},
        "explainer": {"iou": [10.0] * N, f"classmask/t{CAT}/m{CAT}": [60.55] * N,
                      f"classmask/t{CAT}/none": list(rng.uniform(60, 80, N))},
    }
    for m, values in methods.items():
        store.save(m, with_markers(rows_from_values(ids, values, run_key="k")))
        store.save_meta(m, {"method": m, "label": m, "family": "reference" if "constant" in m else "learned",
                            "preset": config.get("preset", ""), "run_key": "k"})
    (run / "manifest.json").write_text(json.dumps({"config": config, "dataset": {"classes": VOC_CLASSES}}))
    return run


def test_a_run_of_a_published_setting_gets_its_reproduction_report(tmp_path):
    run = _run(tmp_path, {"model": "vgg16", "dataset": "voc", "preset": "paper"})
    written = write_tables(run, resamples=200)
    assert run / "reproduction.csv" in written and run / "reproduction.md" in written
    rep = pd.read_csv(run / "reproduction.csv").set_index(["paper_table", "method", "statistic"])
    same = rep.loc[("Table 2", "constant-0", "iou")]  # 0 everywhere: ours 0, interval [0, 0], published 0
    assert same["measured"] == 0 and same["difference"] == 0 and bool(same["inside"])
    assert bool(rep.loc[("Table 2", "constant-0", "acc"), "inside"])  # 66.29 = 66.29
    off = rep.loc[("Table 2", "explainer", "iou")]  # 10 against the published 38.04
    assert off["measured"] == 10 and off["difference"] == pytest.approx(10 - 38.04) and not bool(off["inside"])
    cell = rep.loc[("Table 1", "explainer", "cat/cat")]  # the class table, by class names
    assert cell["measured"] == pytest.approx(60.55) and bool(cell["inside"])
    assert math.isnan(rep.loc[("Table 2", "gradcam", "iou"), "measured"])  # not run
    md = (run / "reproduction.md").read_text()
    assert "| gradcam | iou | 28.78 | not run |" in md and "preset `paper`." in md
    assert "## Stalder et al. (NeurIPS 2022), Table 2" in md


def test_other_runs_get_no_report_and_a_non_paper_run_is_labelled(tmp_path):
    run = _run(tmp_path / "a", {"model": "smallcnn", "dataset": "voc", "preset": "fast"})
    assert not any(p.name.startswith("reproduction") for p in write_tables(run, resamples=50))
    run = _run(tmp_path / "b", {"model": "vgg16", "dataset": "voc", "preset": "fast"})
    write_tables(run, resamples=50)
    assert "not a reproduction" in (run / "reproduction.md").read_text()


def test_deviating_methods_are_named_in_the_captions_and_listed(tmp_path):
    import ast
    from pathlib import Path

    from maskbench.methods.deviations import DEVIATIONS, deviations

    run = _run(tmp_path, {"model": "vgg16", "dataset": "voc", "preset": "paper"})
    write_tables(run, resamples=50)
    caption = (run / "segmentation.tex").read_text()
    assert "Deviating from their published runs (deviations.md): explainer." in caption  # not the constants
    listed = (run / "deviations.md").read_text()
    assert "## explainer (explainer)" in listed and all(f"- {d}" in listed for d in DEVIATIONS["explainer"])
    assert "constant-0" not in listed and deviations("rise.paper") == () and deviations("igos++.paper")
    # data only: no method module imports it, so editing the list changes no method's code hash or cache key
    for path in (Path(__file__).resolve().parent.parent / "methods").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "deviations" not in (node.module or "") and all(a.name != "deviations" for a in node.names), path


def test_a_run_that_is_not_the_published_one_says_so_at_the_top_of_the_report():
    from maskbench.benchmark.reproduction import _markdown, departures, reproduction

    assert departures({"limit": None, "image_size": 224, "split": "test", "method_params": {}}) == []
    differs = departures({"limit": 2, "image_size": 64, "split": "test", "method_params": {"rise.num_masks": 8},
                          "classifier_params": {"pretrained_backbone": False}})
    assert differs == ["only 2 image(s) (--limit)", "images at 64 px (the papers: 224)",
                       "method overrides rise.num_masks=8", "classifier overrides pretrained_backbone=False"]
    table = reproduction("vgg16-voc", {}, None)
    assert "**Not the published run**" in _markdown(table, "vgg16-voc", "paper", differs)
    assert "Not the published run" not in _markdown(table, "vgg16-voc", "paper", [])
