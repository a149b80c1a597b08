"""The result store: cached masks (outside git) and per-image metric rows (under ``results/``).

* :class:`MaskCache` keeps one compressed ``.npz`` per (method configuration, image): the explained classes
  and their masks as float16. Keyed by data set, classifier checkpoint hash and method cache key. Its
  ``timing.json`` says how long the cached masks took to compute, so re-scoring them with new metrics keeps the
  measured compute time.
* :class:`RowStore` keeps, per method, the long-format per-image rows ``image_id, metric, value`` in
  ``per_image/<method>.csv`` with a ``run_key`` column (method key + classifier + data + metric versions), and a
  sidecar ``per_image/<method>.json`` with what tables need to know about the method (label, family, preset,
  config, timings, counts). Rows whose ``run_key`` differs from the current one are stale and recomputed.

Every write is atomic (temporary file + rename), so an interrupted run loses at most the batch in flight.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .storage import atomic_write, read_json, write_json

ROW_COLUMNS = ["image_id", "metric", "value", "run_key"]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


class MaskCache:
    """Per-image mask files for one (data, classifier, method configuration)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, image_id: str) -> Path:
        return self.root / f"{_safe(image_id)}.npz"

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        p = self.path(image_id)
        if not p.is_file():
            return None
        with np.load(p) as z:
            return z["classes"], z["masks"]

    @property
    def timing_path(self) -> Path:
        return self.root / "timing.json"

    def load_timing(self) -> dict[str, Any]:
        """How long producing the cached masks took: ``explain_seconds`` over ``images`` (accumulated over
        sessions), ``warmup_seconds`` (excluded) and ``device``; empty when the masks were never timed."""
        return read_json(self.timing_path) if self.timing_path.is_file() else {}

    def save_timing(self, timing: dict[str, Any]) -> None:
        write_json(self.timing_path, timing)

    def put(self, image_id: str, classes: np.ndarray, masks: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, classes=classes.astype(np.int64), masks=masks.astype(np.float16))
        atomic_write(self.path(image_id), buf.getvalue())


class RowStore:
    """Per-image metric rows and method sidecars under ``<results>/<dataset>/<model>/per_image``."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "per_image"

    def csv_path(self, method: str) -> Path:
        return self.dir / f"{_safe(method)}.csv"

    def meta_path(self, method: str) -> Path:
        return self.dir / f"{_safe(method)}.json"

    def load(self, method: str, run_key: str | None = None) -> pd.DataFrame:
        """Rows of a method; with ``run_key``, only the rows computed under that key."""
        p = self.csv_path(method)
        if not p.is_file():
            return pd.DataFrame(columns=ROW_COLUMNS)
        df = pd.read_csv(p, dtype={"image_id": str, "metric": str, "run_key": str})
        if run_key is not None:
            df = df[df["run_key"] == run_key]
        return df.reset_index(drop=True)

    def save(self, method: str, rows: pd.DataFrame) -> None:
        rows = rows[ROW_COLUMNS].sort_values(["image_id", "metric"], kind="stable")
        atomic_write(self.csv_path(method), rows.to_csv(index=False, float_format="%.6f", lineterminator="\n"))

    def load_meta(self, method: str) -> dict[str, Any]:
        p = self.meta_path(method)
        return read_json(p) if p.is_file() else {}

    def save_meta(self, method: str, meta: dict[str, Any]) -> None:
        write_json(self.meta_path(method), meta)

    def methods(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json"))


def rows_from_values(image_ids: list[str], values: dict[str, list[float]], run_key: str) -> pd.DataFrame:
    """Long-format rows from {metric: [value per image]}."""
    recs = [
        (iid, metric, float(v) if v is not None else math.nan, run_key)
        for metric, vals in values.items()
        for iid, v in zip(image_ids, vals, strict=True)
    ]
    return pd.DataFrame.from_records(recs, columns=ROW_COLUMNS)
