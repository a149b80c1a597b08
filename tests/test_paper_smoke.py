"""The paper-smoke run: the papers' three published settings end to end on data written in the real formats
(VOC-2007 and COCO-2014 fetched through the download code from a loopback server, ImageNet read in place), every
built-in method at its ``paper`` preset (iterations capped), every table and the reproduction report written.

Its numbers mean nothing; the test checks that the path runs and that what it produced is what the settings
define: the downloads verified, the published settings' hyperparameters selected, softmax on ImageNet, each
table present with every method, the reports saying the run is not the published one.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from maskbench.benchmark.config import DEFAULT_METHODS
from maskbench.benchmark.smoke import CAPS, SETTINGS, run_smoke
from maskbench.core.store import RowStore
from maskbench.datasets.download import RECORD
from maskbench.methods.explainer import Explainer
from maskbench.metrics import METRICS, select_metrics, table_specs, value_range

pytestmark = pytest.mark.slow


def meta(run, method: str) -> dict:
    """A method's stored sidecar (its configuration, preset, setting) in a run folder."""
    return RowStore(run.run_dir, value_range).load_meta(method)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("paper-smoke")
    return work, run_smoke(work, work / "results", progress=False, log=lambda _: None)


def test_every_method_runs_at_its_paper_preset_on_the_three_settings(smoke):
    work, result = smoke
    assert list(result.runs) == [f"{model}-{data}" for data, model, _ in SETTINGS]
    for name, run in result.runs.items():
        summaries = {s.method: s for s in run.summaries}
        assert list(summaries) == DEFAULT_METHODS, name  # stored under their own names: the run is `paper`
        for method, s in summaries.items():
            assert s.failed == 0 and not s.errors, (name, method, s.errors)
            assert s.computed + s.from_cache == s.images > 0, (name, method)
        metas = {m: meta(run, m) for m in DEFAULT_METHODS}
        assert {m["preset"] for m in metas.values() if m["family"] != "reference"} == {"paper"}
        assert (run.run_dir / "SMOKE.md").read_text().startswith("# paper-smoke: these numbers mean nothing")


def test_the_data_came_through_the_download_code_and_verified(smoke):
    work, result = smoke
    for dataset in ("voc", "coco"):
        record = json.loads((work / "cache" / "data" / dataset / RECORD).read_text())
        assert record["dataset"] == dataset and record["verified"]
        manifest = result.runs[f"{'vgg16' if dataset == 'voc' else 'resnet50'}-{dataset}"].manifest
        assert str(work / "cache" / "data" / dataset) in manifest["dataset"]["repr"]  # found with no --data-root
    coco = result.runs["resnet50-coco"].manifest["dataset"]
    assert coco["split"] == "test" and "split='neurips-test'" in coco["repr"] and len(coco["classes"]) == 80


def test_the_published_settings_hyperparameters_are_selected_and_only_the_caps_differ(smoke):
    _, result = smoke
    for setting in ("vgg16-voc", "resnet50-coco"):
        explainer = meta(result.runs[setting], "explainer")
        config = explainer["config"]
        assert explainer["setting"] == setting and config["arch"] == "deeplabv3_resnet50"
        for key, value in Explainer.HYPERPARAMETERS[setting].items():
            assert config[key] == value, (setting, key)
        assert config["max_steps"] == CAPS["explainer.max_steps"] and config["pretrained_backbone"] is False
    ep = meta(result.runs["vgg16-voc"], "extremal-perturbation")
    assert ep["config"]["areas"] == [0.05, 0.1, 0.2, 0.3] and ep["config"]["max_iter"] == 2


def test_imagenet_is_scored_with_softmax_by_an_untrained_torchvision_head(smoke):
    _, result = smoke
    manifest = result.runs["resnet50-imagenet"].manifest
    assert manifest["classifier"]["probabilities"] == "softmax"
    assert manifest["classifier"]["weights"].startswith("none: random initialisation")
    assert len(manifest["dataset"]["classes"]) == 1000
    for name in ("rise", "igos++", "meaningful-perturbation"):  # score "auto" resolves to the classifier's
        assert meta(result.runs["resnet50-imagenet"], name)["config"]["score"] == "auto"
    dgmp = meta(result.runs["resnet50-imagenet"], "dgmp-cf")
    assert dgmp["config"]["objective"] == "auto"  # the paper's objective on a softmax classifier (see its tests)


def test_every_table_and_the_reproduction_report_are_written(smoke):
    _, result = smoke
    for name, run in result.runs.items():
        scored = select_metrics(json.loads((run.run_dir / "manifest.json").read_text())["config"]["dataset"])
        for spec in table_specs():
            owners = [n for n in METRICS.list() if METRICS.get(n).table == spec.name]
            if owners and not set(owners) & set(scored):  # optional (ROAD) or not for this data (grid)
                assert not (run.run_dir / f"{spec.name}.csv").exists(), (name, spec.name)
                continue
            table = pd.read_csv(run.run_dir / f"{spec.name}.csv")
            assert (run.run_dir / f"{spec.name}.tex").is_file()
            assert set(DEFAULT_METHODS) <= set(table["method"]), (name, spec.name)
        seg = pd.read_csv(run.run_dir / "segmentation.csv")
        if name.endswith("imagenet"):  # no segmentation: not available, never 0
            assert seg[seg["statistic"] == "iou"]["value"].isna().all()
            assert "--: not available" in (run.run_dir / "segmentation.tex").read_text()
        else:
            assert seg["value"].notna().all()
        report = (run.run_dir / "reproduction.md").read_text()
        assert "**Not the published run**" in report and "pretrained_backbone=False" in report
        repro = pd.read_csv(run.run_dir / "reproduction.csv")
        assert len(repro) and repro["measured"].notna().any()
        for r in repro.dropna(subset=["measured"]).itertuples():
            assert math.isclose(r.difference, r.measured - r.published, abs_tol=2e-4)  # 4 decimals each
