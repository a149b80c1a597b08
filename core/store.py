"""The result store: cached masks (outside git) and per-image metric rows (under ``results/``).

* :class:`MaskCache` keeps one compressed ``.npz`` per (method configuration, image): the explained classes
  and their masks as float16. Keyed by data set, classifier checkpoint hash and method cache key. Its
  ``timing.json`` says how long the cached masks took to compute, so re-scoring them with new metrics keeps the
  measured compute time.
* :class:`RowStore` keeps, per method, the long-format per-image rows ``image_id, metric, value`` in
  ``per_image/<method>.csv`` with a ``run_key`` column (the metric's key: method key + classifier + data, then
  the metric's name and version), and a sidecar ``per_image/<method>.json`` with what tables need to know about
  the method (label, family, preset, config, the current key of each metric, timings, counts). Rows whose key is
  not a current one are stale and recomputed.
* Beside them, per method and curve metric, ``per_image/<method>.<metric>.npz`` (:class:`CurveTable`): each
  image's curves (e.g. insertion, deletion) as float16 on a fixed x grid, with the metric's key per image, so
  figures draw mean curves and their bands without a model. An image's curves are done when stored under the
  current key; they are written before the rows, shard and merge across ranks the same way.

Every write is atomic (temporary file + rename), so an interrupted run loses at most the batch in flight.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import MaskbenchError
from .storage import atomic_write, read_json, write_json

ROW_COLUMNS = ["image_id", "metric", "value", "run_key"]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


class MaskCache:
    """Per-image mask files for one (data, classifier, method configuration)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.damaged: list[str] = []  # damaged files found (and removed) by get()

    def path(self, image_id: str) -> Path:
        return self.root / f"{_safe(image_id)}.npz"

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached classes and masks of an image; None when absent. A damaged file (unreadable, wrong
        arrays, values outside [0, 1]) is reported through :attr:`damaged`, removed and read as absent, so it
        costs one recomputation."""
        p = self.path(image_id)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                classes, masks = z["classes"], z["masks"]
            ok = (classes.ndim == 1 and masks.ndim == 3 and len(classes) == len(masks)
                  and np.issubdtype(classes.dtype, np.integer) and np.issubdtype(masks.dtype, np.floating)
                  and bool(np.isfinite(masks).all()) and float(masks.min(initial=0)) >= 0
                  and float(masks.max(initial=0)) <= 1)
            if not ok:
                raise ValueError("unexpected arrays or values outside [0, 1]")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            self.damaged.append(f"{p}: {type(exc).__name__}: {exc}")
            p.unlink(missing_ok=True)
            return None
        return classes, masks

    @property
    def timing_path(self) -> Path:
        return self.root / "timing.json"

    def load_timing(self) -> dict[str, Any]:
        """How long producing the cached masks took: ``explain_seconds`` over ``images`` (accumulated over
        sessions), ``warmup_seconds`` (excluded) and ``device``; empty when the masks were never timed (or the
        file is damaged, which is reported through :attr:`damaged`)."""
        if not self.timing_path.is_file():
            return {}
        try:
            timing = read_json(self.timing_path)
            if not isinstance(timing, dict):
                raise ValueError("not a JSON object")
            return timing
        except (OSError, ValueError) as exc:
            self.damaged.append(f"{self.timing_path}: {exc} (the compute time restarts from the masks made now)")
            return {}

    def save_timing(self, timing: dict[str, Any]) -> None:
        write_json(self.timing_path, timing)

    def rank_timing_path(self, rank: int) -> Path:
        return self.root / f"timing.rank{rank}.json"

    def rank_timing_files(self) -> list[Path]:
        return sorted(self.root.glob("timing.rank*.json")) if self.root.is_dir() else []

    def merge_rank_timings(self) -> dict[str, Any]:
        """Fold the per-rank compute times of a multi-process run (``timing.rank<r>.json``: seconds and images
        added by that rank) into ``timing.json``, delete them and return the total. Run by one process only."""
        timing = self.load_timing()
        files = self.rank_timing_files()
        if not files:
            return timing
        timing.setdefault("explain_seconds", 0.0)
        timing.setdefault("images", 0)
        devices = {timing["device"]} if timing.get("device") else set()
        for f in files:
            try:
                part = read_json(f)
                timing["explain_seconds"] = round(timing["explain_seconds"] + float(part["explain_seconds"]), 4)
                timing["images"] += int(part["images"])
                if part.get("device"):
                    devices.add(str(part["device"]))
                if "warmup_seconds" in part:
                    timing["warmup_seconds"] = max(float(part["warmup_seconds"]), timing.get("warmup_seconds", 0))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.damaged.append(f"{f}: {exc} (that rank's compute time is lost; its masks are kept)")
        if devices:
            timing["device"] = ",".join(sorted(devices))
        self.save_timing(timing)
        for f in files:
            f.unlink(missing_ok=True)
        return timing

    def put(self, image_id: str, classes: np.ndarray, masks: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, classes=classes.astype(np.int64), masks=masks.astype(np.float16))
        atomic_write(self.path(image_id), buf.getvalue())


COMPLETE = "_complete"  # per-image marker row; its value is the number of other rows the image has


class StoredDataError(MaskbenchError):
    """A stored file (rows, sidecar, cached mask) is damaged or was edited: the message names it."""


@dataclass
class RowCheck:
    """What validating a method's stored rows found: the good rows, and the problems with file and line."""

    rows: pd.DataFrame
    problems: list[str] = field(default_factory=list)


