"""Figures: drawn from stored files only, with the expected panels and content, not merely present."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mb_testutils import run_config, tiny_synthetic
from PIL import Image

import maskbench.benchmark.figures as figures
from maskbench.benchmark.cli import main
from maskbench.benchmark.runner import run
from maskbench.core.errors import MaskbenchError

PUBLISHED = Path(__file__).resolve().parent.parent / "results" / "synthetic" / "smallcnn"


def ink(png: Path) -> float:
    """Share of a PNG's pixels that are not (near) white: 0 for a blank figure."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    return float((rgb.min(axis=2) < 230).mean())


def visible_panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def test_forest_plot_has_one_point_per_defined_method_references_last():
    board = pd.read_csv(PUBLISHED / "leaderboard.csv")
    rows = board[board["statistic"] == "iou"]
    fig = figures.forest_plot(rows)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    defined = rows.dropna(subset=["value"])
    assert len(labels) == len(defined)
    methods = defined[defined["family"] != "reference"]["method_label"].tolist()
    refs = defined[defined["family"] == "reference"]["method_label"].tolist()
    assert labels == methods + refs  # top to bottom: methods in table order, then the reference rows
    # the drawn point of the Explainer sits at its stored value
    points = {c.lines[0].get_ydata()[0]: c.lines[0].get_xdata()[0] for c in ax.containers}  # the data points
    y_explainer = len(labels) - 1 - labels.index("Explainer")
    assert points[y_explainer] == pytest.approx(defined.set_index("method_label").loc["Explainer", "value"])


def test_class_table_figure_draws_one_heat_map_per_method_gt_first():
    table = pd.read_csv(PUBLISHED / "class_table.csv")
    fig = figures.class_table_figure(table, {"ground-truth": "G.T."})
    panels = [ax for ax in visible_panels(fig) if ax.images]
    assert len(panels) == table["method"].nunique()
    assert panels[0].get_title() == "G.T."
    classes = list(dict.fromkeys(table["target"]))
    gt = table[(table["method"] == "ground-truth") & (table["mask"] != "none")]
    expected = gt.pivot(index="target", columns="mask", values="value").reindex(index=classes, columns=classes)
    np.testing.assert_allclose(np.asarray(panels[0].images[0].get_array()), expected.to_numpy(), rtol=1e-6)


