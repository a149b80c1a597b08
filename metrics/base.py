"""The metric contract, the metric registry and the tables metrics declare.

A metric is a function ``fn(inputs: MetricInputs) -> Tensor`` returning one value per image, shape (B,),
NaN where the metric is undefined for that image (e.g. no segmentation, or no true class), or a dict of such
(B,) tensors stored as ``<metric>/<key>`` cells; the runner counts NaN values per metric and method, and tables
report how many images each mean is over. A metric registered with ``curves=True`` returns :class:`Curves`
instead: a few named per-image curves on a fixed x grid, which the runner keeps beside the rows in one compact
array file per method (:class:`~maskbench.core.store.CurveTable`) for figures to draw without a model. Each
registered metric carries its polarity (``higher_is_better``), the table it belongs to, its column label, its
valid range and the diagnostic counts it stores.

A table is declared where its metrics are defined (:func:`register_table`, a :class:`TableSpec`): its
statistics (:mod:`maskbench.core.stats`), caption, citation, headline statistic for the leaderboard and, when
needed, hooks for pseudo-method rows and further files. A metric whose ``table`` has no registered spec gets a
table of its own: the mean of each of its scalar metrics. ``maskbench.benchmark.tables`` only renders what is
declared here. Plugin metrics register the same way (``--plugin`` or the entry-point group
``maskbench.metrics``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pandas as pd
import torch
from torch import Tensor, nn

from maskbench.core.errors import MaskbenchError, UnknownNameError
from maskbench.core.registry import Registry
from maskbench.core.stats import Statistic, mean_of


@dataclass
class MetricInputs:
    """One batch of masks to score, all on the model's device."""

    model: nn.Module  # frozen classifier
    images: Tensor  # (B, 3, H, W) normalised
    masks: Tensor  # (B, K, H, W) in [0, 1]
    classes: Tensor  # (B, K) long: the class of each mask
    batch: Any  # maskbench.datasets.Batch (labels, class_masks, ignore, has_seg, boxes)


@dataclass
class Curves:
    """What a ``curves=True`` metric returns for a batch: per curve name, its x grid ``x[name]`` (S,) and the
    images' values ``y[name]`` (B, S) on it, NaN where a point (or a whole curve) is undefined for an image."""

    x: dict[str, Tensor]
    y: dict[str, Tensor]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable[[MetricInputs], Tensor]
    higher_is_better: bool
    table: str
    label: str
    version: str = "1"
    description: str = ""
    valid_range: tuple[float, float] = (-math.inf, math.inf)  # every stored value of the metric lies in it
    diagnostics: tuple[tuple[str, str], ...] = ()  # (diagnostics.csv column, stored cell summed over images)
    # registered data set name -> whether a run on it scores the metric; None: every data set
    applies_to: Callable[[str], bool] | None = None
    # scored only when a run asks for it (``bench --extra-metrics NAME``): too slow for the default run
    optional: bool = False
    # fn returns :class:`Curves` (stored in ``per_image/<method>.<name>.npz``), not values for rows
    curves: bool = False

    def applies(self, dataset: str) -> bool:
        """Whether a run on ``dataset`` (a registered data set name) scores this metric."""
        return self.applies_to is None or bool(self.applies_to(dataset))


def select_metrics(dataset: str, extra: Sequence[str] = ()) -> dict[str, MetricSpec]:
    """The metrics a run on ``dataset`` scores: every registered one that applies to it and is not optional,
    plus the optional ones named in ``extra`` (a metric's name, or its table's name for all of that table's
    optional metrics, e.g. ``road``). An unknown name raises :class:`UnknownNameError` listing the choices."""
    specs = {n: METRICS.get(n) for n in METRICS.list()}
    optional = {n: s for n, s in specs.items() if s.optional}
    chosen: set[str] = set()
    for name in extra:
        hits = [n for n, s in optional.items() if name in (n, s.table)]
        if not hits:
            raise UnknownNameError("optional metric", name, set(optional) | {s.table for s in optional.values()})
        chosen.update(hits)
    return {n: s for n, s in specs.items() if s.applies(dataset) and (not s.optional or n in chosen)}


def _adopt_entry_point(name: str, obj: Any) -> MetricSpec:
    """An entry point of group ``maskbench.metrics`` names a function decorated with :func:`register_metric`
    (importing its module registered it) or a :class:`MetricSpec`; its registered name must be the entry's."""
    spec = obj if isinstance(obj, MetricSpec) else next(
        (METRICS.get(n) for n in METRICS.list() if METRICS.get(n).fn is obj), None)
    if spec is None:
        raise MaskbenchError(f"Metric entry point '{name}' names {obj!r}, which is not a function decorated with "
                             f"@register_metric (nor a MetricSpec).")
    if spec.name != name:
        raise MaskbenchError(f"Metric entry point '{name}' names the metric registered as '{spec.name}': use the "
                             f"same name for both.")
    return spec