def validate_rows(df: pd.DataFrame, path: Path, valid_range: Callable[[str], tuple[float, float]] | None = None
                  ) -> RowCheck:
    """Check stored rows: numeric values, the metric's valid range, no duplicate (image, metric) pair, and each
    image's marker row counting its other rows (a deleted or added row breaks the count). Problems name the
    file and its line (the header is line 1). The returned rows are those of the images without a problem."""
    problems: list[str] = []
    bad: set[str] = set()
    line = df.index.to_numpy() + 2

    def flag(mask: np.ndarray, why: str) -> None:
        for i in np.flatnonzero(mask)[:20]:
            problems.append(f"{path}:{line[i]}: {why} ({df['image_id'].iloc[i]}, {df['metric'].iloc[i]}, "
                            f"{df['value_raw'].iloc[i]!r})")
        bad.update(df.loc[mask, "image_id"].astype(str))

    raw = df["value"]
    num = pd.to_numeric(raw, errors="coerce")
    df = df.assign(value_raw=raw, value=num.astype(float))
    text = num.isna().to_numpy() & raw.notna().to_numpy() & (raw.astype(str).str.strip().str.lower() != "nan")
    flag(text, "not a number")
    flag(df["image_id"].isna().to_numpy() | df["metric"].isna().to_numpy() | df["run_key"].isna().to_numpy(),
         "missing field")
    flag(np.isinf(df["value"].to_numpy()), "infinite value")
    marker = (df["metric"] == COMPLETE).to_numpy()
    if valid_range is not None:  # marker rows are checked by their count below
        metrics = df["metric"].astype(str)
        ranges = {m: valid_range(m) for m in metrics[~marker].unique()}
        lo = metrics.map(lambda m: ranges.get(m, (-math.inf, math.inf))[0]).to_numpy(dtype=float)
        hi = metrics.map(lambda m: ranges.get(m, (-math.inf, math.inf))[1]).to_numpy(dtype=float)
        v = df["value"].to_numpy()
        tol = 1e-4 * np.maximum(1.0, np.abs(np.where(np.isfinite(hi), hi, 0.0)))
        flag(~marker & ~np.isnan(v) & ((v < lo - tol) | (v > hi + tol)), "outside the metric's valid range")
    dup = df.duplicated(["run_key", "image_id", "metric"], keep=False).to_numpy()
    flag(dup, "duplicate row")
    counts = df[~marker].groupby(["run_key", "image_id"]).size().rename("found")
    markers = df[marker].join(counts, on=["run_key", "image_id"])
    found = markers["found"].fillna(0).to_numpy()
    wrong = ~(markers["value"].to_numpy() == found)  # a NaN marker is wrong too
    for i, n in zip(np.flatnonzero(marker)[wrong], found[wrong], strict=True):
        problems.append(f"{path}:{line[i]}: image {df['image_id'].iloc[i]} has {int(n)} rows, its marker "
                        f"says {df['value_raw'].iloc[i]} (rows deleted or added)")
    bad.update(markers.loc[wrong, "image_id"].astype(str))
    good = df[~df["image_id"].astype(str).isin(bad)].drop(columns="value_raw")
    return RowCheck(good.reset_index(drop=True), problems)


