"""Guaranteed ground truth: 2 x 2 grids of synthetic scenes whose classes are tied to their cells (DiFull).

After Rao, Böhle & Schiele, "Towards Better Understanding Attribution Methods", CVPR 2022: the grid pointing game
(GridPG, Böhle et al., CVPR 2021) tiles n x n images into one, and the DiFull setting ("disconnected") runs the
classifier on every cell separately, so that the output for a cell can only depend on that cell's pixels. Then
any attribution outside the cell is wrong *by construction*, whatever the model learned. Here the scenes are the
embedded synthetic set's (:mod:`maskbench.datasets.synthetic`) and the disconnected classifier is
``grid-smallcnn`` (:mod:`maskbench.classifiers.grid`).

The data set ``synthetic-grid`` (:func:`build_synthetic_grid`)
------------------------------------------------------------------
* **Image**: four scenes of the same split tiled 2 x 2, cells ``tl``, ``tr``, ``bl``, ``br``
  (:data:`CELLS`, row-major); 64 px scenes give 128 px grids (``image_size`` is the grid's side: it must be
  even, the scenes are read at half of it). Pixels are copied, not resampled.
* **Classes**: 4 x C, named ``"<cell>:<class>"`` (``"tl:disc"``, ...), class index = cell * C + c.
* **Label** of (cell, c): 1 iff the scene in that cell contains class c (its label in the base data set: every
  object of its annotation, difficult ones included, as the VOC loader reads it).
* **Ground truth** of (cell, c) with label 1: the **whole cell**, as class mask and as one box (the cell's,
  never difficult); empty otherwise. Not the object: the cell is the region the disconnected classifier can use
  for (cell, c), by construction, and it is all that is guaranteed (the classifier may use any pixel of the
  cell, context included). No ignore band (the base's VOC boundary band is about object outlines).
* **Image id**: the four scene ids in cell order joined by ``-`` (``"005001-005122-005161-005114"``): stable, and
  it names its scenes; a split lists its grids sorted by id.
* **Fingerprint**: the loader type, the grouping options (:meth:`GridDataset.fingerprint_options`), the grid ids
  and the digests of **every file of the base split** (:meth:`GridDataset.content_files`: the grouping reads every
  scene's annotation), so any change of the underlying data changes it. The scenes come from
  :func:`~maskbench.datasets.synthetic.build_synthetic` with the same defaults, so the copy generated in the cache
  for ``synthetic`` is reused (no second generation), and so is its classifier (``grid-smallcnn``).

Grouping (deterministic, seeded; each scene in at most one grid of its split)
----------------------------------------------------------------------------
``distinct_classes=True`` (the default) **guarantees that no class appears in two cells of a grid**: the four
scenes' label sets are pairwise disjoint (GridPG builds its grids from images of distinct classes). With C = 6
classes and scenes of 1-3 classes that cannot use every scene (a grid needs at least two single-class scenes),
so the grids are packed to use as many scenes as possible (:func:`pack_disjoint`): every combination of four
pairwise-disjoint label sets is a *pattern*; repeatedly, the feasible pattern that consumes the smallest share
of the remaining single-class (and empty) scenes, the scarce ones (sum over them of used / remaining), is formed,
until none is feasible; ties go to the first pattern in a fixed order (label sets sorted by size, then classes).
Which scene of a label set goes into which grid, and the cell of each scene, follow a ``random.Random(grid_seed)``
shuffle (:func:`group_scenes`). Scenes that fit in no such grid are **left out**, never forced into a grid with
a repeated class, so the guarantee holds for every image.

On the default synthetic set this forms **728 / 25 / 30 grids** from the 4,800 / 200 / 200 train / val / test
scenes: the integer-programming optimum on each split (checked with ``scipy.optimize.milp`` while writing this;
not used here, so that the grouping never depends on a solver's version). Nearly every grid is two
single-class and two two-class scenes (all 728 train grids, 29 of 30 test grids), so a grid holds each of the six
classes exactly once; the scenes left out are the 3-class ones (the most cluttered: 1 of the 1,420 3-class train,
val and test scenes is used) and 29 % of the 2-class ones. ``distinct_classes=False`` uses every scene
instead (floor(N / 4) grids of consecutive scenes of the seeded shuffle), without the guarantee.

``trainval`` is the train grids followed by the validation grids (each split grouped on its own, so no grid
mixes the two); the split names and roles are those of ``synthetic``.

Deviations from the papers
--------------------------
* The cells hold multi-label synthetic scenes, not ImageNet images of one class each; the classifier is
  multi-label per cell (4 x C outputs, one per (cell, class)), where DiFull's per-cell heads are single-label.
* GridPG and DiFull keep only images the classifier recognises confidently; here every scene the grouping takes
  is used (the shipped ``smallcnn`` has a test mAP of 0.989 on the scenes).
* 2 x 2 grids only (GridPG also uses 3 x 3 on CIFAR-10), of cells at the scene's own resolution.
"""