def test_write_figures_on_the_published_run_without_a_model(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("leaderboard.csv", "class_table.csv", "randomisation.csv", "meta_agreement.csv", "meta_ranks.csv"):
        (run_dir / name).write_bytes((PUBLISHED / name).read_bytes())
    written = figures.write_figures(run_dir)
    stems = sorted({p.stem for p in written})
    stats = list(dict.fromkeys(pd.read_csv(PUBLISHED / "leaderboard.csv")["statistic"]))
    assert stems == sorted([f"forest_{s}" for s in stats] + ["class_table", "randomisation", "agreement", "ranks"])
    for p in written:
        if p.suffix == ".png":
            assert ink(p) > 0.02, p  # not blank
        else:
            assert p.read_bytes().startswith(b"%PDF"), p
    assert {p.suffix for p in written} == {".png", ".pdf"} and len(written) == 2 * len(stems)


def test_a_statistic_undefined_on_the_data_gets_no_forest_plot(tmp_path):
    board = pd.read_csv(PUBLISHED / "leaderboard.csv")
    board.loc[board["statistic"] == "iou", ["value", "ci_low", "ci_high"]] = float("nan")  # e.g. no masks
    board.to_csv(tmp_path / "leaderboard.csv", index=False)
    stems = {p.stem for p in figures.write_figures(tmp_path)}
    assert "forest_iou" not in stems and "forest_mi" in stems


def test_agreement_and_ranks_figures_hold_every_statistic():
    agreement = pd.read_csv(PUBLISHED / "meta_agreement.csv")
    names = list(dict.fromkeys(agreement["statistic_a"]))
    fig = figures.agreement_figure(agreement)
    matrix = np.asarray(fig.axes[0].images[0].get_array())
    assert matrix.shape == (len(names), len(names))
    np.testing.assert_allclose(np.diag(matrix), 1.0)  # a statistic agrees with itself
    ranks = pd.read_csv(PUBLISHED / "meta_ranks.csv")
    assert len(visible_panels(figures.ranks_figure(ranks, {}))) == ranks["statistic"].nunique()


def test_default_images_take_the_first_image_of_each_class():
    first = {"a": 1, "b": 0, "c": 1, "d": None, "e": 2, "f": 0}
    assert figures.default_images(list("fedcba"), first.get, 4) == ["b", "a", "e"]  # classes 0, 1, 2; 3 has none


def test_masks_figure_shows_each_cached_map_unchanged_and_marks_missing_ones():
    rng = np.random.default_rng(0)
    imgs = [rng.random((8, 8, 3)) for _ in range(2)]
    maps = [[rng.random((8, 8)), None], [rng.random((8, 8)), rng.random((8, 8))]]
    fig = figures.masks_figure(imgs, ["disc", "ring"], ["001", "002"], ["A", "B"], maps)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 * 3
    grid = np.array(panels, dtype=object).reshape(2, 3)
    np.testing.assert_allclose(np.asarray(grid[1, 2].images[0].get_array()), maps[1][1])
    assert not grid[0, 2].images and grid[0, 2].lines  # not cached: crossed out, not a made-up map
    assert [grid[0, j].get_title() for j in range(3)] == ["image", "A", "B"]
    assert grid[1, 2].images[0].get_clim() == (0, 1)  # one scale for all maps


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    data_root = tiny_synthetic(tmp_path_factory, n_test=12, seed=5)
    cache = tmp_path_factory.mktemp("cache")
    results = tmp_path_factory.mktemp("results")
    out = run(run_config(data_root, cache, results, methods=["ground-truth", "centre-gaussian", "gradcam"],
                         batch_size=6))
    return out.run_dir, cache, data_root


def test_mask_grid_of_a_stored_run_reads_the_cache(tiny_run):
    run_dir, cache, data_root = tiny_run
    written, note = figures.figures_for_run(run_dir, cache=cache, data_root=str(data_root))
    assert note is None
    png = run_dir / "figures" / "masks.png"
    assert png in written and ink(png) > 0.05
    assert (run_dir / "figures" / "forest_iou.pdf").is_file()
    for name in ("insertion", "deletion", "mf"):  # from the stored curves of the run's methods
        curves_png = run_dir / "figures" / f"curves_{name}.png"
        assert curves_png in written and ink(curves_png) > 0.05
    # an empty cache (a fresh clone): every other figure, and a note instead of the grid
    written, note = figures.figures_for_run(run_dir, cache=cache.parent / "empty-cache", data_root=str(data_root))
    assert note is not None and "no cached masks" in note
    with pytest.raises(MaskbenchError, match="not in this run"):
        figures.figures_for_run(run_dir, cache=cache, data_root=str(data_root), images=["nope"])


def test_figures_command(tiny_run, capsys):
    run_dir, cache, data_root = tiny_run
    ids = pd.read_json(run_dir / "run.json", typ="series")["image_ids"][:2]
    assert main(["figures", "--run", str(run_dir), "--cache-dir", str(cache), "--data-root", str(data_root),
                 "--images", ",".join(ids)]) == 0
    assert str(run_dir / "figures" / "masks.png") in capsys.readouterr().out
    assert main(["figures", "--run", str(run_dir.parent / "missing")]) == 2
    assert "not a stored run" in capsys.readouterr().err


def test_curves_figure_draws_each_method_mean_and_band_over_the_baseline():
    """Known curves: method A's images are 0.8 x + 0.1 + (0, -0.1, 0, 0.1), one undefined image left out of its n; the
    random-uniform baseline is flat at 0.3, drawn dashed in A's panel; an all-undefined method gets no panel."""
    x = np.linspace(0, 1, 5)
    a = np.stack([x * 0.8 + 0.1, x * 0.8, np.full(5, np.nan), x * 0.8 + 0.1, x * 0.8 + 0.2])  # mean 0.8 x + 0.1
    curves = {"a": a, "random-uniform": np.full((5, 5), 0.3), "never": np.full((5, 5), np.nan)}
    fig = figures.curves_figure(x, curves, {"a": "Method A"}, {"a": "12.3 [1.0, 2.0]"}, "q", "Insertion")
    panels = visible_panels(fig)
    assert len(panels) == 2  # 'never' has no defined curve
    assert panels[0].get_title().startswith("Method A\n12.3 [1.0, 2.0] (n=4)")
    mean_line = [ln for ln in panels[0].lines if ln.get_linestyle() == "-"][0]
    np.testing.assert_allclose(mean_line.get_ydata(), 0.8 * x + 0.1)
    dashed = [ln for ln in panels[0].lines if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and np.allclose(dashed[0].get_ydata(), 0.3)
    band = panels[0].collections[0].get_paths()[0].vertices[:, 1]  # the 95 % band encloses the mean
    assert band.min() <= np.nanmean(a, 0).min() and band.max() >= np.nanmean(a, 0).max()
    assert not [ln for ln in panels[1].lines if ln.get_linestyle() == "--"]  # the baseline's own panel: no dash


def test_the_same_stored_run_gives_the_same_files_byte_for_byte(tiny_run):
    """Figures are a pure function of the stored rows, curves and cache: drawn twice, every PNG and PDF is the
    same file (no creation date, no random state)."""
    run_dir, cache, data_root = tiny_run
    first, _ = figures.figures_for_run(run_dir, cache=cache, data_root=str(data_root))
    before = {p: p.read_bytes() for p in first}
    for p in first:
        p.unlink()
    second, _ = figures.figures_for_run(run_dir, cache=cache, data_root=str(data_root))
    assert sorted(second) == sorted(first) and len(first) > 10
    assert {p: p.read_bytes() for p in second} == before


def test_randomisation_figure_has_a_panel_per_mode_and_similarity_with_the_stored_values():
    """Cascading and independent, Spearman and SSIM: four panels; a method's line holds its stored values in
    step order; the reference rows (which ignore the model) are not drawn."""
    table = pd.read_csv(PUBLISHED / "randomisation.csv")
    fig = figures.randomisation_figure(table, {"gradcam": "Grad-CAM"})
    panels = visible_panels(fig)
    assert [ax.get_title() for ax in panels] == ["cascading (Spearman rho)", "independent (Spearman rho)",
                                                 "cascading (SSIM)", "independent (SSIM)"]
    for ax, (mode, sim) in zip(panels, figures.RANDOMISATION_PANELS, strict=True):
        line = next(ln for ln in ax.lines if ln.get_label() == "Grad-CAM")
        stored = table[(table["mode"] == mode) & (table["similarity"] == sim) & (table["method"] == "gradcam")]
        np.testing.assert_allclose(line.get_ydata(), stored["value"].to_numpy())
        drawn = {ln.get_label() for ln in ax.lines}
        assert not drawn & {"ground-truth", "random-uniform", "centre-gaussian"}
