"""Tables: pure functions of the stored per-image rows (``per_image/*.csv`` and their sidecars).

``maskbench tables`` rebuilds every table from what is stored, without loading a data set or a model, and
writes the same bytes every time for the same rows (the bootstrap is seeded). This module is a generic renderer:
the tables themselves (statistics, captions, sources, headline statistics, further files) are declared by the
metrics that fill them (:class:`maskbench.metrics.TableSpec`, :func:`maskbench.metrics.table_specs`), so a
plugin metric gets its table here without any change to this file. For a run directory
``results/<dataset>/<model>/`` it writes

* per declared table, a long-format CSV (one row per method and statistic, with the 95% bootstrap interval,
  image counts, and best / not-significantly-different flags) and a LaTeX ``booktabs`` table (arrows for
  polarity, best in bold, methods not significantly different from the best underlined, ``± half-width`` of
  the interval), and the table's further files;
* ``compute_time``: wall time and images per second to produce the masks, training time apart (NeurIPS 2022,
  Table 3) (measured values, from the sidecars; no interval);
* ``diagnostics.csv``: per method, images scored, undefined values and the counts the metrics declare
  (constant maps, tied maxima, ...);
* ``leaderboard``: the headline statistic of each table side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from maskbench.core.render import csv_text, escape, plain_latex, statistics_latex
from maskbench.core.stats import LEVEL, RESAMPLES, SEED, statistics_table
from maskbench.core.storage import atomic_write, read_json
from maskbench.core.store import COMPLETE, RowStore, StoredDataError
from maskbench.methods.deviations import deviations
from maskbench.metrics import METRICS, MetricSpec, TableInputs, TableSpec, table_specs, value_range

from .leakage import rebuild_leakage
from .meta_evaluation import Headline, write_meta_tables
from .randomisation import rebuild_randomisation
from .reproduction import departures, write_reproduction
from .runs import read_run

FAMILY_ORDER = ["classifier", "reference", "gradient", "perturbation", "learned", "plugin", ""]
REFERENCE_ORDER = ["constant-0", "constant-0.5", "constant-1", "ground-truth", "centre-gaussian", "random-uniform"]


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
        rows = store.load(stem)
        keys = set(meta.get("metric_keys", {}).values()) or {meta.get("run_key")}  # one run key: older sidecars
        rows = rows[rows["run_key"].isin(keys)]
        if image_ids is not None:
            rows = rows[rows["image_id"].isin(set(image_ids))]
        if rows.empty:
            continue
        metas[m] = meta
        frames.append(rows.assign(method=m))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["method", "image_id", "metric"])
    return StoredRun(rows, metas, image_ids, excluded)


def _diagnostic_columns() -> list[tuple[str, str]]:
    """(column, stored cell) of every count a registered metric declares, in metric order."""
    out = []
    for name in METRICS.list():
        spec: MetricSpec = METRICS.get(name)
        out += list(spec.diagnostics)
    return out


def diagnostics(rows: pd.DataFrame, metas: dict[str, dict]) -> pd.DataFrame:
    """Per method: images scored, and the counts that are never turned into numbers silently."""
    counts = _diagnostic_columns()
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
            "images": int(r.loc[r["metric"] == COMPLETE, "image_id"].nunique()),  # a marker per (metric, image)
            **{col: int(sums.get(cell, 0)) for col, cell in counts},
            "undefined": ";".join(f"{k}={v}" for k, v in undefined.items() if v),
        })
    return pd.DataFrame.from_records(recs, columns=["method", "label", "family", "images",
                                                    *[col for col, _ in counts], "undefined"])


def _long(table: pd.DataFrame, name: str, metas: dict[str, dict]) -> pd.DataFrame:
    out = table.copy()
    out.insert(0, "table", name)
    out.insert(5, "method_label", [metas[m].get("label", m) for m in out["method"]])
    out.insert(6, "family", [metas[m].get("family", "") for m in out["method"]])
    out.insert(7, "preset", [metas[m].get("preset", "") for m in out["method"]])
    return out


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
    manifest_data = read_json(manifest) if manifest.is_file() else {}
    data_info = manifest_data.get("dataset", {})
    run_config = manifest_data.get("config", {})
    specs = table_specs()
    rows = rows[["method", "image_id", "metric", "value"]]
    for spec in specs:
        if spec.keep_rows is not None:
            rows = spec.keep_rows(rows, data_info)
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
    written: list[Path] = [atomic_write(run_dir / "diagnostics.csv", csv_text(diag))]

    ordered = {m: metas[m] for m in _method_order(metas)}
    all_rows, all_metas = rows, ordered
    for spec in specs:
        if spec.pseudo_rows is not None:
            all_rows, all_metas = spec.pseudo_rows(all_rows, all_metas)
    eligible = {m: all_metas[m].get("family") not in ("reference", "classifier") for m in all_metas}
    order = _method_order(all_metas)
    labels = {m: all_metas[m].get("label", m) for m in order}
    families = {m: all_metas[m].get("family", "") for m in order}
    inputs = TableInputs(rows, ordered, list(ordered), data_info, where, f"{dataset}-{model}", resamples, seed,
                         run_images, scored)
    computed: dict[str, pd.DataFrame] = {}
    stored_metrics = sorted(set(all_rows["metric"]))
    for spec in specs:
        needed = {c for s in spec.stats for c in s.select(stored_metrics)}
        if not needed:
            continue
        sub = all_rows[all_rows["metric"].isin(needed)]
        methods = [m for m in order if m in set(sub["method"])]
        table = statistics_table(sub, methods, list(spec.stats), eligible, resamples, seed, image_ids=run_images,
                                 scored=scored)
        computed[spec.name] = table
        extra = {h: {r.method: str(getattr(r, col)) for r in diag.itertuples()} for h, col in spec.extra.items()}
        note = spec.caption_note(data_info) if spec.caption_note is not None else ""
        after = f" After {spec.paper}." if spec.paper else ""
        na_note = ("--: not available (undefined on this run: e.g. no segmentation ground truth, or a ratio 0/0; "
                   "never 0). " if "value" in table and table["value"].isna().any() else "")
        caption = (f"{spec.caption}{note} Run: {where}.{after} {_deviation_note(methods, labels)}{ci_note}{mark_note}"
                   f"{na_note}")
        written.append(atomic_write(run_dir / f"{spec.name}.csv", csv_text(_long(table, spec.name, all_metas))))
        written.append(atomic_write(run_dir / f"{spec.name}.tex", statistics_latex(
            table, methods, labels, families, caption, f"tab:{spec.name}-{dataset}-{model}", ci=ci, extra=extra)))
        if spec.files is not None:
            written += [atomic_write(run_dir / name, text) for name, text in spec.files(inputs).items()]

    times = compute_time(metas)
    written.append(atomic_write(run_dir / "compute_time.csv", csv_text(times)))
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

    headlines = [spec for spec in specs if spec.headline is not None and spec.name in computed]
    board = _leaderboard(computed, headlines, all_metas)
    if not board.empty:
        written.append(atomic_write(run_dir / "leaderboard.csv", csv_text(_long(board, "leaderboard", all_metas))))
        methods = [m for m in order if m in set(board["method"])]
        rate = {r.method: ("--" if math.isnan(r.images_per_second) else f"{r.images_per_second:.1f}")
                for r in times.itertuples()}
        phrases = "; ".join(spec.headline[2] for spec in headlines)
        cap = (rf"Leaderboard ({where}): the headline statistic of each table ({phrases}) and images per second. "
               f"{_deviation_note(methods, labels)}{ci_note}{mark_note}")
        written.append(atomic_write(run_dir / "leaderboard.tex", statistics_latex(
            board, methods, labels, families, cap, f"tab:leaderboard-{dataset}-{model}", ci=ci,
            extra={"Images/s": rate})))
    if headlines:  # the headline statistics judged against each other, and every method against random
        heads = [Headline(spec.name, stat, spec.headline[1]) for spec in headlines for stat in spec.stats
                 if stat.name == spec.headline[0]]
        competing = [m for m in order if eligible.get(m, False) and m in set(all_rows["method"])]
        written += write_meta_tables(run_dir, all_rows, competing, heads, run_images, labels, where, resamples, seed)
    listed = [m for m in _method_order(metas) if deviations(m)]
    if listed:
        text = ["# Deviations from the published runs", "",
                "Where a method of this run deliberately differs from its published runs (the method's module "
                "docstring gives the reasons).", ""]
        for m in listed:
            text += [f"## {metas[m].get('label', m)} ({m})", ""] + [f"- {d}" for d in deviations(m)] + [""]
        written.append(atomic_write(run_dir / "deviations.md", "\n".join(text)))
    if run_config.get("model") and run_config.get("dataset"):  # the seed papers' values beside ours
        class_file = run_dir / "class_table.csv"
        classes = pd.read_csv(class_file) if class_file.is_file() and class_file in written else None
        written += write_reproduction(run_dir, f"{run_config['model']}-{run_config['dataset']}",
                                      run_config.get("preset", ""), computed, classes, departures(run_config))
    return written


def _deviation_note(methods: list[str], labels: dict[str, str]) -> str:
    """Caption text naming the rows that deliberately differ from their published runs (``deviations.md``)."""
    named = [escape(labels.get(m, m)) for m in methods if deviations(m)]
    return f"Deviating from their published runs (deviations.md): {', '.join(named)}. " if named else ""


def _leaderboard(computed: dict[str, pd.DataFrame], headlines: list[TableSpec],
                 metas: dict[str, dict]) -> pd.DataFrame:
    """The headline statistic of each table, pseudo-methods (family ``classifier``) left out."""
    pseudo = {m for m, meta in metas.items() if meta.get("family") == "classifier"}
    parts = []
    for spec in headlines:
        stat, label, _ = spec.headline
        table = computed[spec.name]
        parts.append(table[(table["statistic"] == stat) & ~table["method"].isin(pseudo)].assign(label=label))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def write_all_tables(results_dir: Path, **options) -> list[Path]:
    """Rebuild the tables of every ``<dataset>/<model>`` run under a results directory."""
    written = []
    for per_image in sorted(Path(results_dir).glob("*/*/per_image")):
        written += write_tables(per_image.parent, **options)
        boot = {k: options[k] for k in ("resamples", "seed") if k in options}
        written += rebuild_randomisation(per_image.parent, **boot) + rebuild_leakage(per_image.parent, **boot)
    return written
