"""End to end: synthetic data -> trained classifier -> methods -> metrics -> tables, resume, failures, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mb_testutils import run_config, tiny_synthetic

from maskbench.benchmark.cli import main
from maskbench.benchmark.runner import run
from maskbench.benchmark.tables import write_all_tables
from maskbench.core.store import RowStore
from maskbench.methods import AttributionMethod, register_method

REPO = Path(__file__).resolve().parent.parent


@register_method("test-nan-on-first")
class NanOnFirst(AttributionMethod):
    """Returns NaN maps for images whose first pixel is the batch's largest: a detectable failure."""

    family = "plugin"

    def explain(self, model, images, classes, *, batch=None):
        out = torch.full((images.shape[0], classes.shape[1], *images.shape[-2:]), 0.5, device=images.device)
        out[0] = float("nan")
        return out


@register_method("test-raises")
class Raises(AttributionMethod):
    family = "plugin"

    def explain(self, model, images, classes, *, batch=None):
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory, n_test=16, seed=3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def config(data_root, cache_dir, results, **kw):
    return run_config(data_root, cache_dir, results, **{"batch_size": 8, **kw})


METHODS = ["constant-0", "constant-0.5", "constant-1", "ground-truth", "gradcam", "rise"]


def test_end_to_end_tables_sanity_rows_and_resume(data_root, cache_dir, tmp_path):
    res = tmp_path / "results"
    first = run(config(data_root, cache_dir, res, methods=METHODS, limit=10))
    assert all(s.computed == 10 and s.failed == 0 for s in first.summaries)
    run_dir = res / "synthetic" / "smallcnn-limit10"  # a partial run has its own folder
    assert first.run_dir == run_dir and not (res / "synthetic" / "smallcnn").exists()
    long = pd.read_csv(run_dir / "segmentation.csv")
    assert list(dict.fromkeys(long["method"])) == METHODS  # reference rows first, in Table 2 order
    table = long.pivot(index="method", columns="label", values="value")
    table["images"] = long.groupby("method")["images"].min()
    gt = table.loc["ground-truth"]
    assert gt["Acc"] == pytest.approx(100) and gt["IoU"] == pytest.approx(100) and gt["MAE"] == pytest.approx(0)
    assert table.loc["constant-0", "IoU"] == pytest.approx(0)
    assert table.loc["constant-0.5", "MAE"] == pytest.approx(50)
    assert table.loc["constant-0", "Acc"] == pytest.approx(100 - table.loc["constant-1", "Acc"], abs=1e-3)
    assert (table["images"] == 10).all()
    tex = (run_dir / "segmentation.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    assert r"\toprule" in tex and r"\bottomrule" in tex and "Sal $\\downarrow$" in tex
    assert sum(line.endswith(r"\\") for line in tex.splitlines()) == 1 + len(METHODS)  # header + one per method
    for name in ("faithfulness", "explainability", "pointing", "masked_classifier", "compute_time", "leaderboard"):
        assert (run_dir / f"{name}.csv").is_file() and (run_dir / f"{name}.tex").is_file()
    meta = json.loads((run_dir / "per_image" / "rise.json").read_text())
    assert meta["timing"]["images"] == 10 and meta["timing"]["explain_seconds"] > 0
    assert meta["timing"]["warmup_seconds"] > 0  # measured apart, not in explain_seconds
    manifest = json.loads((run_dir / "manifest.json").read_text())
    counts = {c["method"]: c for c in manifest["counts"]}
    assert counts["constant-0"]["constant_maps"] > 0 and counts["rise"]["constant_maps"] == 0
    assert manifest["git"]["commit"] and manifest["versions"]["torch_build"] == torch.__version__
    assert manifest["classifier"]["checkpoint_sha256"]
    assert {m["method"] for m in manifest["methods"]} == set(METHODS)

    # the same run again recomputes nothing
    again = run(config(data_root, cache_dir, res, methods=METHODS, limit=10))
    assert all(s.skipped == 10 and s.computed == 0 and s.from_cache == 0 for s in again.summaries)

    # lost rows are re-scored from the mask cache, to the same values
    fresh = pd.read_csv(run_dir / "per_image" / "gradcam.csv")
    (run_dir / "per_image" / "gradcam.csv").unlink()
    lost = {s.method: s for s in run(config(data_root, cache_dir, res, methods=METHODS, limit=10)).summaries}
    assert lost["gradcam"].from_cache == 10 and lost["gradcam"].computed == 0 and lost["rise"].skipped == 10
    pd.testing.assert_frame_equal(fresh, pd.read_csv(run_dir / "per_image" / "gradcam.csv"))

    # the full run writes its own folder; it reuses the cached masks and computes only the new images
    partial = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    more = run(config(data_root, cache_dir, res, methods=METHODS))
    assert more.run_dir == res / "synthetic" / "smallcnn"
    more = {s.method: s for s in more.summaries}
    assert more["rise"].from_cache == 10 and more["rise"].computed == 6
    assert more["gradcam"].from_cache == 10 and more["gradcam"].computed == 6
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == partial  # partial run untouched
    full = pd.read_csv(res / "synthetic" / "smallcnn" / "per_image" / "gradcam.csv")
    pd.testing.assert_frame_equal(fresh, full[full["image_id"].isin(set(fresh["image_id"]))].reset_index(drop=True))
    # compute time belongs to the cached masks: re-scored images keep theirs, new ones add to it
    meta = json.loads((res / "synthetic" / "smallcnn" / "per_image" / "gradcam.json").read_text())
    assert meta["timing"]["images"] == 16

    # tables are a pure function of the stored rows: rebuilt byte for byte
    before = {p.name: p.read_bytes() for p in run_dir.glob("segmentation.*")}
    for p in run_dir.glob("segmentation.*"):
        p.unlink()
    write_all_tables(res)
    assert {p.name: p.read_bytes() for p in run_dir.glob("segmentation.*")} == before

    # a different method configuration is a different cache key: recomputed, in a folder of its own
    changed = run(config(data_root, cache_dir, res, methods=["rise"], limit=4, seed=0, preset="paper"))
    assert changed.summaries[0].computed == 4 and changed.run_dir.name == "smallcnn-limit4-paper"


def test_curves_are_stored_beside_the_rows_and_resume_on_their_own(data_root, cache_dir, tmp_path):
    """The faithfulness curves go to per_image/<method>.curves.npz under the metric's key, one per image; their
    areas are the stored scores (32 px: RISE's grid is the stored k/32, so the trapezoid of the insertion curve
    is the insertion row, up to float16); a lost or damaged curves file is recomputed from the cached masks
    alone, rows untouched, to the same curves."""
    res = tmp_path / "results"
    methods = ["ground-truth", "gradcam"]
    out = run(config(data_root, cache_dir, res, methods=methods, limit=8))
    store = RowStore(out.run_dir)
    ids = sorted(json.loads((out.run_dir / "run.json").read_text())["image_ids"])
    assert len(ids) == 8
    for m in methods:
        table, problems = store.load_curves(m, "curves", store.load_meta(m)["metric_keys"]["curves"])
        assert not problems and table.image_ids == ids and set(table.y) == {"insertion", "deletion", "mf"}
        rows = store.load(m)
        rows = rows[rows["metric"].isin(["insertion", "mf_clipped"])].pivot(
            index="image_id", columns="metric", values="value").loc[ids]
        ins, mf = table.y["insertion"].astype(float), table.y["mf"].astype(float)
        area = 100 * (ins.sum(1) - ins[:, 0] / 2 - ins[:, -1] / 2) / 32
        np.testing.assert_allclose(area, rows["insertion"], atol=0.05)
        np.testing.assert_allclose(100 * mf[:, 1:].mean(1), rows["mf_clipped"], atol=0.05)  # NaN where NaN
        assert np.isnan(rows["mf_clipped"]).sum() < 8  # not vacuous: some M_F defined
    path = store.curves_path("gradcam", "curves")
    rows_bytes, curves_bytes = store.csv_path("gradcam").read_bytes(), path.read_bytes()
    for damage in ("lost", "damaged"):
        if damage == "lost":
            path.unlink()
        else:
            path.write_bytes(b"not a zip file")
        again = {s.method: s for s in run(config(data_root, cache_dir, res, methods=methods, limit=8)).summaries}
        assert again["gradcam"].from_cache == 8 and again["gradcam"].computed == 0
        assert again["ground-truth"].skipped == 8 and again["ground-truth"].from_cache == 0
        assert any("damaged curves" in w for w in again["gradcam"].warnings) == (damage == "damaged")
        assert path.read_bytes() == curves_bytes and store.csv_path("gradcam").read_bytes() == rows_bytes


def test_a_run_leaves_no_process_wide_cache_folder_behind(data_root, cache_dir, tmp_path):
    """run() points the data sets' digest memos at its --cache while it runs, then restores the folder it found,
    so a later build in the same process (a test, a notebook) uses its own cache, not the last run's."""
    from maskbench.datasets import digests

    before = digests.memo_dir()
    assert before != cache_dir
    run(config(data_root, cache_dir, tmp_path / "results", methods=["constant-0"], limit=2))
    assert digests.memo_dir() == before


def test_failures_are_counted_never_scored(data_root, cache_dir, tmp_path):
    res = tmp_path / "results"
    out = run(config(data_root, cache_dir, res, methods=["test-nan-on-first", "test-raises"], limit=8,
                     batch_size=4))
    nan, raises = out.summaries
    assert nan.nan_maps == 2 and nan.failed == 2 and nan.computed == 6
    assert raises.failed == 8 and "boom" in raises.errors[0]
    rows = pd.read_csv(out.run_dir / "per_image" / "test-nan-on-first.csv")
    assert rows["image_id"].nunique() == 6
    assert not (out.run_dir / "per_image" / "test-raises.csv").exists() or pd.read_csv(
        out.run_dir / "per_image" / "test-raises.csv").empty


def test_cli_errors_name_the_culprit(data_root, cache_dir, tmp_path, capsys):
    common = ["--data-root", str(data_root), "--cache", str(cache_dir), "--results", str(tmp_path), "--no-progress"]
    assert main(["bench", "--methods", "gradcam,risee", *common]) == 2
    err = capsys.readouterr().err
    assert "Unknown method 'risee'" in err and "Did you mean: rise" in err and "gradcam" in err
    assert main(["bench", "--dataset", "vocc", *common]) == 2
    assert "Unknown dataset 'vocc'" in capsys.readouterr().err
    missing = tmp_path / "no-such-voc"
    assert main(["bench", "--dataset", "voc", "--data-root", str(missing), "--cache", str(cache_dir), "--results",
                 str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["bench", "--table-classes", "dog", *common]) == 2
    assert "Unknown class 'dog'" in capsys.readouterr().err
    assert main(["tables", "--results", str(tmp_path / "empty")]) == 2


def test_plugin_example_runs_through_the_cli(data_root, cache_dir, tmp_path):
    args = ["bench", "--plugin", str(REPO / "examples" / "input_x_gradient.py"), "--methods",
            "input-x-gradient,gradcam", "--limit", "4", "--data-root", str(data_root), "--cache", str(cache_dir),
            "--results", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "synthetic" / "smallcnn-limit4" / "segmentation.csv")
    assert set(table["method"]) == {"input-x-gradient", "gradcam"}


def test_entry_point_plugins_are_discovered(tmp_path):
    pkg = tmp_path / "mb_fake_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from dataclasses import dataclass\n"
        "from maskbench.methods import AttributionMethod\n"
        "@dataclass\n"
        "class Fake(AttributionMethod):\n"
        "    family = 'plugin'\n"
    )
    dist = tmp_path / "mb_fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mb-fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[maskbench.methods]\nfake-method = mb_fake_plugin:Fake\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "maskbench.benchmark", "methods"], capture_output=True, text=True,
                         env=env, check=True)
    assert "fake-method" in out.stdout and "mb_fake_plugin" in out.stdout


def test_memory_knobs_leave_the_run_in_its_folder():
    """``--param`` of a ``not_in_key`` field (a memory knob) names no new results folder; one that changes the
    masks does. A plain key names a new folder when any method of the run has it as a real hyperparameter."""
    from maskbench.benchmark.config import RunConfig

    def label(methods, **params):
        return RunConfig(methods=methods, method_params=params).run_label()

    assert label(["rise", "gradcam"]) == "smallcnn"
    assert label(["rise", "gradcam"], **{"rise.batch_size": 10}) == "smallcnn"
    assert label(["rise", "gradcam"], max_batch=4) == "smallcnn"
    assert label(["rise"], **{"rise.num_masks": 10}).startswith("smallcnn-params-")
    # batch_size is RISE's memory knob but the Explainer's training batch: it changes the Explainer's masks
    assert label(["rise", "explainer"], batch_size=8).startswith("smallcnn-params-")