from __future__ import annotations

import os
import random
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from maskbench.core.errors import DataError, InvalidOptionError

from .base import DATASETS, MIN_IMAGE_SIZE, AttributionDataset, Sample, check_image_size
from .synthetic import build_synthetic
from .voc import VOCDataset

CELLS: tuple[str, ...] = ("tl", "tr", "bl", "br")  # row-major: cell k is at row k // 2, column k % 2
GROUPING_VERSION = "1"  # bump when the grouping rule changes (part of the fingerprint)
SPLIT_PARTS = {"trainval": ("train", "val")}  # a union split is the union of its parts' grids, in this order
ID_SEPARATOR = "-"

LabelSet = frozenset[int]


def grid_class_names(base_classes: Sequence[str]) -> list[str]:
    """``"<cell>:<class>"`` for every cell and base class; index = cell * C + c."""
    return [f"{cell}:{c}" for cell in CELLS for c in base_classes]


def cell_box(cell: int, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel-edge box of cell ``cell`` in a grid of ``size`` px cells (covers exactly its pixels)."""
    row, col = divmod(cell, 2)
    return col * size, row * size, (col + 1) * size, (row + 1) * size


# -- grouping ---------------------------------------------------------------------------------------------------
def _patterns(types: list[LabelSet]) -> list[tuple[LabelSet, ...]]:
    """Every multiset of four pairwise-disjoint label sets among ``types`` (only the empty set can repeat), as
    tuples in the order of ``types``."""
    out: list[tuple[LabelSet, ...]] = []

    def extend(start: int, chosen: tuple[LabelSet, ...], used: LabelSet) -> None:
        if len(chosen) == len(CELLS):
            out.append(chosen)
            return
        for i in range(start, len(types)):
            t = types[i]
            if not t & used:  # the next set comes after this one (the empty set may come again)
                extend(i if not t else i + 1, (*chosen, t), used | t)

    extend(0, (), frozenset())
    return out


def pack_disjoint(label_sets: Sequence[LabelSet]) -> list[tuple[LabelSet, ...]]:
    """The patterns (four pairwise-disjoint label sets) to form from scenes with these label sets, greedily: the
    feasible pattern consuming the smallest share of the remaining scarce (single-class or empty) scenes first,
    ties to the first pattern (label sets ordered by size, then classes). Deterministic; no randomness."""
    remaining = Counter(label_sets)
    types = sorted(remaining, key=lambda t: (len(t), sorted(t)))
    candidates = [(p, Counter(p)) for p in _patterns(types)]
    chosen: list[tuple[LabelSet, ...]] = []
    while True:  # counts only decrease: a pattern once infeasible stays so
        candidates = [(p, use) for p, use in candidates if all(remaining[t] >= k for t, k in use.items())]
        if not candidates:
            return chosen
        best, best_cost = candidates[0], None
        for p, use in candidates:
            cost = sum(k / remaining[t] for t, k in use.items() if len(t) <= 1)
            if best_cost is None or cost < best_cost:
                best, best_cost = (p, use), cost
        remaining.subtract(best[1])
        chosen.append(best[0])


def group_scenes(scene_ids: Sequence[str], label_sets: Sequence[LabelSet], seed: int,
                 distinct_classes: bool = True) -> list[tuple[str, ...]]:
    """Group scenes into 2 x 2 grids (see the module docstring): tuples of four scene ids in cell order, each scene
    in at most one grid, sorted by their joined id. Deterministic for the same ids, label sets and seed."""
    if len(scene_ids) != len(label_sets):
        raise ValueError(f"{len(scene_ids)} scene ids but {len(label_sets)} label sets")
    rng = random.Random(seed)
    order = sorted(range(len(scene_ids)), key=lambda i: scene_ids[i])  # independent of the order given
    rng.shuffle(order)
    groups: list[list[int]] = []
    if not distinct_classes:
        groups = [order[i : i + len(CELLS)] for i in range(0, len(order) - len(CELLS) + 1, len(CELLS))]
    else:
        queues: dict[LabelSet, list[int]] = {}
        for i in order:  # each label set's scenes in the shuffled order
            queues.setdefault(label_sets[i], []).append(i)
        taken = dict.fromkeys(queues, 0)
        for pattern in pack_disjoint(label_sets):
            group = []
            for t in pattern:
                group.append(queues[t][taken[t]])
                taken[t] += 1
            rng.shuffle(group)  # the cell of each scene
            groups.append(group)
    return sorted((tuple(scene_ids[i] for i in g) for g in groups), key=ID_SEPARATOR.join)


def scene_label_sets(base: AttributionDataset) -> list[LabelSet]:
    """The label set of every scene of ``base``, as its samples' labels: from the annotations alone when the base
    is a VOC tree (the synthetic set; no image decoded; memoised by the files' sizes and times), else by loading
    each sample."""
    if not isinstance(base, VOCDataset):
        return [frozenset(torch.nonzero(base.load(i).label > 0).flatten().tolist()) for i in base.image_ids]
    paths = [base.voc_dir / "Annotations" / f"{i}.xml" for i in base.image_ids]
    stamp = tuple((s.st_size, s.st_mtime_ns) for s in map(_stat, paths))
    return list(_voc_label_sets(tuple(map(str, paths)), stamp, tuple(base.classes)))


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as exc:
        raise DataError(f"Annotation file not found: {path} (expected a VOC XML annotation).") from exc


@lru_cache(maxsize=16)
def _voc_label_sets(paths: tuple[str, ...], stamp: tuple, classes: tuple[str, ...]) -> tuple[LabelSet, ...]:
    """The class indices of the objects of each VOC annotation (``stamp``: the files' state, the memo's key)."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:
            raise DataError(f"Cannot read the annotation {path}: {exc}.") from exc
        names = [(obj.findtext("name") or "").strip() for obj in root.findall("object")]
        unknown = [n for n in names if n not in index]
        if unknown:
            raise DataError(f"Unknown class name {unknown[0]!r} in annotation {path}. Valid class names: "
                            f"{', '.join(classes)}.")
        out.append(frozenset(index[n] for n in names))
    return tuple(out)


# -- the data set -----------------------------------------------------------------------------------------------
class GridDataset(AttributionDataset):
    """2 x 2 grids of a base data set's scenes with per-cell classes and whole-cell ground truth (module docstring).

    Args:
        base_split: split name -> the base data set of that split (one cell size, one class list).
        split: ``train``, ``val``, ``test`` or ``trainval`` (the train grids, then the validation grids).
        seed: the grouping's seed.
        distinct_classes: no class in two cells of a grid (default), or every scene used without that guarantee.

    ``base`` is the base data set of the same split name (it loads any scene; ``grid-smallcnn`` finds its
    classifier through it), ``parts`` the base splits grouped (two for ``trainval``), ``cells`` each grid's scene
    ids in cell order, and ``left_out`` the number of scenes of ``parts`` in no grid.
    """

    def __init__(self, base_split: Callable[[str], AttributionDataset], split: str = "test", seed: int = 0,
                 distinct_classes: bool = True):
        self.base = base_split(split)
        self.parts = [base_split(p) for p in SPLIT_PARTS[split]] if split in SPLIT_PARTS else [self.base]
        cell = self.base.image_size
        if cell is None:
            raise DataError("The grid's scenes must have one fixed size (an int image_size), got None.")
        super().__init__(self.base.root, split, 2 * cell)
        self.cell_size = cell
        self.seed = seed
        self.distinct_classes = distinct_classes
        self.base_classes = list(self.base.classes)
        self.classes = grid_class_names(self.base_classes)
        self.mean, self.std = tuple(self.base.mean), tuple(self.base.std)
        self.cells: dict[str, tuple[str, ...]] = {}
        for part in self.parts:
            for grid in group_scenes(part.image_ids, scene_label_sets(part), seed, distinct_classes):
                self.cells[ID_SEPARATOR.join(grid)] = grid
        self.image_ids = list(self.cells)
        self.left_out = sum(len(p) for p in self.parts) - len(CELLS) * len(self.image_ids)
        if not self.image_ids:
            guarantee = (" with four pairwise-disjoint label sets (pass distinct_classes=False to group them without "
                         "that guarantee)") if distinct_classes else ""
            raise DataError(f"No 2x2 grid can be formed from the {sum(len(p) for p in self.parts)} scene(s) of split "
                            f"{split!r} under {self.base.root}{guarantee}.")

    def content_files(self) -> list[tuple[str, Path]] | None:
        """Every file of the base split(s): the grouping reads every scene's labels, the grids their scenes."""
        out: list[tuple[str, Path]] = []
        for part in self.parts:
            files = part.content_files()
            if files is None:
                return None
            out += files
        return out

    def fingerprint_options(self) -> dict[str, Any]:
        return {"cells": list(CELLS), "grouping": {"version": GROUPING_VERSION, "seed": self.seed,
                                                   "distinct_classes": self.distinct_classes},
                "base": {"format": type(self.base).__name__, "options": self.base.fingerprint_options(),
                         "cell_size": self.cell_size, "classes": self.base_classes,
                         "splits": [p.split for p in self.parts]}}

    def scenes(self, image_id: str) -> tuple[str, ...]:
        """The four scene ids of a grid, in cell order."""
        scenes = self.cells.get(image_id)
        if scenes is None:
            raise DataError(f"Unknown image id {image_id!r}: not a grid of split {self.split!r} (grid ids join four "
                            f"scene ids with {ID_SEPARATOR!r}).")
        return scenes

    def load(self, image_id: str) -> Sample:
        samples = [self.base.load(s) for s in self.scenes(image_id)]
        s, c = self.cell_size, len(self.base_classes)
        for sample in samples:
            if tuple(sample.image.shape) != (3, s, s):
                raise DataError(f"Scene {sample.image_id} is {tuple(sample.image.shape[-2:])} px, the grid's cells "
                                f"are {s} x {s} px.")
        image = torch.cat([torch.cat([samples[0].image, samples[1].image], 2),
                           torch.cat([samples[2].image, samples[3].image], 2)], 1)
        class_masks = torch.zeros(len(CELLS) * c, 2 * s, 2 * s, dtype=torch.bool)
        boxes: list[tuple[int, int, int, int]] = []
        box_labels: list[int] = []
        for k, sample in enumerate(samples):
            x0, y0, x1, y1 = cell_box(k, s)
            for j in torch.nonzero(sample.label > 0).flatten().tolist():
                class_masks[k * c + j, y0:y1, x0:x1] = True
                boxes.append((x0, y0, x1, y1))
                box_labels.append(k * c + j)
        return Sample(
            image=image, label=torch.cat([sample.label for sample in samples]), image_id=image_id,
            class_masks=class_masks, ignore=torch.zeros(2 * s, 2 * s, dtype=torch.bool),
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            box_labels=torch.tensor(box_labels, dtype=torch.long),
            box_difficult=torch.zeros(len(boxes), dtype=torch.bool),
        )


def cell_size(image_size: int | None) -> int | None:
    """The scenes' side for a grid of side ``image_size`` (None: the scenes' native size)."""
    if image_size is None:
        return None
    check_image_size(image_size)
    if image_size % 2 or image_size < 2 * MIN_IMAGE_SIZE:
        raise InvalidOptionError(f"image_size of a 2x2 grid must be even and at least {2 * MIN_IMAGE_SIZE} (two "
                                 f"cells of at least {MIN_IMAGE_SIZE} px per side), got {image_size}.")
    return image_size // 2


@DATASETS.register("synthetic-grid", ground_truth="guaranteed")
def build_synthetic_grid(
    root: str | os.PathLike[str] | None = None,
    split: str = "test",
    image_size: int | None = None,
    grid_seed: int = 0,
    distinct_classes: bool = True,
    **options: Any,
) -> GridDataset:
    """2 x 2 grids of synthetic scenes, classes ``"<cell>:<class>"``, ground truth = the whole cell (DiFull).

    ``root`` and ``options`` (``n_train``, ``resolution``, ``seed``, ``generate``, ...) go to
    :func:`~maskbench.datasets.synthetic.build_synthetic` unchanged, so the defaults read the same cached synthetic
    set as ``synthetic``. ``image_size``: the grid's side (even; the scenes are read at half of it), None for twice
    the scenes' native size. ``grid_seed``: the grouping's seed; ``distinct_classes``: see the module docstring.
    Registered with ``ground_truth="guaranteed"``: its ground truth is the region the classifier can use, which
    the ``grid_share`` metric requires.
    """
    if isinstance(grid_seed, bool) or not isinstance(grid_seed, int) or grid_seed < 0:
        raise InvalidOptionError(f"grid_seed must be an int >= 0, got {grid_seed!r}")
    if not isinstance(distinct_classes, bool):
        raise InvalidOptionError(f"distinct_classes must be True or False, got {distinct_classes!r}")
    cells = cell_size(image_size)

    def base_split(name: str) -> AttributionDataset:
        return build_synthetic(root, name, cells, **options)

    return GridDataset(base_split, split, grid_seed, distinct_classes)