class RowStore:
    """Per-image metric rows and method sidecars under ``<results>/<dataset>/<run>/per_image``.

    ``valid_range(metric)`` (from the metric registry) bounds stored values; rows are validated on load, and
    so are stored curves (:meth:`load_curves`), against ``valid_range`` of their metric.
    """

    def __init__(self, run_dir: Path, valid_range: Callable[[str], tuple[float, float]] | None = None):
        self.dir = Path(run_dir) / "per_image"
        self.valid_range = valid_range

    def csv_path(self, method: str) -> Path:
        return self.dir / f"{_safe(method)}.csv"

    def meta_path(self, method: str) -> Path:
        return self.dir / f"{_safe(method)}.json"

    def _read(self, p: Path) -> tuple[RowCheck, bool]:
        """A rows file validated (see :func:`validate_rows`), and whether it could be read as rows at all (False:
        unreadable, or other columns; the check then holds that one problem and no rows)."""
        try:
            df = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""])
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
            problem = f"{p}: unreadable ({type(exc).__name__}: {exc})"
            return RowCheck(pd.DataFrame(columns=ROW_COLUMNS), [problem]), False
        if list(df.columns) != ROW_COLUMNS:
            return RowCheck(pd.DataFrame(columns=ROW_COLUMNS),
                            [f"{p}:1: columns {list(df.columns)}, expected {ROW_COLUMNS}"]), False
        return validate_rows(df, p, self.valid_range), True

    def check(self, method: str) -> RowCheck:
        """The method's stored rows, validated (see :func:`validate_rows`); an unreadable file is one problem."""
        p = self.csv_path(method)
        if not p.is_file():
            return RowCheck(pd.DataFrame(columns=ROW_COLUMNS))
        return self._read(p)[0]

    def load(self, method: str, run_key: str | None = None, *, strict: bool = True) -> pd.DataFrame:
        """Rows of a method (with ``run_key``: only those computed under that key), validated. ``strict``:
        a damaged file is an error naming it; otherwise its damaged images are left out (to be recomputed)."""
        found = self.check(method)
        if found.problems and strict:
            raise StoredDataError(
                f"Damaged stored rows of method '{method}': {'; '.join(found.problems[:3])}"
                f"{f' (and {len(found.problems) - 3} more)' if len(found.problems) > 3 else ''}. Run `maskbench "
                f"bench` with the run's options to recompute them (or delete {self.csv_path(method)})."
            )
        df = found.rows
        if run_key is not None:
            df = df[df["run_key"] == run_key]
        return df.reset_index(drop=True)

    @staticmethod
    def _write(path: Path, rows: pd.DataFrame) -> None:
        rows = rows[ROW_COLUMNS].astype({"value": float})
        atomic_write(path, rows.to_csv(index=False, float_format="%.6f", lineterminator="\n"))

    def save(self, method: str, rows: pd.DataFrame) -> None:
        self._write(self.csv_path(method), rows[ROW_COLUMNS].sort_values(["image_id", "metric"], kind="stable"))

    def shard_path(self, method: str, rank: int) -> Path:
        """Where rank ``rank`` of a multi-process run keeps its new rows of ``method`` until rank 0 merges them."""
        return self.dir / ".shards" / f"{_safe(method)}.rank{rank}.csv"

    def save_shard(self, method: str, rank: int, rows: pd.DataFrame) -> None:
        path = self.shard_path(method, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write(path, rows)

    def merge_shards(self, method: str, rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
        """``rows`` plus every rank's shard of ``method`` (validated like the main file; damaged images left out,
        to be recomputed), a later row replacing an earlier one of the same (run key, image, metric), and the
        shard files deleted after the caller saved (:meth:`drop_shards`). Returns the rows and the problems."""
        parts, problems = [rows], []
        for path in self.shards(method):
            found, readable = self._read(path)
            problems += found.problems
            if readable:
                parts.append(found.rows)
        if len(parts) == 1:
            return rows, problems
        merged = pd.concat([p[ROW_COLUMNS].astype({"value": float}) for p in parts], ignore_index=True)
        merged = merged.drop_duplicates(["run_key", "image_id", "metric"], keep="last")
        return merged.reset_index(drop=True), problems

    def shards(self, method: str) -> list[Path]:
        """The rank shards of ``method`` waiting to be merged (:meth:`shard_path`)."""
        return sorted((self.dir / ".shards").glob(f"{_safe(method)}.rank*.csv"))

    def drop_shards(self, method: str, curve_metrics: list[str] | tuple[str, ...] = ()) -> None:
        """Delete the rank shards of ``method``'s rows and of its curves of ``curve_metrics``."""
        for path in [*self.shards(method), *(p for m in curve_metrics for p in self.curve_shards(method, m))]:
            path.unlink(missing_ok=True)

    def load_meta(self, method: str, *, strict: bool = True) -> dict[str, Any]:
        """A method's sidecar; ``strict``: a damaged one is an error naming it, otherwise it reads as empty."""
        p = self.meta_path(method)
        if not p.is_file():
            return {}
        try:
            meta = read_json(p)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            return meta
        except (OSError, ValueError) as exc:
            if strict:
                raise StoredDataError(f"Damaged sidecar {p}: {exc}. Run `maskbench bench` with the run's options "
                                      f"to rewrite it (or delete it).") from None
            return {}

    def save_meta(self, method: str, meta: dict[str, Any]) -> None:
        write_json(self.meta_path(method), meta)

    def _curve_range(self, metric: str) -> tuple[float, float]:
        return self.valid_range(metric) if self.valid_range else (-math.inf, math.inf)

    def curves_path(self, method: str, metric: str) -> Path:
        return self.dir / f"{_safe(method)}.{_safe(metric)}.npz"

    def curve_shard_path(self, method: str, metric: str, rank: int) -> Path:
        return self.dir / ".shards" / f"{_safe(method)}.{_safe(metric)}.rank{rank}.npz"

    def load_curves(self, method: str, metric: str, run_key: str | None = None) -> tuple[CurveTable, list[str]]:
        """A method's stored curves of ``metric`` (with ``run_key``: only those computed under it) and the
        problems found (damaged images are left out, to be recomputed)."""
        table, problems = read_curves(self.curves_path(method, metric), self._curve_range(metric))
        return (table.with_key(run_key) if run_key is not None else table), problems

    def save_curves(self, method: str, metric: str, table: CurveTable) -> None:
        write_curves(self.curves_path(method, metric), table)

    def save_curve_shard(self, method: str, metric: str, rank: int, table: CurveTable) -> None:
        path = self.curve_shard_path(method, metric, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_curves(path, table)

    def curve_shards(self, method: str, metric: str) -> list[Path]:
        return sorted((self.dir / ".shards").glob(f"{_safe(method)}.{_safe(metric)}.rank*.npz"))

    def merge_curve_shards(self, method: str, metric: str, table: CurveTable) -> tuple[CurveTable, list[str]]:
        """``table`` plus every rank's shard of the method's ``metric`` curves (a later image replacing an earlier
        one), and the problems of damaged shards; the shards are deleted by :meth:`drop_shards`."""
        parts, problems = [table], []
        for path in self.curve_shards(method, metric):
            found, found_problems = read_curves(path, self._curve_range(metric))
            parts.append(found)
            problems += found_problems
        return CurveTable.concat(parts), problems

    def methods(self) -> list[str]:
        """File stems of the stored methods (a rows file or a sidecar is enough)."""
        return sorted({p.stem for p in self.dir.glob("*.json")} | {p.stem for p in self.dir.glob("*.csv")})


@dataclass
class CurveTable:
    """Per-image curves of one curve metric for one method: ``image_ids`` and ``run_keys`` (N,), and per curve
    name its x grid ``x[name]`` (S,) and values ``y[name]`` (N, S) (float16 when stored; NaN = undefined)."""

    image_ids: list[str] = field(default_factory=list)
    run_keys: list[str] = field(default_factory=list)
    x: dict[str, np.ndarray] = field(default_factory=dict)
    y: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def select(self, keep: np.ndarray | list[bool]) -> CurveTable:
        keep = np.asarray(keep, dtype=bool)
        return CurveTable([i for i, k in zip(self.image_ids, keep, strict=True) if k],
                          [r for r, k in zip(self.run_keys, keep, strict=True) if k],
                          dict(self.x), {n: v[keep] for n, v in self.y.items()})

    def with_key(self, run_key: str) -> CurveTable:
        return self.select([k == run_key for k in self.run_keys])

    def values(self, name: str, image_ids: list[str]) -> np.ndarray:
        """``y[name]`` as float64 rows in the order of ``image_ids`` (a row of NaN for an image not stored)."""
        pos = {iid: i for i, iid in enumerate(self.image_ids)}
        out = np.full((len(image_ids), len(self.x[name])), np.nan)
        for r, iid in enumerate(image_ids):
            if iid in pos:
                out[r] = self.y[name][pos[iid]]
        return out

    @staticmethod
    def concat(parts: list[CurveTable]) -> CurveTable:
        """The parts in order, a later image replacing an earlier one of the same id and key. Every non-empty
        part must hold the same curves on the same x grids (a changed grid changes the metric's key)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return CurveTable()
        first = parts[0]
        for p in parts[1:]:
            if set(p.y) != set(first.y) or any(not np.array_equal(p.x[n], first.x[n]) for n in first.x):
                raise StoredDataError(f"curve tables with different curves or x grids: {sorted(first.y)} and "
                                      f"{sorted(p.y)}")
        ids = [i for p in parts for i in p.image_ids]
        keys = [k for p in parts for k in p.run_keys]
        last = {(k, i): j for j, (i, k) in enumerate(zip(ids, keys, strict=True))}
        keep = sorted(last.values(), key=lambda j: (ids[j], keys[j]))
        ys = {n: np.concatenate([p.y[n] for p in parts])[keep] for n in first.y}
        return CurveTable([ids[j] for j in keep], [keys[j] for j in keep], dict(first.x), ys)


def write_curves(path: Path, table: CurveTable) -> None:
    """``table`` as a compressed ``.npz`` (values float16), atomically; the same table always gives the same
    bytes (fixed member dates, unlike ``np.savez_compressed``), so rewriting unchanged curves changes no file."""
    arrays = {"image_id": np.asarray(table.image_ids, dtype=str), "run_key": np.asarray(table.run_keys, dtype=str)}
    for n in sorted(table.y):
        arrays[f"x/{n}"] = np.asarray(table.x[n], dtype=np.float64)
        arrays[f"y/{n}"] = np.asarray(table.y[n], dtype=np.float16)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    atomic_write(path, buf.getvalue())


def read_curves(path: Path, valid_range: tuple[float, float] = (-math.inf, math.inf)) -> tuple[CurveTable, list[str]]:
    """A stored curve table and its problems: an unreadable file or inconsistent arrays is one problem and no
    curves; an image with a value outside ``valid_range`` (or infinite) is a problem and is left out."""
    if not path.is_file():
        return CurveTable(), []
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, keys = z["image_id"].astype(str).tolist(), z["run_key"].astype(str).tolist()
            names = [k[2:] for k in z.files if k.startswith("y/")]
            x = {n: z[f"x/{n}"].astype(np.float64) for n in names}
            y = {n: z[f"y/{n}"].astype(np.float32) for n in names}
        if len(keys) != len(ids) or any(v.shape != (len(ids), len(x[n])) for n, v in y.items()):
            raise ValueError("arrays of inconsistent shapes")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return CurveTable(), [f"{path}: unreadable ({type(exc).__name__}: {exc})"]
    table = CurveTable(ids, keys, x, y)
    lo, hi = valid_range
    bad = np.zeros(len(ids), dtype=bool)
    for v in y.values():
        with np.errstate(invalid="ignore"):
            bad |= (np.isinf(v) | (v < lo - 1e-3) | (v > hi + 1e-3)).any(1)
    problems = [f"{path}: image {ids[i]} has curve values outside [{lo}, {hi}]" for i in np.flatnonzero(bad)[:20]]
    return (table.select(~bad) if bad.any() else table), problems


def with_markers(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (without marker rows) plus one ``_complete`` row per (run key, image) whose value is the number of
    the image's other rows: the image was scored, and a deleted or added row can be detected."""
    rows = rows[rows["metric"] != COMPLETE]
    counts = rows.groupby(["run_key", "image_id"], sort=False).size()
    marker = pd.DataFrame.from_records(
        [(iid, COMPLETE, float(n), key) for (key, iid), n in counts.items()], columns=ROW_COLUMNS)
    return pd.concat([rows, marker], ignore_index=True)


def rows_from_values(image_ids: list[str], values: dict[str, list[float]], run_key: str) -> pd.DataFrame:
    """Long-format rows from {metric: [value per image]}."""
    recs = [
        (iid, metric, float(v) if v is not None else math.nan, run_key)
        for metric, vals in values.items()
        for iid, v in zip(image_ids, vals, strict=True)
    ]
    return pd.DataFrame.from_records(recs, columns=ROW_COLUMNS)
