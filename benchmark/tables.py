"""Tables: pure functions of the stored per-image rows (``per_image/*.csv`` and their sidecars).

``maskbench tables`` rebuilds every table from what is stored, without loading a data set or a model, and
writes the same bytes every time for the same rows. Each table is a CSV (machine-readable, full precision)
and a LaTeX ``booktabs`` table (arrows for the metric's polarity, best value in bold among the methods that
are not reference rows).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .storage import atomic_write, read_json
from .store import RowStore

FAMILY_ORDER = ["reference", "gradient", "perturbation", "learned", "plugin", ""]
REFERENCE_ORDER = ["constant-0", "constant-0.5", "constant-1", "ground-truth", "centre-gaussian", "random-uniform"]


def _method_order(metas: dict[str, dict]) -> list[str]:
    def key(m: str) -> tuple:
        fam = metas[m].get("family", "")
        fam_i = FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER)
        ref_i = REFERENCE_ORDER.index(m) if m in REFERENCE_ORDER else len(REFERENCE_ORDER)
        return (fam_i, ref_i, m)

    return sorted(metas, key=key)


def load_current_rows(run_dir: Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """All methods' rows computed under each method's current run key, and the method sidecars."""
    store = RowStore(run_dir)
    metas, frames = {}, []
    for m in store.methods():
        meta = store.load_meta(m)
        rows = store.load(m, run_key=meta.get("run_key"))
        if rows.empty:
            continue
        metas[m] = meta
        frames.append(rows.assign(method=m))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["method", "image_id", "metric"])
    return rows, metas


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation, number of scored images and of undefined (NaN) values per method and metric."""
    g = rows.groupby(["method", "metric"])["value"]
    out = pd.DataFrame(
        {"mean": g.mean(), "std": g.std(), "n": g.count(), "n_undefined": g.size() - g.count()}
    ).reset_index()
    return out


