"""The runner: wires data set -> classifier -> methods -> masks (cached) -> metrics (per-image rows) -> tables.

Nothing else in maskbench knows about every component. Resuming: rows carry a key per (method run, metric): the
run key names the masks (method code and configuration, classifier, data), each metric's key adds the metric's
name and version. An (image, metric) pair whose rows exist under its current key (and pass validation,
:func:`~maskbench.core.store.validate_rows`) is not scored again, so adding or changing a metric scores that
metric alone, and a run without a plugin metric keeps its rows; an image all of whose metrics are stored is
skipped without loading anything; a pair whose masks are cached is scored from the cache; only the rest is
explained.
Failures (a method raising, NaN maps) are counted per method, listed in the manifest, and never turned into
numbers. The run writes to the folder of its identity (:mod:`maskbench.benchmark.runs`); the explained model is
checked after each method batch (:class:`~maskbench.benchmark.guard.ModelGuard`), and a method that changed it
fails and the model is restored before the next one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from maskbench.classifiers import get_classifier, imagenet_classifier
from maskbench.core.device import resolve_device, synchronize
from maskbench.core.errors import MaskbenchError, ModelChangedError, TrainingIncomplete, UnknownNameError
from maskbench.core.provenance import code_hash, git_revision, library_versions
from maskbench.core.registry import import_plugin
from maskbench.core.storage import cache_root, stable_hash, write_json
from maskbench.core.store import COMPLETE, CurveTable, MaskCache, RowStore, rows_from_values, with_markers
from maskbench.datasets import DATASETS, AttributionDataset, Batch, build_split, collate
from maskbench.datasets.digests import using_memo_dir
from maskbench.methods import METHODS, AttributionMethod, MethodContext, build_method, check_masks
from maskbench.metrics import Curves, MetricInputs, MetricSpec, select_metrics, value_range

from . import distributed as mdist
from .config import RunConfig
from .guard import ModelGuard
from .preflight import check_run_folders
from .runs import claim_run_dir, locate_run_dir, resolve_run_dir
from .tables import diagnostics, load_current_rows, write_tables
from .threads import apply_threads

SAVE_EVERY_SECONDS = float(os.environ.get("MASKBENCH_SAVE_EVERY", 20.0))  # between saves of a method's rows
MASK_DTYPE = torch.float16  # precision of the mask cache, and of every mask that is scored


@dataclass
class MethodSummary:
    method: str
    images: int = 0
    skipped: int = 0  # rows already stored under the same run key
    from_cache: int = 0  # masks read from the cache, scored now
    computed: int = 0  # masks computed now
    failed: int = 0
    nan_maps: int = 0
    constant_maps: int = 0
    seconds: float = 0.0
    explain_seconds: float = 0.0  # to compute the cached masks (all sessions; warm-up excluded)
    explain_seconds_per_image: float | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # repaired damage, changed code: said, not failures
    setup: dict[str, Any] = field(default_factory=dict)
    shares: list[dict[str, Any]] = field(default_factory=list)  # multi-process runs: each rank's share


@dataclass
class RunResult:
    run_dir: Path
    summaries: list[MethodSummary]
    manifest: dict[str, Any]
    tables: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.summaries)


def _class_indices(names: list[str] | str, classes: list[str]) -> list[int]:
    if names == "all":
        return list(range(len(classes)))
    out = []
    for n in names:
        if n not in classes:
            raise UnknownNameError("class", n, classes)
        out.append(classes.index(n))
    return out


def _classes_to_explain(labels: torch.Tensor, extra: list[int]) -> torch.Tensor:
    """(B, K) classes per image: its true classes and the table classes, padded by repeating the first."""
    rows = [sorted(set(torch.nonzero(lab > 0).flatten().tolist()) | set(extra)) for lab in labels]
    rows = [r or [0] for r in rows]
    k = max(len(r) for r in rows)
    return torch.tensor([r + [r[0]] * (k - len(r)) for r in rows], dtype=torch.long)


@dataclass
class _Session:
    """What every method of one run shares: data, classifier, stores and keys."""

    config: RunConfig
    datasets: Callable[[str], AttributionDataset]  # split -> data set
    test: AttributionDataset
    image_ids: list[str]
    extra_classes: list[int]
    model: torch.nn.Module
    device: torch.device
    cache: Path
    store: RowStore
    metric_specs: dict[str, MetricSpec]
    data_key: str
    clf_key: str
    classifier_info: dict[str, Any] = field(default_factory=dict)
    guard: ModelGuard | None = None  # the model as every method must leave it
    run_dir: Path = Path()  # the results folder of this run (see runs.resolve_run_dir)
    identity: dict[str, Any] = field(default_factory=dict)
    claimed: bool = False  # run.json written
    threads: dict[str, Any] = field(default_factory=dict)  # intra-op threads used, and why

    def method_context(self):
        return MethodContext(self.model, self.config.dataset, self.datasets, self.test.num_classes, self.device,
                             self.cache, self.config.seed, self.config.progress, self.clf_key,
                             tuple(self.test.mean), tuple(self.test.std))

    def load_batch(self, ids: list[str]):
        return collate([self.test.load(i) for i in ids]).to(self.device)


class _MethodRun:
    """One method over the run's images: resume from rows, reuse cached masks, explain the rest, score."""

    def __init__(self, session: _Session, method: AttributionMethod):
        self.s, self.method, self.name = session, method, stored_name(method, session.config.preset)
        self.rank, self.world = mdist.rank_world()
        self.summary = MethodSummary(self.name, images=len(session.image_ids))
        self.cache_key = method.cache_key()  # hashes the method's code: computed once
        # the masks' identity (method code and configuration, classifier, data), then one key per metric on them:
        # adding, removing or changing a metric scores that metric alone, and the other metrics' rows stay
        self.run_key = stable_hash({"method": self.cache_key, "classifier": session.clf_key,
                                    "data": session.data_key})
        self.metric_keys = {n: stable_hash({"masks": self.run_key, "metric": n, "version": spec.version})
                            for n, spec in session.metric_specs.items()}
        self.masks = method_masks(session, method, self.cache_key)
        self.curve_metrics = [n for n, spec in session.metric_specs.items() if spec.curves]
        if self.rank == 0 and (session.store.shards(self.name) or self.masks.rank_timing_files()
                               or any(session.store.curve_shards(self.name, n) for n in self.curve_metrics)):
            # what an interrupted multi-process run left: its ranks' rows, curves and compute times
            self._merge_ranks(session.store.check(self.name).rows)
        mdist.barrier(f"before {self.name}")
        found = session.store.check(self.name)  # validated: damaged images are recomputed, never "undefined"
        self.summary.warnings += [f"damaged row, recomputed: {p}" for p in found.problems[:10]]
        rows = found.rows
        previous = session.store.load_meta(self.name, strict=False)
        # rows of metrics not registered in this run (a plugin left out), on the same masks: kept as they are
        foreign = {n: k for n, k in previous.get("metric_keys", {}).items()
                   if n not in self.metric_keys and previous.get("run_key") == self.run_key}
        self.stored_keys = {**foreign, **self.metric_keys}
        current = rows[rows["run_key"].isin(set(self.stored_keys.values()))] if session.config.resume \
            else rows.iloc[0:0]
        # an (image, metric) pair is done when its rows were stored: each carries a COMPLETE marker row
        marks = current[current["metric"] == COMPLETE]
        done_pairs = set(zip(marks["run_key"], marks["image_id"], strict=True))
        # a curve metric's images are done when their curves are stored under its current key
        self.kept_curves: dict[str, CurveTable] = {}
        self.new_curves: dict[str, list[CurveTable]] = {n: [] for n in self.curve_metrics}
        for n in self.curve_metrics:
            table, problems = session.store.load_curves(self.name, n, self.metric_keys[n])
            self.summary.warnings += [f"damaged curves, recomputed: {p}" for p in problems[:10]]
            self.kept_curves[n] = table if session.config.resume else CurveTable()
            done_pairs |= {(self.metric_keys[n], iid) for iid in self.kept_curves[n].image_ids}
        self.todo_metrics = {iid: [n for n, k in self.metric_keys.items() if (k, iid) not in done_pairs]
                             for iid in session.image_ids}
        self.done = {iid for iid, names in self.todo_metrics.items() if not names}
        pairs = pd.Series(list(zip(current["run_key"], current["image_id"], strict=True)), index=current.index,
                          dtype=object)
        self.kept = current[pairs.isin(done_pairs)] if len(current) else current
        self.new_rows: list[pd.DataFrame] = []
        self.same_key_as_before = (previous.get("run_key") == self.run_key
                                   and previous.get("metric_keys") == self.stored_keys)
        code = code_hash(type(method))
        if previous.get("code_hash") not in (None, code):
            self.summary.warnings.append(f"code changed since the stored rows (code hash {previous['code_hash']} "
                                         f"-> {code}): recomputing its masks and rows")
        self.code_hash = code
        # compute time belongs to the cached masks: re-scoring them under new metrics keeps what they cost
        self.timing = self.masks.load_timing()
        self.timing.setdefault("explain_seconds", 0.0)
        self.timing.setdefault("images", 0)
        self.rank_timing = {"explain_seconds": 0.0, "images": 0}  # this process's part (multi-process runs)
        if self.same_key_as_before or previous.get("cache_key") == self.cache_key:
            self.summary.setup = dict(previous.get("setup", {}))  # a resumed run still reports its training
        self.is_setup = False
        self.warmed_up = False
        self.aborted = False  # the method broke the run's contract (changed the model, setup failed)

    def _merge_ranks(self, rows: pd.DataFrame, curves: dict[str, CurveTable] | None = None
                     ) -> tuple[pd.DataFrame, dict[str, CurveTable]]:
        """Rank 0: ``rows`` and ``curves`` (default: the stored ones) plus the other ranks' shards of this
        method, saved (the shards then deleted), and their compute times folded into the mask cache's; returns
        the merged rows and curves."""
        store = self.s.store
        merged, problems = store.merge_shards(self.name, rows)
        self.summary.warnings += [f"damaged row of a rank's shard, recomputed: {p}" for p in problems[:10]]
        if curves is None:
            curves = {n: store.load_curves(self.name, n)[0] for n in self.curve_metrics}
        merged_curves = {}
        for n in self.curve_metrics:
            merged_curves[n], problems = store.merge_curve_shards(self.name, n, curves[n])
            self.summary.warnings += [f"damaged curves of a rank's shard, recomputed: {p}" for p in problems[:10]]
        if merged is not rows or any(store.curve_shards(self.name, n) for n in self.curve_metrics):
            if not self.s.claimed:
                claim_run_dir(self.s.run_dir, self.s.identity, self.s.image_ids)
                self.s.claimed = True
            for n, table in merged_curves.items():
                store.save_curves(self.name, n, table)
            store.save(self.name, merged)
            store.drop_shards(self.name, self.curve_metrics)
        self.masks.merge_rank_timings()
        return merged, merged_curves

    def _save_timing(self) -> None:
        """The compute time of the cached masks: rank 0 keeps the total, another rank its own part."""
        if self.rank == 0:
            self.masks.save_timing(self.timing)
            return
        part = {**self.rank_timing, "device": str(self.s.device)}
        if "warmup_seconds" in self.timing:
            part["warmup_seconds"] = self.timing["warmup_seconds"]
        write_json(self.masks.rank_timing_path(self.rank), part)

    def save(self, final: bool = False) -> None:
        store = self.s.store
        if self.rank != 0:  # another rank keeps its rows and curves to itself until rank 0 merges them
            for n in self.curve_metrics:
                store.save_curve_shard(self.name, n, self.rank, CurveTable.concat(self.new_curves[n]))
            mine = pd.concat(self.new_rows, ignore_index=True) if self.new_rows else self.kept.iloc[0:0]
            store.save_shard(self.name, self.rank, mine)
            return
        rows = pd.concat([self.kept, *self.new_rows], ignore_index=True) if self.new_rows else self.kept
        curves = {n: CurveTable.concat([self.kept_curves[n], *self.new_curves[n]]) for n in self.curve_metrics}
        if final and self.world > 1:  # every rank has saved its shard (barrier in run())
            rows, curves = self._merge_ranks(rows, curves)
            self.timing = self.masks.load_timing()
        if not self.s.claimed:
            claim_run_dir(self.s.run_dir, self.s.identity, self.s.image_ids)
            self.s.claimed = True
        for n, table in curves.items():  # before the rows: stored curves count as done by themselves
            store.save_curves(self.name, n, table)
        store.save(self.name, rows)
        m = self.method
        self.s.store.save_meta(self.name, {
            "method": self.name, "label": self.label(), "family": m.family, "paper": m.paper,
            "preset": getattr(m, "preset", "paper"), "setting": getattr(m, "setting", None),
            "config": m.config(), "cache_key": self.cache_key,
            "run_key": self.run_key, "metric_keys": self.stored_keys,
            "classifier_sha256": self.s.clf_key, "data_key": self.s.data_key,
            "code_hash": self.code_hash, "registered_name": m.name, "origin": type(m).__module__,
            "timing": self.timing, "setup": self.summary.setup, "complete": final and self.summary.failed == 0,
        })

    def label(self) -> str:
        """Table label: the method's own, with its preset when it differs from the run's."""
        preset = getattr(self.method, "preset", "paper")
        return self.method.display_name() + (f" ({preset})" if self.name != self.method.name else "")

    def _setup(self) -> None:
        if not self.is_setup:
            self.summary.setup = self.method.setup(self.s.method_context()) or {}
            self.is_setup = True
            self._check_model("setup")

    def _check_model(self, when: str) -> None:
        """Fail the method if it changed the shared classifier; restore the classifier for the next one."""
        guard = self.s.guard
        if guard is None:
            return
        changes = guard.changes()
        if changes:
            guard.restore()
            raise ModelChangedError(
                f"method '{self.name}' changed the explained classifier during {when}: {'; '.join(changes)}. "
                f"Methods must leave the model frozen and in eval() (it was restored; the method's remaining "
                f"images are not scored)."
            )

    def _timed_explain(self, batch: Batch, classes: torch.Tensor, rows: list[int],
                       sub_batch: Batch | None = None) -> tuple[torch.Tensor, float]:
        """Masks of the batch rows ``rows`` and the seconds they took, the device synchronised on both ends."""
        idx = torch.tensor(rows, device=self.s.device)
        if self.method.uses_ground_truth and sub_batch is None:
            sub_batch = batch.select(rows)
        synchronize(self.s.device)
        t0 = time.perf_counter()
        out = self.method.explain(self.s.model, batch.images[idx], classes[idx],
                                  batch=sub_batch if self.method.uses_ground_truth else None)
        synchronize(self.s.device)
        return out, time.perf_counter() - t0

    def _explain_missing(self, ids: list[str], batch: Batch, classes: torch.Tensor, masks: torch.Tensor,
                         missing: list[int], ok: torch.Tensor) -> None:
        """Explain the images of ``missing`` (indices into the batch), cache their masks, mark failures."""
        self._setup()
        sub = torch.tensor(missing, device=self.s.device)
        sub_batch = batch if len(missing) == len(ids) else batch.select(missing)
        try:
            if not self.warmed_up:  # one image, untimed and discarded: lazy initialisation is not compute time
                _, warmup = self._timed_explain(batch, classes, missing[:1])
                self.timing["warmup_seconds"] = round(warmup, 4)
                self.warmed_up = True
            out, elapsed = self._timed_explain(batch, classes, missing, sub_batch)
            self._check_model("explain")
            nan = check_masks(out, batch.images[sub], classes[sub], self.name)
        except (ModelChangedError, TrainingIncomplete, KeyboardInterrupt) as exc:
            # the method cannot go on: nothing more of it is computed or stored in this run
            self.aborted = True
            self.summary.failed += len(missing)
            self.summary.errors.append(f"{type(exc).__name__}: {exc}")
            ok[missing] = False
            if isinstance(exc, KeyboardInterrupt):
                raise
            return
        except Exception as exc:  # counted and reported, never scored
            self.summary.failed += len(missing)
            self.summary.errors.append(f"{[ids[j] for j in missing][:3]}: {type(exc).__name__}: {exc}")
            ok[missing] = False
            return
        # scored as cached (float16): rows do not depend on whether a mask was computed now or read back
        out = out.detach().to(MASK_DTYPE).float()
        out_cpu, classes_cpu = out.cpu().numpy(), classes.cpu().numpy()
        for local, j in enumerate(missing):
            if bool(nan[local]):
                self.summary.nan_maps += 1
                self.summary.failed += 1
                self.summary.errors.append(f"{ids[j]}: NaN in the maps")
                ok[j] = False
                continue
            masks[j] = out[local]
            self.masks.put(ids[j], classes_cpu[j], out_cpu[local])
            self.summary.computed += 1
        self.timing["explain_seconds"] = round(self.timing["explain_seconds"] + elapsed, 4)
        self.timing["images"] += len(missing)
        self.timing["device"] = str(self.s.device)
        self.rank_timing["explain_seconds"] = round(self.rank_timing["explain_seconds"] + elapsed, 4)
        self.rank_timing["images"] += len(missing)
        self._save_timing()

    def _score(self, ids: list[str], batch: Batch, classes: torch.Tensor, masks: torch.Tensor,
               ok: torch.Tensor) -> None:
        flat = masks.flatten(2)
        constant = (flat.amax(2) - flat.amin(2)) <= 1e-6
        self.summary.constant_maps += int(constant[ok.to(self.s.device)].sum())
        keep = torch.nonzero(ok).flatten().tolist()
        if not keep:
            return
        kb = batch if len(keep) == len(ids) else batch.select(keep)
        kt = torch.tensor(keep, device=self.s.device)
        inputs = MetricInputs(self.s.model, kb.images, masks[kt], classes[kt], kb)
        kept_ids = [ids[j] for j in keep]
        wanted = {n for iid in kept_ids for n in self.todo_metrics[iid]}
        parts = []
        for n, spec in self.s.metric_specs.items():
            if n not in wanted:  # stored for every image of the batch already
                continue
            result = spec.fn(inputs)
            todo = [iid for iid in kept_ids if n in self.todo_metrics[iid]]
            if spec.curves:
                if not isinstance(result, Curves):
                    raise MaskbenchError(f"metric '{n}' is registered with curves=True but returned "
                                         f"{type(result).__name__}, not maskbench.metrics.Curves")
                wanted_ids = set(todo)
                table = CurveTable(kept_ids, [self.metric_keys[n]] * len(kept_ids),
                                   {c: x.double().cpu().numpy() for c, x in result.x.items()},
                                   {c: y.float().cpu().numpy() for c, y in result.y.items()})
                self.new_curves[n].append(table.select([iid in wanted_ids for iid in kept_ids]))
                continue
            if isinstance(result, dict):  # a table of values per image, e.g. classmask/t<target>/m<mask>
                values = {f"{n}/{key}": v.float().cpu().tolist() for key, v in result.items()}
            else:
                values = {n: result.float().cpu().tolist()}
            metric_rows = rows_from_values(kept_ids, values, self.metric_keys[n])
            parts.append(metric_rows[metric_rows["image_id"].isin(todo)])
        if not parts:  # only curves (or nothing) were wanted: no rows
            return
        rows = pd.concat(parts, ignore_index=True)
        # cells of a per-image table that do not apply to an image (NaN) are left out; scalar NaN are kept
        rows = rows[~(rows["metric"].str.contains("/") & rows["value"].isna())]
        self.new_rows.append(with_markers(rows))  # a marker row per (metric, image) counts its other rows

    def run(self) -> MethodSummary:
        s, t_method = self.s, time.perf_counter()
        todo = [iid for iid in s.image_ids if iid not in self.done]
        self.summary.skipped = len(s.image_ids) - len(todo)
        bs = s.config.batch_size
        batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]  # as one process cuts them (exact results)
        mine = [batches[b] for b in mdist.my_batches(len(batches), self.rank, self.world)]
        if self.world > 1 and mdist.any_rank(any(not self.masks.path(i).is_file() for ids in mine for i in ids),
                                             f"{self.name}: setup"):
            self._setup()  # every rank joins a learned method's (data-parallel) training, as `train` does
        last_save = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"{self.name:>16}", disable=not s.config.progress or self.rank != 0,
                   unit="img", leave=False)
        progress = mdist.RankProgress(s.run_dir / ".progress", self.name, self.rank, self.world, bar)
        done = 0
        for k, ids in enumerate(mine):
            batch = s.load_batch(ids)
            classes = _classes_to_explain(batch.labels.cpu(), s.extra_classes).to(s.device)
            masks = torch.empty(len(ids), classes.shape[1], *batch.images.shape[-2:], device=s.device)
            missing = []
            for j, iid in enumerate(ids):
                hit = self.masks.get(iid)
                want = classes[j].tolist()
                if hit is not None and set(want) <= set(hit[0].tolist()):
                    pos = {c: p for p, c in enumerate(hit[0].tolist())}
                    masks[j] = torch.from_numpy(hit[1][[pos[c] for c in want]].astype(np.float32)).to(s.device)
                    self.summary.from_cache += 1
                else:
                    missing.append(j)
            ok = torch.ones(len(ids), dtype=torch.bool)
            if missing:
                self._explain_missing(ids, batch, classes, masks, missing, ok)
            self._score(ids, batch, classes, masks, ok)
            done += len(ids)
            if self.world == 1:
                bar.update(len(ids))
            progress.update(done)
            if self.aborted:
                self.summary.failed += sum(len(b) for b in mine[k + 1 :])
                break
            if time.perf_counter() - last_save > SAVE_EVERY_SECONDS:
                self.save()
                last_save = time.perf_counter()
        self.summary.warnings += [f"damaged cache file, recomputed: {d}" for d in self.masks.damaged]
        if self.world > 1:
            self.save()  # this rank's rows (rank 0: its own so far), then rank 0 merges every rank's
            mdist.barrier(f"{self.name}: end")
            progress.close()
            self._gather_summaries(time.perf_counter() - t_method, len(mine), done)
        else:
            progress.close()
        bar.close()
        if self.rank == 0 and (todo or not s.store.csv_path(self.name).is_file() or not self.same_key_as_before):
            self.save(final=True)
        self.summary.explain_seconds = self.timing["explain_seconds"]
        if self.timing["images"]:
            self.summary.explain_seconds_per_image = round(self.timing["explain_seconds"] / self.timing["images"], 6)
        self.summary.seconds = round(time.perf_counter() - t_method, 3)
        return self.summary

    def _gather_summaries(self, seconds: float, batches: int, images: int) -> None:
        """Every rank's counts summed into rank 0's summary, with each rank's share (a collective)."""
        own = vars(self.summary) | {"share": {"rank": self.rank, "device": str(self.s.device), "batches": batches,
                                              "images": images, "seconds": round(seconds, 3)}}
        parts = mdist.gather(own, f"{self.name}: summaries")
        total = self.summary
        for name in ("from_cache", "computed", "failed", "nan_maps", "constant_maps"):
            setattr(total, name, sum(p[name] for p in parts))
        total.errors = [e for p in parts for e in p["errors"]]
        total.warnings = list(dict.fromkeys(w for p in parts for w in p["warnings"]))
        total.shares = [p["share"] for p in parts]


