"""Figures of a stored run: pure functions of its tables, its ``run.json`` and the mask cache, no model.

``maskbench figures`` (and the end of ``bench``) writes under ``<run>/figures/`` one PNG (200 dpi, for viewing)
and one PDF (vector, for papers) per figure, sized for a two-column paper (:data:`TEXT_WIDTH`, 7 pt text):

* ``masks``: the qualitative grid of the NeurIPS 2022 paper's Fig. 1 and 3 and the distribution-guided paper's
  Fig. 4: one row per image, the image then every method's map of the image's first true class (named in the
  row label), one colour map and the scale [0, 1] for all (the maps are what the metrics read: the cached masks,
  which every method stores in [0, 1]). Default images (:func:`default_images`): one per class, the first test
  image (in id order) whose first true class is that class; ``--images ID,...`` chooses.
* ``class_table``: the class-specific masking table (NeurIPS 2022 Table 1) of each method as a heat map,
  target class x mask class, the G.T. panel first as the reference.
* ``forest_<statistic>``: each leaderboard statistic per method, value and 95 % bootstrap interval, reference
  rows apart below a rule, the best method filled.
* ``curves_insertion``, ``curves_deletion``, ``curves_mf``: the faithfulness curves (RISE's Fig. 4; DGMP eq. 8's
  normalised curve), one panel per method: the mean over images of the stored per-image curves
  (``per_image/<method>.curves.npz``) at revealed fractions k/32 and the 95 % percentile bootstrap band of that
  mean at each point, over the random-uniform reference's mean curve (dashed); the panel title gives the
  table's value and interval (the area under the curves at their native resolution).
* ``randomisation``: when ``maskbench sanity`` ran, the model-randomisation curves (Adebayo et al., NeurIPS 2018,
  Fig. 2 and 4): cascading (from the head down) and independent (one layer at a time) re-initialisation, Spearman
  and SSIM, one line with its 95 % band per method per step, the Gaussian-noise control dashed.
* ``agreement``: when the meta-evaluation ran, the Kendall tau_b matrix of the leaderboard statistics.
* ``ranks``: the median rank and 95 % interval of each method over the bootstrap resamples, per statistic.

Colours: ``viridis`` for maps (perceptually uniform, readable in grey and by colour-blind readers), ``PuOr``
(diverging, colour-blind safe) for tau, the Okabe-Ito palette for methods.

"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from maskbench.core.errors import MaskbenchError  # noqa: E402
from maskbench.core.stats import column_intervals  # noqa: E402
from maskbench.core.storage import atomic_write, read_json  # noqa: E402
from maskbench.core.store import MaskCache, RowStore  # noqa: E402

TEXT_WIDTH = 7.0  # inches: the text width of a two-column paper (one column: 3.3)
DPI = 200
MAP_CMAP = "viridis"
TAU_CMAP = "PuOr"
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
STYLE = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6, "ytick.labelsize": 6,
         "legend.fontsize": 6, "font.family": "DejaVu Sans", "pdf.fonttype": 42, "axes.linewidth": 0.6}
REFERENCE = "reference"


# what each figure shows, by file-name prefix, in the order a results page lists them
CAPTIONS = {
    "masks": "Qualitative grid: each method's map of the image's first true class (viridis, one scale [0, 1]).",
    "forest_": "Leaderboard statistic per method: value and 95 % bootstrap interval; reference rows apart, best "
               "method filled.",
    "curves_": "Faithfulness curves: mean over images of the per-image curves and the 95 % bootstrap band at "
               "each point, random-uniform dashed; title: the table's value and interval.",
    "class_table": "Class-specific masking table (NeurIPS 2022 Table 1) per method: target x mask class, G.T. "
                   "first.",
    "randomisation": "Model randomisation (cascading from the head, and each layer alone): Spearman and SSIM "
                     "between trained and randomised maps, 95 % bands; noise control dashed.",
    "agreement": "Kendall tau_b between the method rankings of every pair of leaderboard statistics.",
    "ranks": "Median rank of each method over the bootstrap resamples, with its 95 % interval (1 = best).",
}


def figure_caption(stem: str) -> str:
    """The caption of a figure file's stem (see :data:`CAPTIONS`); empty for a figure not listed there."""
    return next((text for prefix, text in CAPTIONS.items() if stem.startswith(prefix)), "")