def metric_table(rows: pd.DataFrame, metas: dict[str, dict], metrics: list[str]) -> pd.DataFrame:
    """Wide table: one row per method (ordered), one column per metric mean, plus image counts."""
    summary = summarize(rows[rows["metric"].isin(metrics)])
    order = [m for m in _method_order(metas) if m in set(summary["method"])]
    means = summary.pivot(index="method", columns="metric", values="mean").reindex(order)
    n = summary.groupby("method")["n"].min().reindex(order)
    undefined = summary.groupby("method")["n_undefined"].max().reindex(order)
    out = pd.DataFrame(
        {
            "method": order,
            "label": [metas[m].get("label", m) for m in order],
            "family": [metas[m].get("family", "") for m in order],
            "preset": [metas[m].get("preset", "") for m in order],
            "images": n.astype(int).tolist(),
            "undefined": undefined.astype(int).tolist(),
        }
    )
    for metric in metrics:
        out[metric] = means[metric].tolist() if metric in means else [math.nan] * len(order)
    return out


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def to_latex(table: pd.DataFrame, metrics: list[str], labels: dict[str, str], higher: dict[str, bool],
             caption: str, label: str, digits: int = 2) -> str:
    """booktabs LaTeX: a rule between reference rows and methods, best non-reference value in bold."""
    methods_mask = table["family"] != "reference"
    best = {}
    for m in metrics:
        vals = table.loc[methods_mask, m].dropna()
        if len(vals):
            best[m] = round(vals.max() if higher[m] else vals.min(), digits)
    arrow = {True: r"$\uparrow$", False: r"$\downarrow$"}
    head = " & ".join(["Method"] + [f"{labels[m]} {arrow[higher[m]]}" for m in metrics])
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{caption}}}",
        f"\\label{{{label}}}",
        r"\begin{tabular}{l" + "r" * len(metrics) + "}",
        r"\toprule",
        head + r" \\",
        r"\midrule",
    ]
    prev_ref = None
    for _, row in table.iterrows():
        is_ref = row["family"] == "reference"
        if prev_ref is True and not is_ref:
            lines.append(r"\midrule")
        prev_ref = is_ref
        cells = [_latex_escape(str(row["label"]))]
        for m in metrics:
            v = row[m]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("--")
                continue
            text = f"{v:.{digits}f}"
            if not is_ref and m in best and round(v, digits) == best[m]:
                text = f"\\textbf{{{text}}}"
            cells.append(text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


SEGMENTATION_METRICS = ["acc", "iou", "sal", "mae"]


def class_table(rows: pd.DataFrame, metas: dict[str, dict], class_names: list[str] | None) -> pd.DataFrame:
    """Long table of NeurIPS 2022 Table 1: mean softmax probability (%) of target t under the mask of class m."""
    sub = rows[rows["metric"].str.startswith("classmask/")].copy()
    if sub.empty:
        return pd.DataFrame(columns=["method", "label", "target", "mask", "value", "images"])
    parts = sub["metric"].str.split("/", expand=True)
    sub["target"] = parts[1].str.slice(1).astype(int)
    sub["mask"] = parts[2]
    g = sub.groupby(["method", "target", "mask"])["value"]
    out = pd.DataFrame({"value": g.mean(), "images": g.count()}).reset_index()

    def name(i: int) -> str:
        return class_names[i] if class_names and i < len(class_names) else str(i)

    out["mask"] = [("none" if m == "none" else name(int(m[1:]))) for m in out["mask"]]
    out["target"] = [name(t) for t in out["target"]]
    order = {m: i for i, m in enumerate(_method_order(metas))}
    out["label"] = [metas[m].get("label", m) for m in out["method"]]
    out = out.sort_values(["method", "target", "mask"], key=lambda c: c.map(order) if c.name == "method" else c)
    return out[["method", "label", "target", "mask", "value", "images"]].reset_index(drop=True)


def class_contrast(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean diagonal cell, mean off-diagonal cell and their difference (the contrast)."""
    cells = table[table["mask"] != "none"]
    diag = cells[cells["target"] == cells["mask"]].groupby("method", sort=False)["value"].mean()
    off = cells[cells["target"] != cells["mask"]].groupby("method", sort=False)["value"].mean()
    labels = table.drop_duplicates("method").set_index("method")["label"]
    out = pd.DataFrame({"label": labels, "diagonal": diag, "off_diagonal": off})
    out["contrast"] = out["diagonal"] - out["off_diagonal"]
    return out.reset_index()


def write_tables(run_dir: Path) -> list[Path]:
    """(Re)write every table of a run directory from its stored rows. Returns the files written."""
    from maskbench.metrics import METRICS

    run_dir = Path(run_dir)
    rows, metas = load_current_rows(run_dir)
    if rows.empty:
        return []
    specs = {m: METRICS.get(m) for m in SEGMENTATION_METRICS}
    table = metric_table(rows, metas, SEGMENTATION_METRICS)
    csv = table.rename(columns={m: specs[m].label for m in SEGMENTATION_METRICS})
    dataset, model = run_dir.parent.name, run_dir.name
    presets = sorted({p for p, f in zip(table["preset"], table["family"], strict=True) if f != "reference" and p})
    caption = (
        f"Segmentation scores of the merged class masks on {_latex_escape(dataset)} "
        f"({_latex_escape(model)}; {int(table['images'].max())} images; preset {', '.join(presets) or '-'}). "
        r"Acc, IoU and MAE in \%, Sal as eq.~9 of Stalder et al.\ (2022). Rows above the rule are reference "
        r"masks; bold marks the best method."
    )
    tex = to_latex(
        table,
        SEGMENTATION_METRICS,
        {m: s.label for m, s in specs.items()},
        {m: s.higher_is_better for m, s in specs.items()},
        caption,
        f"tab:segmentation-{dataset}-{model}",
    )
    written = [
        atomic_write(run_dir / "segmentation.csv", csv.to_csv(index=False, float_format="%.4f", lineterminator="\n")),
        atomic_write(run_dir / "segmentation.tex", tex),
    ]
    manifest = run_dir / "manifest.json"
    names = read_json(manifest).get("dataset", {}).get("classes") if manifest.is_file() else None
    classes = class_table(rows, metas, names)
    if not classes.empty:
        contrast = class_contrast(classes)
        contrast["family"] = [metas[m].get("family", "") for m in contrast["method"]]
        written.append(atomic_write(run_dir / "class_table.csv",
                                    classes.to_csv(index=False, float_format="%.4f", lineterminator="\n")))
        written.append(atomic_write(run_dir / "class_contrast.csv", contrast.to_csv(
            index=False, float_format="%.4f", lineterminator="\n")))
        cap = (f"Class-specific masking on {_latex_escape(dataset)} ({_latex_escape(model)}), after Table 1 of "
               r"Stalder et al.\ (2022): softmax probability (\%) of a target class when the image is masked with "
               r"its own class mask (diagonal) or another class's mask (off-diagonal), thresholds 0.1--0.9; "
               r"contrast = diagonal $-$ off-diagonal. Full matrices in class\_table.csv.")
        written.append(atomic_write(run_dir / "class_contrast.tex", to_latex(
            contrast, ["diagonal", "off_diagonal", "contrast"],
            {"diagonal": "Diagonal", "off_diagonal": "Off-diagonal", "contrast": "Contrast"},
            {"diagonal": True, "off_diagonal": False, "contrast": True}, cap,
            f"tab:class-contrast-{dataset}-{model}")))
    return written


def write_all_tables(results_dir: Path) -> list[Path]:
    """Rebuild the tables of every ``<dataset>/<model>`` run under a results directory."""
    written = []
    for per_image in sorted(Path(results_dir).glob("*/*/per_image")):
        written += write_tables(per_image.parent)
    return written
