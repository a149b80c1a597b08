"""Projected GPU hours: the arithmetic on hand-made pass counts (the projection is a product of counts and the
papers' per-pass times; nothing in it is measured on a GPU)."""

import math

import pandas as pd

from maskbench.benchmark import projection as pj


def test_the_per_pass_times_come_from_the_papers_rise_rows():
    # NeurIPS 2022 Table 3: RISE, 210 VOC images x 8,000 forwards, VGG-16 1:15:29, ResNet-50 0:46:21
    assert math.isclose(pj.P100_FORWARD_MS["vgg16"], 4529 / 1_680_000 * 1000)
    assert math.isclose(pj.P100_FORWARD_MS["resnet50"], 2781 / 1_680_000 * 1000)


def test_hours_are_pairs_times_passes_times_the_pass_time(tmp_path):
    csv = tmp_path / "methods.csv"
    pd.DataFrame([
        {"method": "ep", "variant": "pixel", "images": 2, "classes_per_image": 1, "passes_with_backward": 200,
         "passes_forward_only": 20},
        {"method": "ep", "variant": "cell", "images": 2, "classes_per_image": 1, "passes_with_backward": 1,
         "passes_forward_only": 1},  # another variant: not projected
        {"method": "rise", "variant": None, "images": 4, "classes_per_image": 1, "passes_with_backward": 0,
         "passes_forward_only": 400},
    ]).to_csv(csv, index=False)
    table = pj.project(csv, {"a": 10.0, "b": 5.0}, {"vgg16": 3.0, "resnet50": 2.0})
    voc = table[table["setting"] == "vgg16-voc"].set_index("method")
    fwd = pj.P100_FORWARD_MS["vgg16"]
    # EP: per pair 100 fwd+bwd (3 forwards each) and 10 forwards; 210 images x 6 pairs
    assert math.isclose(voc.loc["ep", "projected_hours"], round(210 * 6 * (100 * 3 * fwd + 10 * fwd) / 3.6e6, 3))
    # RISE: 100 forwards per image whatever the classes
    assert math.isclose(voc.loc["rise", "projected_hours"], round(210 * 100 * fwd / 3.6e6, 3))
    # scoring: 15 forwards per true-class pair, 1.5 pairs per VOC image
    assert math.isclose(voc.loc["scoring (all metrics, per method)", "projected_hours"],
                        round(210 * 1.5 * 15 * fwd / 3.6e6, 3))
    assert len(table) == 3 * len(pj.SETTINGS)