def method_masks(session: _Session, method: AttributionMethod, cache_key: str | None = None) -> MaskCache:
    """The cache of ``method``'s masks on the session's data and classifier (``cache_key``: the method's, when
    already computed)."""
    key = cache_key or method.cache_key()
    return MaskCache(session.cache / "masks" / session.data_key / session.clf_key
                     / f"{stored_name(method, session.config.preset)}-{key}")


def stored_name(method: AttributionMethod, run_preset: str) -> str:
    """The name a method's rows are stored and tabled under: its registered name, plus ``.preset`` when it
    runs at another preset than the run's (``rise.paper`` beside ``rise`` in a ``fast`` run)."""
    preset = getattr(method, "preset", run_preset)
    return method.name if preset == run_preset else f"{method.name}.{preset}"


def method_overrides(specs: list[str], params: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``--param`` overrides of each method spec. ``rise.num_masks`` applies to RISE only; a plain ``key``
    applies to every method of the run that has that hyperparameter, and is an error when none has it."""


    def registered(spec: str) -> str:
        return spec if spec in METHODS or "." not in spec else spec.rpartition(".")[0]

    names = [registered(s) for s in specs]
    has = {n: {f.name for f in fields(METHODS.get(n))} for n in names}
    scoped: dict[str, dict[str, Any]] = {}
    plain: dict[str, Any] = {}
    for key, value in params.items():
        method, dot, field_name = key.rpartition(".")
        if dot and method not in names:
            raise UnknownNameError(f"method of --param {key}", method, names)
        if dot:
            scoped.setdefault(method, {})[field_name] = value
        else:
            if not any(key in fields_of for fields_of in has.values()):
                raise MaskbenchError(f"--param {key}={value!r}: no method of this run has a hyperparameter '{key}' "
                                     f"(methods: {', '.join(names)}); scope it as METHOD.{key}.")
            plain[key] = value
    return [{**{k: v for k, v in plain.items() if k in has[n]}, **scoped.get(n, {})} for n in names]


def build_methods(config: RunConfig) -> list[AttributionMethod]:
    """Import the plugins, then build every requested method (fails fast on a bad name, preset or parameter)."""
    for plugin in config.plugins:
        import_plugin(plugin)
    select_metrics(config.dataset, config.extra_metrics)  # a bad --extra-metrics name fails before any work

    overrides = method_overrides(config.methods, config.method_params)
    setting = f"{config.model}-{config.dataset}"  # a published setting's values at the paper preset
    return [build_method(spec, preset=config.preset, setting=setting, **over)
            for spec, over in zip(config.methods, overrides, strict=True)]


def prepare(config: RunConfig) -> _Session:
    """Import plugins, build the data set's splits and the frozen classifier (trained and cached if needed).

    Under ``torch.distributed`` rank 0 prepares first (generating data, training the classifier) while the other
    ranks wait, then they load what it cached.
    """
    threads = apply_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    cache = Path(config.cache_dir) if config.cache_dir else cache_root()
    check_run_folders(Path(config.results_dir), cache)  # writable, with room, before any work
    rank, world = mdist.rank_world()
    if rank != 0:  # rank 0 generates the data and trains the classifier first; the others then load them
        mdist.barrier("waiting for rank 0 to prepare the data and the classifier")

    data_meta = DATASETS.meta(config.dataset)

    def datasets(split: str) -> AttributionDataset:
        return build_split(config.dataset, split, root=config.data_root, image_size=config.image_size)

    test = datasets(config.split)
    image_ids = test.image_ids[: config.limit] if config.limit else list(test.image_ids)
    extra = _class_indices(config.resolved_table_classes(), test.classes)
    if data_meta.get("classifier") == "imagenet" and config.checkpoint is None:
        # torchvision's own, no training
        model, clf_info = imagenet_classifier(config.model, device, config.classifier_params, config.seed)
    else:
        train_key = datasets("train").fingerprint() if config.checkpoint is None else "external"
        model, clf_info = get_classifier(
            config.model, datasets, train_key, test.num_classes, device, cache, config.checkpoint,
            config.progress, train_new=config.train_classifier, params=config.classifier_params,
            dataset=config.dataset,
        )
    data_key, clf_sha = test.fingerprint(), clf_info["checkpoint_sha256"]
    identity = run_identity(config, data_key, image_ids, extra, clf_sha,
                            list(test.load(image_ids[0]).image.shape[-2:]) if image_ids else None)
    if rank == 0:
        run_dir = resolve_run_dir(config.run_dir(clf_sha), identity, image_ids, named=config.run_name is not None,
                                  overwrite=config.overwrite)
    if rank == 0:
        mdist.barrier("waiting for rank 0 to prepare the data and the classifier")
    if rank != 0:  # the folder rank 0 chose
        run_dir = locate_run_dir(config.run_dir(clf_sha), identity)
    session = _Session(
        config, datasets, test, image_ids, extra, model, device, cache, RowStore(run_dir, value_range),
        select_metrics(config.dataset, config.extra_metrics), data_key, clf_sha,
    )
    session.run_dir = run_dir
    session.identity = identity
    session.classifier_info = clf_info
    session.guard = ModelGuard(model)
    session.threads = threads
    return session


def run_identity(config: RunConfig, data_key: str, image_ids: list[str], table_classes: list[int],
                 classifier_sha256: str, image_size: list[int] | None) -> dict[str, Any]:
    """What every number of a run is conditional on (see :mod:`maskbench.benchmark.runs`)."""
    identity = {
        "dataset": config.dataset, "split": config.split, "data_key": data_key, "images": len(image_ids),
        "image_ids_sha": stable_hash(image_ids), "image_size": image_size, "classifier": config.model,
        "classifier_sha256": classifier_sha256, "preset": config.preset, "table_classes": table_classes,
        "method_params": config.method_params, "seed": config.seed,
        **({"classifier_params": config.classifier_params} if config.classifier_params else {}),
    }
    return json.loads(json.dumps(identity, sort_keys=True, default=str))  # as read back from run.json


@using_memo_dir()
def train(config: RunConfig) -> list[dict[str, Any]]:
    """Train (or load from the cache) every learned method of ``config.methods``; returns their setup records."""
    methods = build_methods(config)
    not_learned = [m.name for m in methods if m.family != "learned"]
    if not_learned:

        learned = [n for n in METHODS.list() if METHODS.get(n).family == "learned"]
        raise MaskbenchError(f"Not learned methods, nothing to train: {', '.join(not_learned)}. "
                             f"Learned methods: {', '.join(learned) or '(none registered)'}.")
    session = prepare(config)
    return [{"method": m.name, **(m.setup(session.method_context()) or {})} for m in methods]


@using_memo_dir()
def run(config: RunConfig) -> RunResult:
    """Run a benchmark configuration end to end; returns the per-method summaries and the manifest."""
    t_run = time.perf_counter()
    methods = build_methods(config)
    session = prepare(config)
    device, test, image_ids, data_key = session.device, session.test, session.image_ids, session.data_key
    clf_info = session.classifier_info
    summaries = [_MethodRun(session, method).run() for method in methods]
    rank, world = mdist.rank_world()
    ranks = mdist.gather({"rank": rank, "device": str(device), "host": platform.node(), "threads": session.threads},
                         "run: ranks")
    run_dir = session.run_dir
    if rank != 0:  # rank 0 writes the manifest and the tables
        return RunResult(run_dir, summaries, {"rank": rank, "world_size": world})
    shutil.rmtree(run_dir / ".progress", ignore_errors=True)  # every rank is past its last progress file
    shards = run_dir / "per_image" / ".shards"
    if shards.is_dir() and not any(shards.iterdir()):
        shards.rmdir()
    clf_public = {k: v for k, v in clf_info.items() if k != "history"}
    manifest = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "git": git_revision(),
        "versions": library_versions(),
        "device": str(device),
        "threads": session.threads,
        "distributed": {"world_size": world, "ranks": ranks,
                        "split": "batches of --batch-size dealt to the ranks in snake order (each method's share "
                                 "is under methods[].shares)"},
        "dataset": {
            "name": config.dataset,
            "split": config.split,
            "images": len(image_ids),
            "image_size": session.identity["image_size"],
            "table_classes": session.extra_classes,  # class indices of the class-specific masking table
            "fingerprint": data_key,
            "classes": test.classes,
            "repr": repr(test),
        },
        "classifier": clf_public,
        "run": session.identity,
        "metrics": {n: {"higher_is_better": s.higher_is_better, "table": s.table, "label": s.label,
                        "version": s.version} for n, s in session.metric_specs.items()},
        "methods": [vars(s) for s in summaries],
        "wall_seconds": round(time.perf_counter() - t_run, 2),
    }

    loaded = load_current_rows(run_dir)  # read once: the manifest's counts, then every table
    manifest["counts"] = (diagnostics(loaded.rows, loaded.metas).to_dict(orient="records")
                          if not loaded.rows.empty else [])
    manifest["excluded_from_tables"] = loaded.excluded
    write_json(run_dir / "manifest.json", manifest)
    return RunResult(run_dir, summaries, manifest, write_tables(run_dir, loaded=loaded))
