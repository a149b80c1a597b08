"""The runner: wires data set -> classifier -> methods -> masks (cached) -> metrics (per-image rows) -> tables.

Nothing else in maskbench knows about every component. Resuming: a (method, image) pair whose rows exist
under the current run key is skipped without loading anything; a pair whose masks are cached is scored from
the cache; only the rest is explained. Failures (a method raising, NaN maps) are counted per method, listed
in the manifest, and never turned into numbers.
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import RunConfig
from .device import resolve_device, synchronize
from .errors import UnknownNameError
from .registry import import_plugin
from .storage import cache_root, stable_hash, write_json
from .store import MaskCache, RowStore, rows_from_values

SAVE_EVERY_SECONDS = 20.0


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
    explain_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    run_dir: Path
    summaries: list[MethodSummary]
    manifest: dict[str, Any]

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.summaries)


def git_revision() -> dict[str, Any]:
    src = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, check=True)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("maskbench", "torch", "torchvision", "captum", "numpy", "pandas", "pycocotools"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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


def run(config: RunConfig) -> RunResult:
    from tqdm.auto import tqdm

    for plugin in config.plugins:
        import_plugin(plugin)
    from maskbench.datasets import build_dataset, collate
    from maskbench.methods import MethodContext, build_method, check_masks
    from maskbench.metrics import METRICS, MetricInputs

    from .classifiers import get_classifier

    t_run = time.perf_counter()
    methods = [build_method(spec, preset=config.preset) for spec in config.methods]  # fail fast on bad names
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    cache = Path(config.cache_dir) if config.cache_dir else cache_root()

    def datasets(split: str):
        return build_dataset(config.dataset, root=config.data_root, split=split, image_size=config.image_size)

    test = datasets(config.split)
    image_ids = test.image_ids[: config.limit] if config.limit else list(test.image_ids)
    index = {iid: i for i, iid in enumerate(test.image_ids)}
    extra = _class_indices(config.resolved_table_classes(), test.classes)
    data_key = test.fingerprint()
    train_key = datasets("train").fingerprint() if config.checkpoint is None else "external"
    model, clf_info = get_classifier(
        config.model, datasets, train_key, test.num_classes, device, cache, config.checkpoint, config.progress
    )
    clf_key = clf_info["checkpoint_sha256"]
    metric_specs = {name: METRICS.get(name) for name in METRICS.list()}
    metric_versions = {n: s.version for n, s in metric_specs.items()}
    run_dir = config.run_dir()
    store = RowStore(run_dir)
    summaries: list[MethodSummary] = []

    for spec, method in zip(config.methods, methods):
        name = method.name
        summary = MethodSummary(name, images=len(image_ids))
        t_method = time.perf_counter()
        run_key = stable_hash(
            {"method": method.cache_key(), "classifier": clf_key, "data": data_key, "metrics": metric_versions}
        )
        masks_cache = MaskCache(cache / "masks" / data_key / clf_key / f"{name}-{method.cache_key()}")
        all_rows = store.load(name)
        current = all_rows[all_rows["run_key"] == run_key] if config.resume else all_rows.iloc[0:0]
        counts = current.groupby("image_id")["metric"].nunique() if len(current) else pd.Series(dtype=int)
        done = {iid for iid, n in counts.items() if n >= len(metric_specs)}
        todo = [iid for iid in image_ids if iid not in done]
        summary.skipped = len(image_ids) - len(todo)
        previous = store.load_meta(name)
        explain_total = float(previous.get("explain_seconds", 0.0)) if previous.get("run_key") == run_key else 0.0
        computed_total = int(previous.get("images_computed", 0)) if previous.get("run_key") == run_key else 0
        kept = current[current["image_id"].isin(done)]
        new_rows: list[pd.DataFrame] = []
        is_setup = False
        last_save = time.perf_counter()

        def save(final: bool = False) -> None:
            rows = pd.concat([kept, *new_rows], ignore_index=True) if new_rows else kept
            store.save(name, rows)
            store.save_meta(
                name,
                {
                    "method": name,
                    "label": method.display_name(),
                    "family": method.family,
                    "paper": method.paper,
                    "preset": getattr(method, "preset", "paper"),
                    "config": method.config(),
                    "cache_key": method.cache_key(),
                    "run_key": run_key,
                    "classifier_sha256": clf_key,
                    "data_key": data_key,
                    "explain_seconds": round(explain_total, 4),
                    "images_computed": computed_total,
                    "setup": summary.setup,
                    "complete": final and summary.failed == 0,
                },
            )

        bar = tqdm(total=len(todo), desc=f"{name:>16}", disable=not config.progress, unit="img", leave=False)
        for start in range(0, len(todo), config.batch_size):
            ids = todo[start : start + config.batch_size]
            batch = collate([test[index[i]] for i in ids]).to(device)
            classes = _classes_to_explain(batch.labels.cpu(), extra).to(device)
            masks = torch.empty(len(ids), classes.shape[1], *batch.images.shape[-2:], device=device)
            missing = []
            for j, iid in enumerate(ids):
                hit = masks_cache.get(iid)
                want = classes[j].tolist()
                if hit is not None and set(want) <= set(hit[0].tolist()):
                    pos = {c: p for p, c in enumerate(hit[0].tolist())}
                    masks[j] = torch.from_numpy(hit[1][[pos[c] for c in want]].astype(np.float32)).to(device)
                    summary.from_cache += 1
                else:
                    missing.append(j)
            ok = torch.ones(len(ids), dtype=torch.bool)
            if missing:
                if not is_setup:
                    summary.setup = method.setup(
                        MethodContext(model, config.dataset, datasets, test.num_classes, device, cache,
                                      config.seed, config.progress, clf_key)
                    ) or {}
                    is_setup = True
                sub = torch.tensor(missing, device=device)
                sub_batch = collate([test[index[ids[j]]] for j in missing]).to(device) if len(missing) < len(
                    ids) else batch
                try:
                    synchronize(device)
                    t0 = time.perf_counter()
                    out = method.explain(
                        model, batch.images[sub], classes[sub],
                        batch=sub_batch if method.uses_ground_truth else None,
                    )
                    nan = check_masks(out, batch.images[sub], classes[sub], name)
                    synchronize(device)
                    explain_total += time.perf_counter() - t0
                except Exception as exc:  # counted and reported, never scored
                    summary.failed += len(missing)
                    summary.errors.append(f"{[ids[j] for j in missing][:3]}...: {type(exc).__name__}: {exc}")
                    ok[missing] = False
                    bar.update(len(ids))
                    continue
                out = out.float()
                for local, j in enumerate(missing):
                    if bool(nan[local]):
                        summary.nan_maps += 1
                        summary.failed += 1
                        summary.errors.append(f"{ids[j]}: NaN in the maps")
                        ok[j] = False
                        continue
                    masks[j] = out[local]
                    masks_cache.put(ids[j], classes[j].cpu().numpy(), out[local].cpu().numpy())
                    summary.computed += 1
                    computed_total += 1
            flat = masks.flatten(2)
            summary.constant_maps += int(((flat.amax(2) - flat.amin(2)) <= 1e-6)[ok.to(device)].sum())
            keep = torch.nonzero(ok).flatten().tolist()
            if keep:
                kb = collate([test[index[ids[j]]] for j in keep]).to(device) if len(keep) < len(ids) else batch
                kt = torch.tensor(keep, device=device)
                inputs = MetricInputs(model, kb.images, masks[kt], classes[kt], kb)
                values = {n: s.fn(inputs).float().cpu().tolist() for n, s in metric_specs.items()}
                new_rows.append(rows_from_values([ids[j] for j in keep], values, run_key))
            bar.update(len(ids))
            if time.perf_counter() - last_save > SAVE_EVERY_SECONDS:
                save()
                last_save = time.perf_counter()
        bar.close()
        if todo or not store.csv_path(name).is_file() or previous.get("run_key") != run_key:
            save(final=True)
        summary.explain_seconds = round(explain_total, 4)
        summary.seconds = round(time.perf_counter() - t_method, 3)
        summaries.append(summary)

    from .tables import write_tables

    clf_public = {k: v for k, v in clf_info.items() if k != "history"}
    manifest = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "git": git_revision(),
        "versions": library_versions(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "dataset": {
            "name": config.dataset,
            "split": config.split,
            "images": len(image_ids),
            "fingerprint": data_key,
            "classes": test.classes,
            "repr": repr(test),
        },
        "classifier": clf_public,
        "metrics": {n: {"higher_is_better": s.higher_is_better, "table": s.table, "label": s.label,
                        "version": s.version} for n, s in metric_specs.items()},
        "methods": [vars(s) for s in summaries],
        "wall_seconds": round(time.perf_counter() - t_run, 2),
    }
    write_json(run_dir / "manifest.json", manifest)
    write_tables(run_dir)
    return RunResult(run_dir, summaries, manifest)
