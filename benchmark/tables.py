"""Tables: pure functions of the stored per-image rows (``per_image/*.csv`` and their sidecars).

``maskbench tables`` rebuilds every table from what is stored, without loading a data set or a model, and
writes the same bytes every time for the same rows (the bootstrap is seeded). For a run directory
``results/<dataset>/<model>/`` it writes, each as a long-format CSV (one row per method and statistic, with the
95% bootstrap interval, image counts, and best / not-significantly-different flags) and a LaTeX ``booktabs``
table (arrows for polarity, best in bold, methods not significantly different from the best underlined,
``± half-width`` of the interval):

* ``segmentation``: Acc, IoU, Sal, MAE of the merged masks (Stalder et al., NeurIPS 2022, Table 2);
* ``class_table`` (every cell, CSV + one block per method in LaTeX) and ``class_contrast`` (diagonal,
  off-diagonal and their difference) (NeurIPS 2022, Table 1);
* ``faithfulness``: M_F clipped and as eq. 8 (DGMP, Table 1), RISE insertion and deletion AUC;
* ``explainability``: M_I, eq. 9 (DGMP, Table 2);
* ``pointing``: pointing game, all and difficult (DGMP Table 3; TorchRay's benchmark), per-class in
  ``pointing_per_class.csv``;
* ``masked_classifier``: precision, recall and F-score on images masked by each method, with the unmasked
  classifier as the first row (NeurIPS 2022, Table 4);
* ``compute_time``: wall time and images per second to produce the masks, training time apart (NeurIPS 2022,
  Table 3) (measured values; no interval);
* ``diagnostics.csv``: per method, images scored, undefined values, constant maps, tied maxima, empty ground
  truth;
* ``leaderboard``: the headline statistic of each table side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .latex import escape, matrix_latex, plain_latex, statistics_latex
from .runs import read_run
from .stats import (
    LEVEL,
    RESAMPLES,
    SEED,
    Statistic,
    class_mean,
    f_score,
    mean_of,
    nanmean_rows,
    ratio_of_sums,
    statistics_table,
)
from .storage import atomic_write, read_json
from .store import COMPLETE, RowStore, StoredDataError

FAMILY_ORDER = ["classifier", "reference", "gradient", "perturbation", "learned", "plugin", ""]
REFERENCE_ORDER = ["constant-0", "constant-0.5", "constant-1", "ground-truth", "centre-gaussian", "random-uniform"]
UNMASKED = "classifier-unmasked"  # pseudo-method of the masked-classifier table: the classifier on clean images
FLOAT = "%.4f"


def _method_order(metas: dict[str, dict]) -> list[str]:
    def key(m: str) -> tuple:
        fam = metas[m].get("family", "")
        fam_i = FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER)
        ref_i = REFERENCE_ORDER.index(m) if m in REFERENCE_ORDER else len(REFERENCE_ORDER)
        return (fam_i, ref_i, m)

    return sorted(metas, key=key)


@dataclass
class StoredRun:
    """What a run folder holds for its tables: the rows of its methods, their sidecars, the images the run
    promises (``run.json``; None for a folder without one) and the methods left out, with why."""

    rows: pd.DataFrame
    metas: dict[str, dict]
    image_ids: list[str] | None = None
    excluded: dict[str, str] = field(default_factory=dict)


def load_current_rows(run_dir: Path) -> StoredRun:
    """All methods' rows computed under each method's current run key, and the method sidecars.

    Everything is validated (:meth:`RowStore.load`): a damaged or edited file is an error naming it and its
    line. A method whose sidecar names another classifier or other data than the folder's ``run.json`` belongs
    to another run and is left out (listed in ``excluded``), so a table never mixes runs; so are rows of images
    the run does not promise.
    """
    from maskbench.metrics import value_range

    run_dir = Path(run_dir)
    store = RowStore(run_dir, value_range)
    run = read_run(run_dir)  # the images the run promises and what its rows must have been computed with
    identity = run["identity"] if run is not None else None
    image_ids = [str(i) for i in run.get("image_ids", [])] if run is not None else None
    metas, frames, excluded = {}, [], {}
    for stem in store.methods():
        meta = store.load_meta(stem)
        if not meta:
            raise StoredDataError(f"{store.meta_path(stem)} is missing: the rows of {store.csv_path(stem)} cannot "
                                  f"be tabled without it. Run `maskbench bench` with the run's options to rewrite it.")
        if not store.csv_path(stem).is_file():
            raise StoredDataError(f"{store.csv_path(stem)} is missing (its sidecar {store.meta_path(stem)} is there). "
                                  f"Run `maskbench bench` with the run's options to recompute it.")
        m = meta.get("method", stem)  # the stored name; the file stem is a file-safe version of it
        if identity is not None:
            other = [k for k in ("classifier_sha256", "data_key") if meta.get(k) != identity.get(k)]
            if other:
                excluded[m] = f"computed with another {' and '.join(k.split('_')[0] for k in other)} than this run"
                continue
        rows = store.load(stem, run_key=meta.get("run_key"))
        if image_ids is not None:
            rows = rows[rows["image_id"].isin(set(image_ids))]
        if rows.empty:
            continue
        metas[m] = meta
        frames.append(rows.assign(method=m))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["method", "image_id", "metric"])
    return StoredRun(rows, metas, image_ids, excluded)


# --------------------------------------------------------------------------------------------- statistics


def _registered(name: str) -> Statistic:
    from maskbench.metrics import METRICS

    spec = METRICS.get(name)
    return mean_of(name, spec.label, spec.higher_is_better, spec.description)


def _class_cell(col: str) -> tuple[int, int] | None:
    """``classmask/t<t>/m<c>`` -> (t, c); None for the "none" column and other metrics."""
    parts = col.split("/")
    if len(parts) != 3 or parts[0] != "classmask" or not parts[2].startswith("m"):
        return None
    return int(parts[1][1:]), int(parts[2][1:])


def _class_statistic(name: str, label: str, higher: bool, part: str) -> Statistic:
    def select(cols: list[str]) -> list[str]:
        return sorted(c for c in cols if _class_cell(c) is not None)

    def reduce(means: np.ndarray, cols: list[str]) -> np.ndarray:
        cells = [_class_cell(c) for c in cols]
        diag = np.array([t == m for t, m in cells])
        d = nanmean_rows(np.where(diag, means, np.nan))
        o = nanmean_rows(np.where(~diag, means, np.nan))
        return {"diagonal": d, "off_diagonal": o, "contrast": d - o}[part]

    return Statistic(name, label, higher, select, reduce)


CLASS_STATS = [
    _class_statistic("class_diagonal", "Diagonal", True, "diagonal"),
    _class_statistic("class_off_diagonal", "Off-diagonal", False, "off_diagonal"),
    _class_statistic("class_contrast", "Contrast", True, "contrast"),
]
MASKED_STATS = [
    ratio_of_sums("masked_precision", ["maskcls/tp"], ["maskcls/tp", "maskcls/fp"], "Precision", True),
    ratio_of_sums("masked_recall", ["maskcls/tp"], ["maskcls/tp", "maskcls/fn"], "Recall", True),
    f_score("masked_f", "maskcls/tp", "maskcls/fp", "maskcls/fn", "F-score"),
]
POINTING_STATS = [
    class_mean("pointing", "pointing/c", "All", True, "pointing game accuracy (%), mean over classes", 100.0),
    class_mean("pointing_difficult", "pointing/d", "Difficult", True, "the same on the difficult subset", 100.0),
]


@dataclass
class TableSpec:
    name: str
    stats: list[Statistic]
    caption: str
    paper: str
    extra: dict[str, str] = field(default_factory=dict)  # header -> diagnostics column to show as plain text


def table_specs() -> list[TableSpec]:
    """The statistic tables, in the order the leaderboard joins them."""
    return [
        TableSpec("segmentation", [_registered(m) for m in ("acc", "iou", "sal", "mae")],
                  r"Segmentation scores of the merged class masks. Acc, IoU and MAE in \%, Sal as eq.~9.",
                  r"Stalder et al.\ (2022), Table 2"),
        TableSpec("faithfulness", [_registered(m) for m in ("mf_clipped", "mf", "insertion", "deletion")],
                  r"Faithfulness: $\mathcal{M}_F$ (blurred substrate, $\Delta = 1/32$) clipped to the "
                  r"$[q_F, q_O]$ range and as eq.~8 is written; RISE insertion and deletion AUC (\%).",
                  r"Zhang et al.\ (DGMP), Table 1; Petsiuk et al.\ (2018)"),
        TableSpec("explainability", [_registered("mi")],
                  r"Explainability $\mathcal{M}_I$ (eq.~9): average precision (\%) of the pixel ranking against "
                  r"the union of the class's boxes, tied scores entering together.",
                  r"Zhang et al.\ (DGMP), Table 2"),
        TableSpec("pointing", POINTING_STATS,
                  r"Pointing game accuracy (\%, mean over classes), all pairs and the difficult subset "
                  r"(boxes $<1/4$ of the image and a distractor class). A constant map is a miss.",
                  r"Zhang et al.\ (2016) via TorchRay; Zhang et al.\ (DGMP), Table 3",
                  extra={"Const.": "constant_maps"}),
        TableSpec("class_contrast", CLASS_STATS,
                  r"Class-specific masking: softmax probability (\%) of a target class under its own class's "
                  r"thresholded mask (diagonal) or another class's (off-diagonal), thresholds 0.1--0.9; "
                  r"contrast = diagonal $-$ off-diagonal. All cells in class\_table.csv.",
                  r"Stalder et al.\ (2022), Table 1"),
        TableSpec("masked_classifier", MASKED_STATS,
                  r"Multi-label classifier on images masked by each method's merged true-class mask (logit "
                  r"threshold $-1$) and on the unmasked images (threshold $0$): micro precision, recall and "
                  r"F-score (\%).",
                  r"Stalder et al.\ (2022), Table 4"),
    ]


LEADERBOARD = [("segmentation", "iou", "IoU"), ("faithfulness", "mf_clipped", "M_F clipped"),
               ("explainability", "mi", "M_I"), ("pointing", "pointing", "Pointing"),
               ("class_contrast", "class_contrast", "Class contrast"), ("masked_classifier", "masked_f", "Masked F")]


# ----------------------------------------------------------------------------------------------- assembly


def _with_unmasked(rows: pd.DataFrame, metas: dict[str, dict]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Add the unmasked classifier as a pseudo-method (its counts are stored with every method's rows)."""
    have = set(rows.loc[rows["metric"] == "maskcls/orig_tp", "method"])
    source = next((m for m in _method_order(metas) if m in have), None)
    if source is None:
        return rows, metas
    sub = rows[(rows["method"] == source) & rows["metric"].str.startswith("maskcls/orig_")].copy()
    sub["metric"] = sub["metric"].str.replace("maskcls/orig_", "maskcls/", regex=False)
    sub["method"] = UNMASKED
    metas = {**metas, UNMASKED: {"label": "Classifier (unmasked)", "family": "classifier", "preset": ""}}
    return pd.concat([rows, sub], ignore_index=True), metas


