"""Published numbers beside ours: the seed papers' tables, shipped as data, compared cell by cell with a run.

``benchmark/published/*.csv`` hold the published values with their source (columns ``source, paper_table,
table, setting, method, statistic, value``): Stalder et al. (NeurIPS 2022) Table 1 (class-specific masking,
VGG-16 on VOC-2007), Table 2 (Acc, IoU, Sal, MAE of the four settings) and Table 4 (the classifier's precision,
recall and F-score on clean and Explainer-masked images); the distribution-guided paper's Tables 1-3 (M_F,
M_I and the pointing game of ResNet-50 on ImageNet; its "MGnet" is Dabkowski & Gal's objective on the DGMP
mask generator, not our ``rtis``, so it is kept under its own name and shows as not run); TorchRay's
pointing-game table (``docs/pointing.csv``, all and difficult, its own VOC/COCO classifiers, not ours: a
comparison of methods' rankings more than of values; its centre-point baseline is our ``centre-gaussian``,
whose maximum is the centre). All transcribed from the papers' text. ``setting`` is
``<classifier>-<data set>``, ``method`` our registered name, ``statistic`` the statistic of our table (for the
class table ``<target>/<mask>``).

When a run's setting has published values, :func:`write_reproduction` writes ``reproduction.csv`` and
``reproduction.md``: per published cell, the published value, ours, our 95% bootstrap interval, the difference
and whether the published value lies inside our interval (a method the run did not compute is listed as not
run). The report names the run's preset: only a ``paper`` run is the published setting.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from maskbench.core.render import csv_text
from maskbench.core.storage import atomic_write

PUBLISHED_DIR = Path(__file__).with_name("published")
COLUMNS = ["source", "paper_table", "table", "statistic", "method", "published", "measured", "ci_low", "ci_high",
           "difference", "inside"]


def published(setting: str) -> pd.DataFrame:
    """Every published value of ``setting`` (e.g. ``vgg16-voc``), from all shipped sources."""
    frames = [pd.read_csv(p) for p in sorted(PUBLISHED_DIR.glob("*.csv"))]
    if not frames:
        return pd.DataFrame(columns=["source", "paper_table", "table", "setting", "method", "statistic", "value"])
    rows = pd.concat(frames, ignore_index=True)
    return rows[rows["setting"] == setting].reset_index(drop=True)


def _ours(computed: dict[str, pd.DataFrame], class_table: pd.DataFrame | None) -> dict[tuple, tuple]:
    """(table, statistic, method) -> (value, ci_low, ci_high) of the run's tables."""
    out = {}
    for name, table in computed.items():
        for r in table.itertuples():
            out[(name, r.statistic, r.method)] = (r.value, r.ci_low, r.ci_high)
    if class_table is not None:
        for r in class_table.itertuples():
            out[("class_table", f"{r.target}/{r.mask}", r.method)] = (r.value, r.ci_low, r.ci_high)
    return out


def reproduction(setting: str, computed: dict[str, pd.DataFrame], class_table: pd.DataFrame | None
                 ) -> pd.DataFrame:
    """The published cells of ``setting`` beside the run's values (empty when nothing is published for it)."""
    pub = published(setting)
    ours = _ours(computed, class_table)
    recs = []
    for r in pub.itertuples():
        value, lo, hi = ours.get((r.table, r.statistic, r.method), (math.nan, math.nan, math.nan))
        inside = bool(lo <= r.value <= hi) if not (math.isnan(lo) or math.isnan(hi)) else None
        recs.append({"source": r.source, "paper_table": r.paper_table, "table": r.table, "statistic": r.statistic,
                     "method": r.method, "published": r.value, "measured": value, "ci_low": lo, "ci_high": hi,
                     "difference": value - r.value, "inside": inside})
    return pd.DataFrame.from_records(recs, columns=COLUMNS)


def departures(run_config: dict) -> list[str]:
    """What in a run's configuration (its manifest ``config``) departs from the published runs, beyond the
    preset: a subset of the images, another image size or split, hyperparameter or classifier overrides."""
    out = []
    if run_config.get("limit"):
        out.append(f"only {run_config['limit']} image(s) (--limit)")
    if run_config.get("image_size") not in (None, 224):
        out.append(f"images at {run_config['image_size']} px (the papers: 224)")
    if run_config.get("split", "test") != "test":
        out.append(f"split {run_config['split']}")
    if run_config.get("method_params"):
        out.append("method overrides " + ", ".join(f"{k}={v}" for k, v in run_config["method_params"].items()))
    if run_config.get("classifier_params"):
        out.append("classifier overrides " + ", ".join(f"{k}={v}" for k, v in run_config["classifier_params"].items()))
    return out


def _markdown(table: pd.DataFrame, setting: str, preset: str, differs: list[str] | None = None) -> str:
    run = f"preset `{preset}`" + ("" if preset == "paper" else " (the published runs are the `paper` preset: the "
                                                               "values below are not a reproduction)")
    done = table.dropna(subset=["measured"])
    lines = [f"# Published values beside ours: {setting}", "",
             f"Run: {setting}, {run}. {len(done)} of {len(table)} published cells computed; "
             f"{int(done['inside'].eq(True).sum())} of them inside our 95% bootstrap interval.", ""]
    if differs:
        lines += ["**Not the published run**, so the values below are no reproduction: " + "; ".join(differs) + ".",
                  ""]
    for (source, paper_table), sub in table.groupby(["source", "paper_table"], sort=False):
        lines += [f"## {source}, {paper_table}", "",
                  "| method | statistic | published | ours | 95% CI | difference | inside |",
                  "|---|---|---:|---:|---|---:|---|"]
        for r in sub.itertuples():
            if math.isnan(r.measured):
                lines.append(f"| {r.method} | {r.statistic} | {r.published:.2f} | not run | | | |")
                continue
            ci = "" if math.isnan(r.ci_low) else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
            inside = {True: "yes", False: "no", None: ""}[r.inside]
            lines.append(f"| {r.method} | {r.statistic} | {r.published:.2f} | {r.measured:.2f} | {ci} | "
                         f"{r.difference:+.2f} | {inside} |")
        lines.append("")
    return "\n".join(lines)


def write_reproduction(run_dir: Path, setting: str, preset: str, computed: dict[str, pd.DataFrame],
                       class_table: pd.DataFrame | None, differs: list[str] | None = None) -> list[Path]:
    """``reproduction.csv`` / ``.md`` when ``setting`` has published values; nothing otherwise. ``differs``: what
    the run changes from the published one (:func:`departures`), said at the top of the report."""
    table = reproduction(setting, computed, class_table)
    if table.empty:
        return []
    return [atomic_write(run_dir / "reproduction.csv", csv_text(table)),
            atomic_write(run_dir / "reproduction.md", _markdown(table, setting, preset, differs))]