def figure_order(stem: str) -> tuple[int, str]:
    """Sort key of a figure file's stem: the order of :data:`CAPTIONS`, then the name; unknown ones last."""
    rank = next((i for i, prefix in enumerate(CAPTIONS) if stem.startswith(prefix)), len(CAPTIONS))
    return rank, stem


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """``stem``.png and ``stem``.pdf, each written atomically; closes the figure."""
    out = []
    for fmt in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight", metadata={"CreationDate": None}
                    if fmt == "pdf" else None)
        out.append(atomic_write(stem.with_suffix(f".{fmt}"), buf.getvalue()))
    plt.close(fig)
    return out


def _references_apart(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of a long statistics table in table order, methods first, then the reference rows."""
    is_ref = table["family"].eq(REFERENCE)
    return pd.concat([table[~is_ref], table[is_ref]])


# -- leaderboard ------------------------------------------------------------------------------------------------

def forest_plot(rows: pd.DataFrame) -> Figure:
    """One statistic's ``leaderboard.csv`` rows: a point and its 95 % interval per method, top to bottom in table
    order, the reference rows below a rule; the best method (``best``) filled, the others open."""
    rows = _references_apart(rows.dropna(subset=["value"]))
    if rows.empty:
        raise MaskbenchError("forest_plot: no defined value to draw")
    n = len(rows)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(TEXT_WIDTH / 2, 0.16 * n + 0.6))
        y = np.arange(n)[::-1]
        ref = rows["family"].eq(REFERENCE).to_numpy()
        best = rows["best"].astype(str).eq("True").to_numpy()
        val, lo, hi = (rows[c].to_numpy(dtype=float) for c in ("value", "ci_low", "ci_high"))
        colour = np.where(ref, "0.55", OKABE_ITO[0])
        for i in range(n):
            ax.errorbar(val[i], y[i], xerr=[[val[i] - lo[i]], [hi[i] - val[i]]], fmt="o", ms=3.5,
                        color=colour[i], mfc=colour[i] if best[i] else "white", capsize=1.5, lw=0.8)
        if ref.any() and not ref.all():
            ax.axhline(y[ref][0] + 0.5, color="0.3", lw=0.5)
        ax.set_yticks(y, rows["method_label"].astype(str))
        label = rows["label"].iloc[0]
        arrow = "higher is better" if str(rows["higher_is_better"].iloc[0]) == "True" else "lower is better"
        ax.set_xlabel(f"{label} ({arrow}; 95 % interval)")
        ax.grid(axis="x", lw=0.3, color="0.85")
        ax.set_axisbelow(True)
        fig.tight_layout()
    return fig


# -- class-specific masking table -------------------------------------------------------------------------------

def class_table_figure(table: pd.DataFrame, labels: dict[str, str]) -> Figure:
    """``class_table.csv`` (method, target, mask, value) as one heat map per method (target rows, mask columns),
    G.T. first, all on the scale [0, 100]; the ``none`` (unmasked) column is left out."""
    table = table[table["mask"] != "none"]
    methods = list(dict.fromkeys(table["method"]))
    methods.sort(key=lambda m: m != "ground-truth")
    classes = list(dict.fromkeys(table["target"]))
    cols = min(5, len(methods))
    nrows = -(-len(methods) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, cols, figsize=(TEXT_WIDTH, 1.45 * nrows + 0.3), squeeze=False)
        image = None
        for ax, method in zip(axes.flat, methods, strict=False):
            t = table[table["method"] == method].pivot(index="target", columns="mask", values="value")
            t = t.reindex(index=classes, columns=classes)
            image = ax.imshow(t.to_numpy(dtype=float), cmap=MAP_CMAP, vmin=0, vmax=100)
            ax.set_title(labels.get(method, method), pad=2)
            ax.set_xticks(range(len(classes)), classes, rotation=90)
            ax.set_yticks(range(len(classes)), classes)
            ax.tick_params(length=0, pad=1)
        for ax in list(axes.flat)[len(methods):]:
            ax.set_visible(False)
        fig.supxlabel("mask of class", fontsize=7)
        fig.supylabel("target class", fontsize=7)
        fig.tight_layout(rect=(0, 0, 0.93, 1))
        cax = fig.add_axes((0.945, 0.15, 0.012, 0.7), label="<colorbar>")
        fig.colorbar(image, cax=cax, label="target probability (%)")
    return fig


# -- faithfulness curves ----------------------------------------------------------------------------------------

REVEALED = "fraction of pixels revealed, most salient first"
CURVES = {  # stored curve -> (faithfulness.csv statistic, x label, y label, title)
    "insertion": ("insertion", REVEALED, "class probability", "Insertion (blurred image -> image)"),
    "deletion": ("deletion", "fraction of pixels removed (set to the mean colour), most salient first",
                 "class probability", "Deletion (image -> mean colour)"),
    "mf": ("mf_clipped", REVEALED, "(q - q_F) / (q_O - q_F), clipped", "M_F curve (blurred image -> image)"),
}
CURVE_BASELINE = "random-uniform"


def mean_curve(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per x of (n, S) per-image curves (NaN rows: undefined images): the mean, its 95 % percentile bootstrap
    interval (:func:`~maskbench.core.stats.column_intervals`, images resampled) and the number of images."""
    keep = ~np.isnan(values).all(1)
    mean, lo, hi = column_intervals(values[keep])
    return mean, lo, hi, int(keep.sum())


def curves_figure(x: np.ndarray, curves: dict[str, np.ndarray], labels: dict[str, str],
                  titles: dict[str, str], ylabel: str, title: str, xlabel: str = REVEALED) -> Figure:
    """One panel per method of ``curves`` (method -> (n, S) per-image curves at ``x``), in that order: its mean
    curve and 95 % band, and the :data:`CURVE_BASELINE` mean curve dashed when it is among ``curves``."""
    methods = [m for m in curves if not np.isnan(curves[m]).all()]
    if not methods:
        raise MaskbenchError(f"curves_figure: no defined curve to draw ({title})")
    base = mean_curve(curves[CURVE_BASELINE])[0] if CURVE_BASELINE in methods else None
    cols = min(5, len(methods))
    nrows = -(-len(methods) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, cols, figsize=(TEXT_WIDTH, 1.25 * nrows + 0.45), squeeze=False,
                                 sharex=True, sharey=True)
        for ax, m in zip(axes.flat, methods, strict=False):
            mean, lo, hi, n = mean_curve(curves[m])
            if base is not None and m != CURVE_BASELINE:
                ax.plot(x, base, color="0.55", lw=0.7, ls="--")
            ax.fill_between(x, lo, hi, color=OKABE_ITO[0], alpha=0.25, lw=0)
            ax.plot(x, mean, color=OKABE_ITO[0], lw=1)
            ax.set_title(f"{labels.get(m, m)}\n{titles.get(m, '')} (n={n})", pad=2, fontsize=6)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
            ax.set_yticks([0, 0.5, 1], ["0", "0.5", "1"])
            ax.grid(lw=0.3, color="0.9")
            ax.set_axisbelow(True)
        for ax in list(axes.flat)[len(methods):]:
            ax.set_visible(False)
        for i in range(len(methods) - cols, len(methods) - (len(methods) - 1) % cols - 1):
            if i >= 0:  # the lowest panel of a column whose row below is short: its x ticks labelled too
                axes.flat[i].xaxis.set_tick_params(labelbottom=True)
        fig.supxlabel(xlabel, fontsize=7)
        fig.supylabel(ylabel, fontsize=7)
        baseline = f"; dashed: {labels.get(CURVE_BASELINE, CURVE_BASELINE)}" if base is not None else ""
        fig.suptitle(f"{title}: mean over images, 95 % band{baseline}", fontsize=7)
        fig.tight_layout(h_pad=0.4, w_pad=0.3)
    return fig


def stored_curves(run_dir: Path, metric: str = "curves"
                  ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """The per-image curves of every stored method (their current key, in the run's image order): x grid per
    curve name, and curve name -> method -> (n, S) values; methods in leaderboard order, constant maps left out
    (their ranked reveal is the random-uniform one's)."""
    store = RowStore(run_dir)
    run = run_dir / "run.json"
    image_ids = [str(i) for i in read_json(run)["image_ids"]] if run.is_file() else None
    order = list(_labels(run_dir)) or store.methods()
    xs: dict[str, np.ndarray] = {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for m in order:
        meta = store.load_meta(m, strict=False)
        key = meta.get("metric_keys", {}).get(metric)
        if key is None or m.startswith("constant"):
            continue
        table, _ = store.load_curves(m, metric, key)
        for name in table.y:
            xs[name] = table.x[name]
            out.setdefault(name, {})[m] = table.values(name, image_ids or sorted(table.image_ids))
    return xs, out


# -- sanity and meta-evaluation ---------------------------------------------------------------------------------

RANDOMISATION_PANELS = (("cascading", "spearman"), ("independent", "spearman"),
                        ("cascading", "ssim"), ("independent", "ssim"))
MODEL_BLIND = {"ground-truth", "centre-gaussian", "random-uniform"}


def randomisation_figure(table: pd.DataFrame, labels: dict[str, str]) -> Figure:
    """``randomisation.csv`` as Adebayo et al.'s Fig. 2 and 4: one panel per (mode, similarity) of
    :data:`RANDOMISATION_PANELS` that holds values (cascading re-initialisation from the head down, and each layer
    alone; Spearman rank correlation and SSIM between the trained and the randomised model's maps), one line with
    its 95 % band per method (reference rows, which ignore the model, left out), the noise control dashed. The
    data randomisation test (permuted labels) is a single number per method: its table, not drawn."""
    panels = [(mode, sim) for mode, sim in RANDOMISATION_PANELS
              if ((table["mode"] == mode) & (table["similarity"] == sim) & table["value"].notna()).any()]
    shown = table[table["mode"].isin({m for m, _ in panels})]
    methods = [m for m in dict.fromkeys(shown["method"]) if m not in MODEL_BLIND and not m.startswith("constant")]
    style_of = {m: dict(color="0.4", ls="--") if m == "noise" else dict(
        color=OKABE_ITO[i % len(OKABE_ITO)], ls=["-", ":", "-."][i // len(OKABE_ITO) % 3])
        for i, m in enumerate(methods)}
    cols = 2 if len(panels) > 1 else 1
    nrows = -(-len(panels) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, cols, figsize=(TEXT_WIDTH * (0.85 if cols == 2 else 0.7), 2.3 * nrows),
                                 squeeze=False, sharey="row")
        for ax, (mode, sim) in zip(axes.flat, panels, strict=False):
            t = table[(table["mode"] == mode) & (table["similarity"] == sim)].dropna(subset=["value"])
            steps = list(dict.fromkeys(t["step"]))
            position = {st: i for i, st in enumerate(steps)}
            for method in methods:
                g = t[t["method"] == method]  # the steps it has (learned methods: retrained at some steps only)
                if g.empty:
                    continue
                x = g["step"].map(position).to_numpy()
                style = style_of[method]
                ax.plot(x, g["value"], lw=1, marker="o", ms=2, label=labels.get(method, method), **style)
                ax.fill_between(x, g["ci_low"], g["ci_high"], color=style["color"], alpha=0.1, lw=0)
            ax.axhline(0, color="0.3", lw=0.5)
            ax.set_xticks(range(len(steps)), [st.replace(": ", "\n") for st in steps], fontsize=5.5)
            ax.set_title(f"{mode} ({'Spearman rho' if sim == 'spearman' else 'SSIM'})", pad=2)
            ax.set_ylim(-0.3, 1.05)
            ax.set_ylabel("trained vs randomised" if ax in axes[:, 0] else "")
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, names, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 0.98), handlelength=2.2)
        fig.supxlabel("layers re-initialised (cascading: from the head down; independent: that layer only)",
                      fontsize=7)
        fig.tight_layout()
    return fig


def agreement_figure(table: pd.DataFrame) -> Figure:
    """``meta_agreement.csv``: Kendall tau_b between every pair of statistics' method rankings, annotated."""
    names = list(dict.fromkeys(table["statistic_a"]))
    m = table.pivot(index="statistic_a", columns="statistic_b", values="tau").reindex(index=names, columns=names)
    values = m.to_numpy(dtype=float)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(TEXT_WIDTH / 2, TEXT_WIDTH / 2 * 0.85))
        image = ax.imshow(values, cmap=TAU_CMAP, vmin=-1, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.tick_params(length=0)
        fig.colorbar(image, ax=ax, label="Kendall tau_b of the method rankings", shrink=0.8)
        fig.tight_layout()
    return fig


def ranks_figure(table: pd.DataFrame, labels: dict[str, str]) -> Figure:
    """``meta_ranks.csv``: per statistic (one panel each) every method's median rank over the bootstrap
    resamples with its 95 % interval (1 = best), methods in the order of the first statistic's ranks."""
    stats = list(dict.fromkeys(table["statistic"]))
    order = table[table["statistic"] == stats[0]].sort_values("rank")["method"].tolist()
    cols = min(3, len(stats))
    nrows = -(-len(stats) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, cols, figsize=(TEXT_WIDTH, 1.9 * nrows + 0.2), squeeze=False,
                                 sharey=True)
        y = np.arange(len(order))[::-1]
        for ax, stat in zip(axes.flat, stats, strict=False):
            g = table[table["statistic"] == stat].set_index("method").reindex(order)
            med = g["rank_median"].to_numpy(dtype=float)
            ax.errorbar(med, y, xerr=[med - g["rank_ci_low"].to_numpy(dtype=float),
                                      g["rank_ci_high"].to_numpy(dtype=float) - med],
                        fmt="o", ms=2.5, color=OKABE_ITO[0], capsize=1, lw=0.7)
            ax.set_title(stat, pad=2)
            ax.set_xlim(0.5, len(order) + 0.5)
            ax.grid(axis="x", lw=0.3, color="0.85")
            ax.set_axisbelow(True)
        for ax in axes[:, 0]:
            ax.set_yticks(y, [labels.get(m, m) for m in order])
        for ax in list(axes.flat)[len(stats):]:
            ax.set_visible(False)
        fig.supxlabel("rank over bootstrap resamples (median, 95 % interval; 1 = best)", fontsize=7)
        fig.tight_layout()
    return fig


# -- qualitative masks ------------------------------------------------------------------------------------------

def default_images(image_ids: Sequence[str], first_class: Callable[[str], int | None], num_classes: int) -> list[str]:
    """One image per class in class order: the first image (in id order) whose first true class is that class."""
    chosen: dict[int, str] = {}
    for image_id in sorted(image_ids):
        c = first_class(image_id)
        if c is not None and c not in chosen:
            chosen[c] = image_id
            if len(chosen) == num_classes:
                break
    return [chosen[c] for c in sorted(chosen)]


def masks_figure(images: Sequence[np.ndarray], class_names: Sequence[str], row_ids: Sequence[str],
                 columns: Sequence[str], maps: Sequence[Sequence[np.ndarray | None]]) -> Figure:
    """The qualitative grid: row i is ``images[i]`` (H, W, 3 in [0, 1]) labelled with its id and class, then
    ``maps[i][j]`` (H, W in [0, 1]; None = not cached: a blank, crossed panel) under ``columns[j]``."""
    n, k = len(images), len(columns) + 1
    side = min(0.75, TEXT_WIDTH / k)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n, k, figsize=(side * k, side * n + 0.35), squeeze=False,
                                 gridspec_kw={"wspace": 0.04, "hspace": 0.04})
        image = None
        for i in range(n):
            axes[i, 0].imshow(images[i])
            axes[i, 0].set_ylabel(f"{row_ids[i]}\n{class_names[i]}", fontsize=6, rotation=0, ha="right",
                                  va="center", labelpad=2)
            for j in range(1, k):
                m = maps[i][j - 1]
                if m is None:
                    axes[i, j].plot([0, 1], [0, 1], color="0.6", lw=0.5, transform=axes[i, j].transAxes)
                else:
                    image = axes[i, j].imshow(m, cmap=MAP_CMAP, vmin=0, vmax=1, interpolation="nearest")
        for j, name in enumerate(["image", *columns]):
            axes[0, j].set_title(name, fontsize=6, pad=2, rotation=30 if k > 10 else 0,
                                 ha="left" if k > 10 else "center")
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        if image is not None:
            cax = fig.add_axes((0.92, 0.3, 0.01, 0.4), label="<colorbar>")
            fig.colorbar(image, cax=cax, ticks=[0, 0.5, 1])
            fig.subplots_adjust(right=0.9)
    return fig


def run_masks(run_dir: Path, cache: Path, meta: dict) -> MaskCache:
    """The mask cache a stored method's sidecar points to (see :func:`maskbench.benchmark.runner.method_masks`)."""
    return MaskCache(Path(cache) / "masks" / meta["data_key"] / meta["classifier_sha256"]
                     / f"{meta['method']}-{meta['cache_key']}")


def _labels(run_dir: Path) -> dict[str, str]:
    board = run_dir / "leaderboard.csv"
    if not board.is_file():
        return {}
    t = pd.read_csv(board, dtype=str)
    return dict(zip(t["method"], t["method_label"], strict=True))


def write_figures(run_dir: Path) -> list[Path]:
    """Every figure the run's stored tables allow (see the module docstring), under ``run_dir/figures``; the mask
    grid, which also needs the data and the mask cache, is :func:`figures_for_run`'s. Returns the files written.
    """
    run_dir = Path(run_dir)
    out_dir = run_dir / "figures"
    labels = _labels(run_dir)
    written: list[Path] = []
    board = run_dir / "leaderboard.csv"
    if board.is_file():
        t = pd.read_csv(board)
        for stat, rows in t.groupby("statistic", sort=False):
            if rows["value"].notna().any():  # a statistic undefined on this data (e.g. IoU without masks): none
                written += save_figure(forest_plot(rows), out_dir / f"forest_{stat}")
    xs, curves = stored_curves(run_dir)
    faith = pd.read_csv(run_dir / "faithfulness.csv") if (run_dir / "faithfulness.csv").is_file() else None
    for name, per_method in curves.items():
        stat, xlabel, ylabel, title = CURVES.get(name, (name, "x", "value", name))
        titles = {}
        if faith is not None:
            for r in faith[faith["statistic"] == stat].itertuples():
                titles[r.method] = f"{r.value:.1f} [{r.ci_low:.1f}, {r.ci_high:.1f}]"
        if any(not np.isnan(v).all() for v in per_method.values()):
            fig = curves_figure(xs[name], per_method, labels, titles, ylabel, title, xlabel)
            written += save_figure(fig, out_dir / f"curves_{name}")
    drawings = [("class_table", lambda t: class_table_figure(t, labels), "value"),
                ("randomisation", lambda t: randomisation_figure(t, labels), "value"),
                ("meta_agreement", agreement_figure, "tau"),
                ("meta_ranks", lambda t: ranks_figure(t, labels), "rank_median")]
    for table, draw, column in drawings:
        path = run_dir / f"{table}.csv"
        if path.is_file():
            t = pd.read_csv(path)
            if column in t and t[column].notna().any():  # nothing defined (e.g. no class table on ImageNet)
                written += save_figure(draw(t), out_dir / table.removeprefix("meta_"))
    return written


def _write_masks(run_dir: Path, cache: Path, dataset, images: Sequence[str] | None, labels: dict[str, str],
                 out_dir: Path) -> list[Path]:
    run = read_json(run_dir / "run.json")
    run_ids = [str(i) for i in run["image_ids"]]
    samples: dict[str, object] = {}

    def sample(image_id: str):
        if image_id not in samples:
            samples[image_id] = dataset.load(image_id)
        return samples[image_id]

    def first_class(image_id: str) -> int | None:
        present = np.flatnonzero(np.asarray(sample(image_id).label) > 0)
        return int(present[0]) if len(present) else None

    if images:
        unknown = [i for i in images if i not in set(run_ids)]
        if unknown:
            raise MaskbenchError(f"figures --images: {', '.join(unknown)} not in this run's {len(run_ids)} images "
                                 f"(e.g. {', '.join(run_ids[:5])})")
        chosen = list(images)
    else:
        chosen = default_images(run_ids, first_class, dataset.num_classes)
    store = RowStore(run_dir)
    metas = [store.load_meta(stem) for stem in store.methods()]
    by_name = {meta["method"]: meta for meta in metas if "cache_key" in meta}
    order = [m for m in labels if m in by_name and not m.startswith("constant")]  # table order, no constant maps
    caches = {m: run_masks(run_dir, cache, by_name[m]) for m in order}
    rows_images, rows_maps, names = [], [], []
    mean = np.asarray(dataset.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(dataset.std, dtype=np.float32)[:, None, None]
    for image_id in chosen:
        s = sample(image_id)
        c = first_class(image_id)
        img = np.asarray(s.image, dtype=np.float32) * std + mean
        rows_images.append(np.clip(img.transpose(1, 2, 0), 0, 1))
        names.append(dataset.classes[c] if c is not None else "(no class)")
        maps = []
        for m in order:
            hit = caches[m].get(image_id)
            classes = [] if hit is None else hit[0].tolist()
            maps.append(hit[1][classes.index(c)].astype(np.float32) if c in classes else None)
        rows_maps.append(maps)
    if not any(m is not None for row in rows_maps for m in row):
        raise MaskbenchError(f"figures: no cached masks of {run_dir} under {cache}/masks; run `maskbench bench` "
                             f"with the run's options first (it reuses the stored rows and recomputes the masks)")
    fig = masks_figure(rows_images, names, chosen, [labels.get(m, m) for m in order], rows_maps)
    return save_figure(fig, out_dir / "masks")


def figures_for_run(run_dir: Path, *, cache: Path, data_root: str | None = None,
                    images: Sequence[str] | None = None, masks: bool = True) -> tuple[list[Path], str | None]:
    """:func:`write_figures` for a stored run, its test split rebuilt from ``run.json`` (data set, split, image
    size; ``data_root`` as ``bench`` took it). Returns the files written and, when the mask grid could not be
    drawn (no cached masks: a fresh clone), why."""
    from maskbench.datasets import build_split
    from maskbench.datasets.digests import using_memo_dir

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise MaskbenchError(f"figures: {run_dir} is not a stored run (no run.json); runs are "
                             f"results/<dataset>/<model>/ folders written by `maskbench bench`")
    written = write_figures(run_dir)
    if not masks:
        return written, None
    identity = read_json(run_dir / "run.json")["identity"]
    size = identity.get("image_size")
    with using_memo_dir(cache):  # without data_root, the data are where bench put them: under its cache
        dataset = build_split(identity["dataset"], identity["split"], root=data_root,
                              image_size=size[0] if size and size[0] == size[-1] else None)
    try:
        written += _write_masks(run_dir, Path(cache), dataset, images, _labels(run_dir), run_dir / "figures")
    except MaskbenchError as exc:
        if images:  # asked for: an error
            raise
        return written, str(exc)
    return written, None