def diagnostics(rows: pd.DataFrame, metas: dict[str, dict]) -> pd.DataFrame:
    """Per method: images scored, and the counts that are never turned into numbers silently."""
    recs = []
    for m in _method_order(metas):
        r = rows[rows["method"] == m]
        if r.empty:
            continue
        sums = r.groupby("metric")["value"].sum()
        scalar = r[~r["metric"].str.contains("/") & (r["metric"] != COMPLETE)]
        undefined = scalar.groupby("metric")["value"].apply(lambda v: int(v.isna().sum()))
        recs.append({
            "method": m, "label": metas[m].get("label", m), "family": metas[m].get("family", ""),
            "images": int((r["metric"] == COMPLETE).sum()),
            "constant_maps": int(sums.get("pointing/constant", 0)),
            "tied_maxima": int(sums.get("pointing/tied", 0)),
            "empty_ground_truth": int(sums.get("pointing/no_gt", 0)),
            "skipped_all_difficult": int(sums.get("pointing/skipped_difficult", 0)),
            "undefined": ";".join(f"{k}={v}" for k, v in undefined.items() if v),
        })
    return pd.DataFrame.from_records(recs, columns=["method", "label", "family", "images", "constant_maps",
                                                    "tied_maxima", "empty_ground_truth", "skipped_all_difficult",
                                                    "undefined"])