METRICS: Registry = Registry("metric", entry_point_group="maskbench.metrics", adopt=_adopt_entry_point)


def value_range(metric: str) -> tuple[float, float]:
    """The valid range of a stored row's metric (``iou``, or a cell of a dict metric such as
    ``classmask/t1/m2``): its registered ``valid_range``, unbounded for a metric that is not registered."""
    base = metric.split("/", 1)[0]
    return METRICS.get(base).valid_range if base in METRICS else (-math.inf, math.inf)


def register_metric(
    name: str, *, higher_is_better: bool, table: str, label: str | None = None, version: str = "1",
    valid_range: tuple[float, float] = (-math.inf, math.inf), diagnostics: dict[str, str] | None = None,
    applies_to: Callable[[str], bool] | None = None, optional: bool = False, curves: bool = False,
) -> Callable[[Callable[[MetricInputs], Tensor]], Callable[[MetricInputs], Tensor]]:
    """Register a metric. ``valid_range`` bounds every value it can store (also the cells of a dict metric):
    stored rows outside it are damaged, and are recomputed by ``bench`` and refused by ``tables``.
    ``diagnostics`` maps a column of ``diagnostics.csv`` to a stored count cell (``"pointing/constant"``)
    whose sum over a method's images it shows. ``applies_to(dataset name)``: the data sets on which a run scores
    the metric (None: all); on the others it stores no row and its table is not written (e.g. the grid's
    localisation, meaningful only where the ground truth is guaranteed). ``optional``: scored only when a run
    names it (or its table) in ``--extra-metrics``, for metrics too slow for the default run (ROAD). ``curves``:
    ``fn`` returns :class:`Curves` (each curve's values within ``valid_range``), stored beside the rows."""

    def wrapper(fn: Callable[[MetricInputs], Tensor]) -> Callable[[MetricInputs], Tensor]:
        doc = (fn.__doc__ or "").strip().splitlines()
        spec = MetricSpec(name, fn, higher_is_better, table, label or name, version, doc[0] if doc else "",
                          (float(valid_range[0]), float(valid_range[1])), tuple((diagnostics or {}).items()),
                          applies_to, optional, curves)
        METRICS.register(name, spec, origin=fn.__module__)
        return fn

    return wrapper


