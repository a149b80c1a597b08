"""``maskbench verify``: recompute a stored run from an empty cache and compare every cell with the stored tables.

The run's configuration is read from its ``manifest.json``; it is run again with a fresh cache folder (data
regenerated or re-read, classifier shipped or retrained, every method explained and scored anew) into a
scratch results folder. Each statistic cell of the stored tables (value and 95% bootstrap interval) is then set
beside the recomputed value: ``within`` tells whether the new value lies in the stored interval, ``same`` whether
it is equal up to the CSV's rounding. Compute times are machine-bound and are compared as a ratio, not tested.

What to expect on the machine that produced the run: the same rows, up to nondeterministic floating-point
reductions (thread count, BLAS kernels); on another machine: a different classifier only if the data's content
fingerprint differs (another JPEG encoder), otherwise the same classifier and values within their intervals.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from maskbench.core.errors import MaskbenchError
from maskbench.core.storage import atomic_write, read_json
from maskbench.metrics import table_specs

from .config import RunConfig

ROUNDING = 5e-5  # the CSVs keep 4 decimals


def rerun_config(run_dir: Path, scratch: Path, **overrides: Any) -> RunConfig:
    """The stored run's configuration, pointed at a fresh cache and a scratch results folder."""
    manifest = Path(run_dir) / "manifest.json"
    if not manifest.is_file():
        raise MaskbenchError(f"No manifest.json in {run_dir}: not a maskbench run folder (see `maskbench tables`).")
    stored = read_json(manifest)["config"]
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = {k: v for k, v in stored.items() if k in fields}
    cfg.update(cache_dir=str(scratch / "cache"), results_dir=str(scratch / "results"), resume=True,
               run_name=Path(run_dir).name, overwrite=False, **overrides)
    return RunConfig(**cfg)


def compare_tables(stored_dir: Path, new_dir: Path) -> pd.DataFrame:
    """One row per statistic cell of the stored tables: stored value and interval, new value, verdicts."""
    recs = []
    for name in [spec.name for spec in table_specs()]:  # every declared table, plugin metrics' included
        a, b = Path(stored_dir) / f"{name}.csv", Path(new_dir) / f"{name}.csv"
        if not a.is_file():
            continue
        old = pd.read_csv(a)
        new = pd.read_csv(b) if b.is_file() else old.iloc[0:0]
        merged = old.merge(new[["statistic", "method", "value"]], on=["statistic", "method"], how="left",
                           suffixes=("", "_new"))
        for r in merged.itertuples():
            v, lo, hi, nv = r.value, r.ci_low, r.ci_high, r.value_new
            defined = not (math.isnan(v) or math.isnan(nv))
            recs.append({
                "table": name, "statistic": r.statistic, "method": r.method, "stored": v, "ci_low": lo,
                "ci_high": hi, "recomputed": nv, "difference": nv - v if defined else math.nan,
                "same": bool(defined and abs(nv - v) <= ROUNDING) or (math.isnan(v) and math.isnan(nv)),
                "within": bool(defined and lo - ROUNDING <= nv <= hi + ROUNDING) or (math.isnan(v) and math.isnan(nv)),
                "half_width": (hi - lo) / 2 if not math.isnan(lo) else math.nan,
            })
    return pd.DataFrame.from_records(recs, columns=["table", "statistic", "method", "stored", "ci_low", "ci_high",
                                                    "recomputed", "difference", "same", "within", "half_width"])


def compare_times(stored_dir: Path, new_dir: Path) -> pd.DataFrame:
    a, b = Path(stored_dir) / "compute_time.csv", Path(new_dir) / "compute_time.csv"
    if not (a.is_file() and b.is_file()):
        return pd.DataFrame()
    old, new = pd.read_csv(a), pd.read_csv(b)
    m = old[["method", "seconds"]].merge(new[["method", "seconds"]], on="method", suffixes=("_stored", "_new"))
    return m.assign(ratio=m["seconds_new"] / m["seconds_stored"])


def verify(run_dir: Path, scratch: Path | None = None, **overrides: Any) -> tuple[pd.DataFrame, Path]:
    """Recompute ``run_dir`` from an empty cache into ``scratch`` (default: a new temporary folder) and compare.

    Returns the cell comparison and the path of ``verify.csv`` written into the run folder.
    """
    from .runner import run

    run_dir = Path(run_dir)
    scratch = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="maskbench-verify-"))
    if (scratch / "cache").exists() and any((scratch / "cache").iterdir()):
        raise MaskbenchError(f"{scratch / 'cache'} is not empty: verify recomputes from an empty cache; choose a "
                             f"new --scratch folder.")
    result = run(rerun_config(run_dir, scratch, **overrides))
    table = compare_tables(run_dir, result.run_dir)
    out = atomic_write(run_dir / "verify.csv", table.to_csv(index=False, float_format="%.4f", lineterminator="\n"))
    times = compare_times(run_dir, result.run_dir)
    if not times.empty:
        atomic_write(run_dir / "verify_times.csv", times.to_csv(index=False, float_format="%.4f",
                                                                 lineterminator="\n"))
    return table, out


def summary(table: pd.DataFrame) -> str:
    """A few lines for the console: how many cells are the same, within their interval, outside."""
    n = len(table)
    same, within = int(table["same"].sum()), int(table["within"].sum())
    lines = [f"{n} cells: {same} identical (to the CSV's rounding), {within} within the stored 95% interval, "
             f"{n - within} outside."]
    worst = table.assign(excess=(table["difference"].abs() / table["half_width"].where(table["half_width"] > 0)))
    outside = worst[~worst["within"]].sort_values("excess", ascending=False)
    for r in outside.head(20).itertuples():
        lines.append(f"  outside: {r.table}/{r.statistic} {r.method}: stored {r.stored:.4f} "
                     f"[{r.ci_low:.4f}, {r.ci_high:.4f}], recomputed {r.recomputed:.4f}")
    if within == n:
        lines.append(f"largest difference: {table['difference'].abs().max():.4f} "
                     f"({(worst['excess'].max() if worst['excess'].notna().any() else 0):.2f} half-widths)")
    return "\n".join(lines)