def _long(table: pd.DataFrame, name: str, metas: dict[str, dict]) -> pd.DataFrame:
    out = table.copy()
    out.insert(0, "table", name)
    out.insert(5, "method_label", [metas[m].get("label", m) for m in out["method"]])
    out.insert(6, "family", [metas[m].get("family", "") for m in out["method"]])
    out.insert(7, "preset", [metas[m].get("preset", "") for m in out["method"]])
    return out


def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, float_format=FLOAT, lineterminator="\n")


def _hms(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "--"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def compute_time(metas: dict[str, dict]) -> pd.DataFrame:
    """NeurIPS 2022 Table 3 from the sidecars: mask-producing time (synchronised, warm-up excluded), training."""
    recs = []
    for m in _method_order(metas):
        meta = metas[m]
        timing = meta.get("timing", {})
        secs = timing.get("explain_seconds")
        n = timing.get("images", 0)
        train = meta.get("setup", {}).get("train_seconds")
        recs.append({
            "method": m, "label": meta.get("label", m), "family": meta.get("family", ""),
            "preset": meta.get("preset", ""), "device": timing.get("device", ""), "images_timed": n,
            "seconds": float(secs) if secs is not None and n else math.nan,
            "images_per_second": float(n / secs) if secs and n else math.nan,
            "warmup_seconds": float(timing["warmup_seconds"]) if timing.get("warmup_seconds") is not None
            else math.nan,
            "train_seconds": float(train) if train is not None else math.nan,
        })
    return pd.DataFrame.from_records(recs, columns=["method", "label", "family", "preset", "device", "images_timed",
                                                    "seconds", "images_per_second", "warmup_seconds",
                                                    "train_seconds"])


def class_table(rows: pd.DataFrame, metas: dict[str, dict], class_names: list[str] | None,
                resamples: int = RESAMPLES, seed: int = SEED, image_ids: list[str] | None = None,
                scored: dict[str, set[str]] | None = None) -> pd.DataFrame:
    """Long table of NeurIPS 2022 Table 1: mean softmax probability (%) of target t under the mask of class m."""
    sub = rows[rows["metric"].str.startswith("classmask/")]
    cols = ["method", "label", "target", "mask", "value", "ci_low", "ci_high", "images"]
    if sub.empty:
        return pd.DataFrame(columns=cols)

    def name(i: int) -> str:
        return class_names[i] if class_names and i < len(class_names) else str(i)

    stats = []
    for metric in sorted(set(sub["metric"])):
        _, t, m = metric.split("/")
        stats.append(mean_of(metric, f"{t}/{m}", True))
    long = statistics_table(sub, [m for m in _method_order(metas) if m in set(sub["method"])], stats, {},
                            resamples, seed, image_ids=image_ids, scored=scored)
    parts = long["statistic"].str.split("/", expand=True)
    out = pd.DataFrame({
        "method": long["method"], "label": [metas[m].get("label", m) for m in long["method"]],
        "target": [name(int(t[1:])) for t in parts[1]],
        "mask": ["none" if m == "none" else name(int(m[1:])) for m in parts[2]],
        "value": long["value"], "ci_low": long["ci_low"], "ci_high": long["ci_high"], "images": long["images"],
        "_t": [int(t[1:]) for t in parts[1]], "_m": [-1 if m == "none" else int(m[1:]) for m in parts[2]],
    })
    order = {m: i for i, m in enumerate(_method_order(metas))}
    out = out.sort_values(["method", "_t", "_m"], key=lambda c: c.map(order) if c.name == "method" else c)
    return out[cols].reset_index(drop=True)


def _class_blocks(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    blocks = []
    for method, sub in table.groupby("method", sort=False):
        masks = ["none"] + [m for m in dict.fromkeys(sub["mask"]) if m != "none"]
        wide = sub.pivot(index="target", columns="mask", values="value")
        wide = wide.reindex(index=list(dict.fromkeys(sub["target"])), columns=masks)
        label = str(sub["label"].iloc[0])
        blocks.append((label if label == method else f"{label} ({method})", wide))
    return blocks


def write_tables(run_dir: Path, *, resamples: int = RESAMPLES, seed: int = SEED, ci: bool = True,
                 loaded: StoredRun | None = None) -> list[Path]:
    """(Re)write every table of a run directory from its stored rows. Returns the files written.

    ``loaded``: the result of :func:`load_current_rows` for ``run_dir`` when the caller has already read it.
    """
    run_dir = Path(run_dir)
    stored = loaded if loaded is not None else load_current_rows(run_dir)
    rows, metas = stored.rows, stored.metas
    if rows.empty:
        return []
    manifest = run_dir / "manifest.json"
    data_info = read_json(manifest).get("dataset", {}) if manifest.is_file() else {}
    class_names = data_info.get("classes")
    rows = _table_class_cells(rows[["method", "image_id", "metric", "value"]], data_info.get("table_classes"))
    dataset, model = run_dir.parent.name, run_dir.name
    presets = sorted({meta.get("preset", "") for meta in metas.values()
                      if meta.get("family") != "reference" and meta.get("preset")})
    n_images = (len(stored.image_ids) if stored.image_ids is not None
                else rows.loc[rows["metric"] == COMPLETE, "image_id"].nunique())
    where = (f"{escape(dataset)}, {escape(model)}, {n_images} images, preset {', '.join(presets) or '-'}")
    ci_note = (rf"$\pm$: half-width of the {int(LEVEL * 100)}\% bootstrap interval over images ({resamples} "
               rf"resamples, seed {seed}); " if ci else "")
    mark_note = (r"bold: best method; underlined: not significantly different from the best (paired bootstrap). "
                 r"Rows above the first rule are references.")
    diag = diagnostics(rows, metas)
    run_images = stored.image_ids if stored.image_ids is not None else sorted(set(rows["image_id"]))
    scored = {m: set(g) for m, g in rows.loc[rows["metric"] == COMPLETE].groupby("method")["image_id"]}
    written: list[Path] = [atomic_write(run_dir / "diagnostics.csv", _csv(diag))]

    all_rows, all_metas = _with_unmasked(rows, metas)
    eligible = {m: all_metas[m].get("family") not in ("reference", "classifier") for m in all_metas}
    order = _method_order(all_metas)
    labels = {m: all_metas[m].get("label", m) for m in order}
    families = {m: all_metas[m].get("family", "") for m in order}
    computed: dict[str, pd.DataFrame] = {}
    stored = sorted(set(all_rows["metric"]))
    for spec in table_specs():
        needed = {c for s in spec.stats for c in s.select(stored)}
        if not needed:
            continue
        sub = all_rows[all_rows["metric"].isin(needed)]
        methods = [m for m in order if m in set(sub["method"])]
        table = statistics_table(sub, methods, spec.stats, eligible, resamples, seed, image_ids=run_images,
                                 scored=scored)
        computed[spec.name] = table
        extra = {h: {r.method: str(getattr(r, col)) for r in diag.itertuples()} for h, col in spec.extra.items()}
        caption = f"{spec.caption}{_pointing_tolerance(data_info) if spec.name == 'pointing' else ''} Run: " \
                  f"{where}. After {spec.paper}. {ci_note}{mark_note}"
        written.append(atomic_write(run_dir / f"{spec.name}.csv", _csv(_long(table, spec.name, all_metas))))
        written.append(atomic_write(run_dir / f"{spec.name}.tex", statistics_latex(
            table, methods, labels, families, caption, f"tab:{spec.name}-{dataset}-{model}", ci=ci, extra=extra)))

    if "pointing" in computed:
        written.append(atomic_write(run_dir / "pointing_per_class.csv", _csv(_pointing_per_class(rows, metas,
                                                                                                   class_names))))
    classes = class_table(rows, metas, class_names, resamples, seed, image_ids=run_images, scored=scored)
    if not classes.empty:
        written.append(atomic_write(run_dir / "class_table.csv", _csv(classes)))
        cap = (rf"Class-specific masking ({where}), after Stalder et al.\ (2022), Table 1: mean softmax probability "
               r"(\%) of the target class (rows) when the image is masked with the mask of the column's class "
               r"thresholded at 0.1--0.9, or not masked (none); diagonal in bold.")
        written.append(atomic_write(run_dir / "class_table.tex", matrix_latex(
            _class_blocks(classes), cap, f"tab:class-table-{dataset}-{model}")))

    times = compute_time(metas)
    written.append(atomic_write(run_dir / "compute_time.csv", _csv(times)))
    shown = times.assign(
        time=[_hms(s) for s in times["seconds"]],
        rate=["--" if math.isnan(v) else f"{v:.1f}" for v in times["images_per_second"]],
        train=[_hms(s) if not math.isnan(s) else "--" for s in times["train_seconds"]],
        label=[escape(v) for v in times["label"]],
        group=["reference" if f == "reference" else "method" for f in times["family"]],
    )
    cap = (rf"Time to produce the masks of {where} (hh:mm:ss; device synchronised, one warm-up image excluded) "
           r"and images per second; training time of learned methods apart. After Stalder et al.\ (2022), Table 3.")
    written.append(atomic_write(run_dir / "compute_time.tex", plain_latex(
        shown, {"label": "Method", "time": "Time", "rate": "Images/s", "train": "Training"}, cap,
        f"tab:compute-time-{dataset}-{model}", group_column="group")))

    board = _leaderboard(computed)
    if not board.empty:
        written.append(atomic_write(run_dir / "leaderboard.csv", _csv(_long(board, "leaderboard", all_metas))))
        methods = [m for m in order if m in set(board["method"])]
        rate = {r.method: ("--" if math.isnan(r.images_per_second) else f"{r.images_per_second:.1f}")
                for r in times.itertuples()}
        cap = (rf"Leaderboard ({where}): the headline statistic of each table (IoU: segmentation; "
               r"$\mathcal{M}_F$ clipped: faithfulness; $\mathcal{M}_I$: explainability; pointing game; "
               r"class-masking contrast; F-score of the classifier on masked images) and images per second. "
               f"{ci_note}{mark_note}")
        written.append(atomic_write(run_dir / "leaderboard.tex", statistics_latex(
            board, methods, labels, families, cap, f"tab:leaderboard-{dataset}-{model}", ci=ci,
            extra={"Images/s": rate})))
    return written


def _pointing_tolerance(data_info: dict) -> str:
    """Caption text: the pointing-game tolerance at this run's image size (15 px at 224 px, scaled)."""
    from maskbench.metrics.localisation import TOLERANCE_224, tolerance_pixels

    size = data_info.get("image_size")
    if not size:
        return rf" A hit is within {TOLERANCE_224} px at 224 px, scaled with the image."
    return (rf" A hit is within $\tau = {tolerance_pixels(min(size)):.2f}$ px of the ground truth at "
            rf"{size[0]}$\times${size[1]} px ({TOLERANCE_224} px at 224 px, scaled).")


def _table_class_cells(rows: pd.DataFrame, table_classes: list[int] | None) -> pd.DataFrame:
    """Keep the class-masking cells whose target and mask are both table classes (NeurIPS 2022 Table 1: the five
    VOC classes against each other). Cells of other true classes are stored too (the rows keep everything) but
    would mix classes with very different image counts into the contrast."""
    if not table_classes:
        return rows
    keep = {f"t{t}" for t in table_classes}
    masks = {f"m{m}" for m in table_classes} | {"none"}
    cm = rows["metric"].str.startswith("classmask/")
    parts = rows.loc[cm, "metric"].str.split("/", expand=True)
    ok = pd.Series(True, index=rows.index)
    ok[cm] = parts[1].isin(keep) & parts[2].isin(masks)
    return rows[ok]


def _leaderboard(computed: dict[str, pd.DataFrame]) -> pd.DataFrame:
    parts = [computed[t][(computed[t]["statistic"] == s) & (computed[t]["method"] != UNMASKED)].assign(label=label)
             for t, s, label in LEADERBOARD if t in computed]
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _pointing_per_class(rows: pd.DataFrame, metas: dict[str, dict], class_names: list[str] | None) -> pd.DataFrame:
    """Hits (expected hits for tied maxima), pairs and accuracy per method, class and subset (all / difficult)."""
    sub = rows[rows["metric"].str.match(r"^pointing/[cd]\d+$")].dropna(subset=["value"])
    parts = sub["metric"].str.split("/", expand=True)[1]
    sub = sub.assign(subset=np.where(parts.str.startswith("c"), "all", "difficult"),
                     class_id=parts.str.slice(1).astype(int))
    g = sub.groupby(["method", "subset", "class_id"])["value"]
    # a tied maximum scores its expected hit, so hits are not whole numbers
    out = pd.DataFrame({"hits": g.sum(), "pairs": g.count(), "accuracy": 100.0 * g.mean()}).reset_index()
    out["class"] = [class_names[i] if class_names and i < len(class_names) else str(i) for i in out["class_id"]]
    order = {m: i for i, m in enumerate(_method_order(metas))}
    out = out.sort_values(["method", "subset", "class_id"],
                          key=lambda c: c.map(order) if c.name == "method" else c)
    return out[["method", "subset", "class_id", "class", "hits", "pairs", "accuracy"]].reset_index(drop=True)


def write_all_tables(results_dir: Path, **options) -> list[Path]:
    """Rebuild the tables of every ``<dataset>/<model>`` run under a results directory."""
    written = []
    for per_image in sorted(Path(results_dir).glob("*/*/per_image")):
        written += write_tables(per_image.parent, **options)
    return written