def merge_true_class_masks(masks: Tensor, classes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel max over the masks of each image's true classes (NeurIPS 2022, Sec. 4.3).

    Returns the merged (B, H, W) mask and a (B,) bool telling which images have at least one true class among
    ``classes`` (the others get an all-zero merged mask and must be reported as undefined, not scored).
    """
    is_true = torch.gather(labels > 0, 1, classes)  # (B, K)
    neg = torch.full_like(masks, -1.0)
    merged = torch.where(is_true[:, :, None, None], masks, neg).amax(1)
    has_true = is_true.any(1)
    return merged.clamp_min(0.0), has_true


def true_class_slots(classes: Tensor, labels: Tensor) -> Tensor:
    """(B, K) bool: slot k holds a true class of the image, and is that class's first slot.

    The runner pads each image's explained classes by repeating its first class, so a class can occupy several
    slots; per-class metrics must score it once.
    """
    is_true = torch.gather(labels > 0, 1, classes)
    k = classes.shape[1]
    same = classes[:, :, None] == classes[:, None, :]  # (B, K, K)
    earlier = torch.ones(k, k, dtype=torch.bool, device=classes.device).tril(-1)  # [k, j] = j < k
    repeated = (same & earlier).any(2)
    return is_true & ~repeated


def forward_rows(images: Tensor) -> int:
    """How many images of this size one no-grad forward of a metric takes: about 2^22 input pixels on a GPU,
    2^19 on the CPU, where smaller chunks stay in the caches (smallcnn at 64 px: 128 images per forward ran 2.2x
    faster than 1,024)."""
    budget = 1 << 22 if images.device.type == "cuda" else 1 << 19
    return max(1, budget // (images.shape[-2] * images.shape[-1]))


@torch.no_grad()
def forward_in_chunks(model: nn.Module, x: Tensor, rows: int | None = None) -> Tensor:
    """Float logits of ``model`` on ``x`` (N, 3, H, W), ``rows`` images per forward (default :func:`forward_rows`)."""
    rows = rows or forward_rows(x)
    return torch.cat([model(x[i : i + rows]).float() for i in range(0, len(x), rows)])


_Result = TypeVar("_Result")


def memo_on_inputs(inputs: MetricInputs, key: str, compute: Callable[[MetricInputs], _Result]) -> _Result:
    """``compute(inputs)``, once per ``inputs``: the result is kept on ``inputs`` under attribute ``key`` and
    recomputed only when its model, images, masks, classes or labels are replaced or modified in place (object
    identity and tensor version counter), so the metrics that share one computation (faithfulness's four
    scores, ROAD's two curves) run it once per batch."""
    tensors = (inputs.images, inputs.masks, inputs.classes, inputs.batch.labels)
    objects = (inputs.model, *tensors)
    versions = tuple(t._version for t in tensors)
    hit = getattr(inputs, key, None)
    if hit is not None and all(a is b for a, b in zip(hit[0], objects, strict=True)) and hit[1] == versions:
        return hit[2]
    result = compute(inputs)
    setattr(inputs, key, (objects, versions, result))
    return result


# ------------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class TableInputs:
    """What a table's ``files`` hook may read: the stored rows (columns method, image_id, metric, value; every
    table's ``keep_rows`` applied), the methods' sidecars, their display order, the data set's description from
    the manifest (``classes``, ``image_size``, ...), the caption's run description and the bootstrap settings."""

    rows: pd.DataFrame
    metas: dict[str, dict]
    order: list[str]
    data_info: dict[str, Any]
    where: str
    label_suffix: str  # ``<dataset>-<model>``, for LaTeX labels
    resamples: int
    seed: int
    image_ids: list[str]
    scored: dict[str, set[str]]

    def class_name(self, i: int) -> str:
        names = self.data_info.get("classes")
        return names[i] if names and i < len(names) else str(i)


@dataclass(frozen=True)
class TableSpec:
    """One statistics table (``<name>.csv`` and ``<name>.tex``), declared next to the metrics it shows.

    * ``stats``: the table's rows per method (:class:`~maskbench.core.stats.Statistic`); None: the mean of each
      scalar metric registered with ``table=name``, in name order.
    * ``caption`` / ``paper``: the caption's first sentence(s) and the source it follows ("After <paper>.").
    * ``order``: position among the tables and in the leaderboard (built-ins 10-60; plugins default 100).
    * ``headline``: (statistic, leaderboard label, phrase for the leaderboard's caption), or None.
    * ``extra``: LaTeX header -> ``diagnostics.csv`` column shown as plain text.
    * ``caption_note(data_info)``: a sentence added to the caption that depends on the run (e.g. a tolerance).
    * ``keep_rows(rows, data_info)``: the stored cells the run's tables use (e.g. the table classes only).
    * ``pseudo_rows(rows, metas)``: rows and sidecars of pseudo-methods shown in every table (family
      ``classifier``: never best, never in the leaderboard).
    * ``files(inputs)``: further files, ``{file name: text}`` (e.g. every cell of a class matrix).
    """

    name: str
    stats: tuple[Statistic, ...] | None = None
    caption: str = ""
    paper: str = ""
    order: int = 100
    headline: tuple[str, str, str] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    caption_note: Callable[[dict[str, Any]], str] | None = None
    keep_rows: Callable[[pd.DataFrame, dict[str, Any]], pd.DataFrame] | None = None
    pseudo_rows: Callable[[pd.DataFrame, dict[str, dict]], tuple[pd.DataFrame, dict[str, dict]]] | None = None
    files: Callable[[TableInputs], dict[str, str]] | None = None


TABLES: Registry = Registry("table")


def register_table(spec: TableSpec) -> TableSpec:
    """Declare a table (called in the module that defines its metrics, which becomes its origin)."""
    TABLES.register(spec.name, spec, origin=sys._getframe(1).f_globals.get("__name__", "?"))
    return spec


def metric_statistic(name: str) -> Statistic:
    """The mean over images of a registered scalar metric, with its label, polarity and description.

    Built-in tables call it while ``maskbench.metrics`` is being imported, so it never loads the entry points
    (an entry-point plugin imports ``maskbench.metrics`` itself); the metric must be registered already."""
    spec: MetricSpec = METRICS.get(name, entry_points=False)
    return mean_of(name, spec.label, spec.higher_is_better, spec.description)


def table_specs() -> list[TableSpec]:
    """Every table: the registered ones and a default one per other ``table`` name of a registered metric,
    ordered by ``order`` then name."""
    specs = {n: TABLES.get(n) for n in TABLES.list()}
    for name in METRICS.list():
        metric: MetricSpec = METRICS.get(name)
        if metric.table not in specs:
            specs[metric.table] = TableSpec(metric.table, caption=f"Plugin table {metric.table}: mean over images.")
    out = []
    for spec in specs.values():
        if spec.stats is None:
            metrics = [n for n in METRICS.list() if METRICS.get(n).table == spec.name]
            spec = replace(spec, stats=tuple(metric_statistic(n) for n in metrics))
        out.append(spec)
    return sorted(out, key=lambda t: (t.order, t.name))
