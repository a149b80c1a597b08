"""The dataset contract: every loader returns :class:`Sample` objects; batches are :class:`Batch`.

One sample type for every data set (PASCAL VOC-2007, COCO-2014, the embedded synthetic set):

* ``image``: (3, H, W) float32, normalised with the data set's ``mean``/``std``;
* ``label``: (C,) float32 multi-hot, each class once however many objects it has;
* ``class_masks``: (C, H, W) bool per-class segmentation, or ``None`` where the image has none;
* ``ignore``: (H, W) bool, pixels excluded from every mask metric (VOC's 255 boundary band; never foreground);
* ``boxes`` (N, 4) float xyxy in pixels of the returned image, ``box_labels`` (N,) long,
  ``box_difficult`` (N,) bool;
* ``image_id``: a stable string id (the file stem), used as the cache key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maskbench.core.errors import InvalidOptionError
from maskbench.core.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Valid square image sides (``--image-size``, the data set builders' ``image_size``, the synthetic generator's
# resolution). 16 px is the smallest side at which ``smallcnn`` (stride 8) still has a 2 x 2 Grad-CAM layer and
# the synthetic generator can draw its shapes; 4096 px bounds memory (one 4096 px float32 image is 200 MB, and the
# methods hold many perturbed copies). Larger classifiers need more (VGG16 and ResNet-50 stride 32).
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 4096


def check_image_size(value: object, option: str = "image_size") -> int | None:
    """``value`` if it is None (native size) or an int in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE]; else InvalidOptionError."""
    if value is None:
        return None
    valid = isinstance(value, int) and not isinstance(value, bool) and MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE
    if not valid:
        raise InvalidOptionError(
            f"{option} must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (pixels per side) or unset for the "
            f"data set's native size, got {value!r}."
        )
    return value



@dataclass
class Sample:
    image: Tensor
    label: Tensor
    image_id: str
    class_masks: Tensor | None = None
    ignore: Tensor | None = None
    boxes: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    box_labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    box_difficult: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    @property
    def segmentation(self) -> Tensor | None:
        """Aggregated foreground: union of the masks of the image's classes."""
        if self.class_masks is None:
            return None
        return self.class_masks.any(0)


@dataclass
class Batch:
    """A collated list of samples. Images without segmentation get all-False masks and ``has_seg`` False."""

    images: Tensor  # (B, 3, H, W)
    labels: Tensor  # (B, C)
    image_ids: list[str]
    class_masks: Tensor  # (B, C, H, W) bool
    ignore: Tensor  # (B, H, W) bool
    has_seg: Tensor  # (B,) bool
    boxes: list[Tensor]
    box_labels: list[Tensor]
    box_difficult: list[Tensor]

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            images=self.images.to(device),
            labels=self.labels.to(device),
            image_ids=self.image_ids,
            class_masks=self.class_masks.to(device),
            ignore=self.ignore.to(device),
            has_seg=self.has_seg.to(device),
            boxes=[b.to(device) for b in self.boxes],
            box_labels=[b.to(device) for b in self.box_labels],
            box_difficult=[b.to(device) for b in self.box_difficult],
        )

    def select(self, rows: list[int]) -> Batch:
        """The sub-batch of the given rows (no reloading from disk)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.images.device)
        return Batch(
            images=self.images[idx],
            labels=self.labels[idx],
            image_ids=[self.image_ids[i] for i in rows],
            class_masks=self.class_masks[idx],
            ignore=self.ignore[idx],
            has_seg=self.has_seg[idx],
            boxes=[self.boxes[i] for i in rows],
            box_labels=[self.box_labels[i] for i in rows],
            box_difficult=[self.box_difficult[i] for i in rows],
        )

    @property
    def segmentation(self) -> Tensor:
        """(B, H, W) bool union of the masks of each image's true classes."""
        return (self.class_masks & (self.labels > 0)[:, :, None, None]).any(1)


def collate(samples: Sequence[Sample]) -> Batch:
    images = torch.stack([s.image for s in samples])
    b, _, h, w = images.shape
    c = samples[0].label.numel()
    class_masks = torch.zeros(b, c, h, w, dtype=torch.bool)
    ignore = torch.zeros(b, h, w, dtype=torch.bool)
    has_seg = torch.zeros(b, dtype=torch.bool)
    for i, s in enumerate(samples):
        if s.class_masks is not None:
            class_masks[i] = s.class_masks
            has_seg[i] = True
        if s.ignore is not None:
            ignore[i] = s.ignore
    return Batch(
        images=images,
        labels=torch.stack([s.label for s in samples]),
        image_ids=[s.image_id for s in samples],
        class_masks=class_masks,
        ignore=ignore,
        has_seg=has_seg,
        boxes=[s.boxes for s in samples],
        box_labels=[s.box_labels for s in samples],
        box_difficult=[s.box_difficult for s in samples],
    )


# -- box rasters: the regions of a batch's boxes, for the box metrics and the box ground truth ----------------
def all_classes(batch: Batch) -> Tensor:
    """(B, C) long: every class index for every image of ``batch``."""
    b, c = batch.labels.shape
    return torch.arange(c, device=batch.labels.device).expand(b, c)


def _pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Pixels k (a slice [start, stop)) whose centre k + 0.5 lies in the closed interval [lo, hi]."""
    return max(0, math.ceil(lo - 0.5)), min(size, math.floor(hi - 0.5) + 1)


def box_stats(batch: Batch, classes: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Box union (B, K, H, W) bool, number of boxes and of difficult boxes (B, K) of each requested class.

    Boxes are ``[x0, y0, x1, y1]`` in pixel-edge coordinates of the returned image; a box covers pixel (i, j) iff
    the pixel centre (j + 0.5, i + 0.5) lies in the closed box. A class's region is the union of all its boxes,
    difficult ones included (as TorchRay's ``voc_as_mask``).

    One host read of each image's boxes, then one slice fill per box on the device (no per-pixel work in Python).
    """
    b, k = classes.shape
    dev = classes.device
    slots_of = classes.tolist()
    union = torch.zeros(b, k, h, w, dtype=torch.bool, device=dev)
    n_boxes = [[0] * k for _ in range(b)]
    n_difficult = [[0] * k for _ in range(b)]
    for i in range(b):
        boxes = batch.boxes[i].reshape(-1, 4).tolist()
        labels = batch.box_labels[i].tolist()
        difficult = batch.box_difficult[i].tolist()
        for (x0, y0, x1, y1), label, diff in zip(boxes, labels, difficult, strict=True):
            slots = [j for j, c in enumerate(slots_of[i]) if c == label]
            if not slots:
                continue
            for j in slots:
                n_boxes[i][j] += 1
                n_difficult[i][j] += bool(diff)
            (c0, c1), (r0, r1) = _pixel_span(x0, x1, w), _pixel_span(y0, y1, h)
            if c1 > c0 and r1 > r0:
                for j in slots:
                    union[i, j, r0:r1, c0:c1] = True
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=dev).view(b, k)  # noqa: E731
    return union, as_tensor(n_boxes), as_tensor(n_difficult)


def box_union_masks(batch: Batch, h: int, w: int, classes: Tensor | None = None) -> Tensor:
    """(B, C, H, W) bool: union of each class's boxes (all boxes, difficult ones included) on an H x W grid.

    With ``classes`` (B, K) long, only those classes: (B, K, H, W), slot by slot.
    """
    classes = all_classes(batch) if classes is None else classes
    return box_stats(batch, classes, h, w)[0]



def stack_split(dataset: Any) -> tuple[Tensor, Tensor]:
    """All images (N, 3, H, W) and labels (N, C) of a split, in memory (for the small training splits).

    A split that already holds ``images`` and ``labels`` tensors is returned as is.
    """
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if isinstance(images, Tensor) and isinstance(labels, Tensor):
        return images, labels
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s.image for s in samples]), torch.stack([s.label for s in samples])


def seeded_sample(ids: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of the sorted ``ids`` drawn with ``random.Random(seed)``, returned sorted (all of them when fewer):
    the named subsets of the real data sets (ImageNet's ``dgmp-test``, COCO's ``neurips-test`` and holdouts)."""
    ids = sorted(ids)
    return ids if len(ids) <= n else sorted(random.Random(seed).sample(ids, n))


IN_MEMORY_BYTES = 2 * 1024**3  # splits up to this size are held in memory for training


class SplitView:
    """Images and labels of a training split, addressed by index tensors: ``images, labels = view[idx]``.

    A split whose images fit in ``max_bytes`` is stacked in memory once (the synthetic set, VOC-2007 at 224 px);
    a larger one (COCO-2014) is read from its data set batch by batch, so training never holds it whole.
    """

    def __init__(self, dataset: Any, max_bytes: int | None = None):
        if isinstance(dataset, SplitView):
            self.dataset, self.images, self.labels = dataset.dataset, dataset.images, dataset.labels
            return
        self.dataset = dataset
        self.images = self.labels = None
        limit = IN_MEMORY_BYTES if max_bytes is None else max_bytes
        if len(dataset) and len(dataset) * dataset[0].image.numel() * 4 <= limit:
            self.images, self.labels = stack_split(dataset)

    def __len__(self) -> int:
        return len(self.dataset) if self.images is None else len(self.images)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def __getitem__(self, idx: Tensor | slice) -> tuple[Tensor, Tensor]:
        if self.images is not None:
            return self.images[idx], self.labels[idx]
        rows = range(len(self))[idx] if isinstance(idx, slice) else idx.tolist()
        samples = [self.dataset[i] for i in rows]
        return torch.stack([s.image for s in samples]), torch.stack([s.label for s in samples])


class AttributionDataset(torch.utils.data.Dataset):
    """Base class of the loaders. Subclasses fill ``classes``, ``image_ids`` and implement ``load``."""

    classes: list[str]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, root: str, split: str, image_size: int | None):
        self.root = str(root)
        self.split = split
        self.image_size = image_size
        self.image_ids: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        return self.load(self.image_ids[index])

    def load(self, image_id: str) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def content_files(self) -> list[tuple[str, Path]] | None:
        """Every file this split reads, as (name relative to the data set, path on disk), in a fixed order.

        The names do not depend on where the data set is stored. None (the default, for loaders that do not say)
        makes :meth:`fingerprint` fall back to the root path.
        """
        return None

    def fingerprint_options(self) -> dict[str, Any]:
        """Loader settings that change what the samples are, beyond split, size and classes (e.g. the VOC year)."""
        return {}

    def fingerprint(self, memo_dir: str | os.PathLike[str] | None = None) -> str:
        """A key of the split's content for caches (classifier checkpoints, masks, rows): 16 hex characters.

        A function of what the samples are, never of where the data set is stored: the loader type (its format),
        :meth:`fingerprint_options`, the split, the image size, the class names, the normalisation, the image ids
        in order, and the SHA-256 of every file the split reads (:meth:`content_files`: images, annotation
        XML/JSON, segmentation PNGs), each under its name relative to the data set. So a data set moved or copied
        elsewhere keeps its key, and changing one byte of one file changes it. Reading every file on every run
        would be slow for COCO and VOC, so the file digests are memoised by (absolute path, size, mtime_ns) in a
        small JSON file under the cache folder (:mod:`maskbench.datasets.digests`; ``memo_dir`` overrides the
        folder): a run re-reads only new or modified files. A loader that does not list its files
        (``content_files`` None) is keyed by its absolute root path instead, as before.
        """
        from .digests import file_digests, memo_file

        h = hashlib.sha256()
        meta = {
            "format": type(self).__name__,
            "options": self.fingerprint_options(),
            "split": self.split,
            "image_size": self.image_size,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        h.update(json.dumps(meta, sort_keys=True, default=str).encode())
        h.update(b"\0" + "\n".join(self.image_ids).encode() + b"\0")
        files = self.content_files()
        if files is None:
            h.update(f"root:{os.path.abspath(self.root)}".encode())
        else:
            digests = file_digests([p for _, p in files], memo_file(self.root, memo_dir))
            for (name, _), digest in zip(files, digests, strict=True):
                h.update(f"{name}\t{digest}\n".encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, "
            f"image_size={self.image_size}, images={len(self)}, classes={self.num_classes})"
        )


# name -> builder(root: str | None, split: str, image_size: int | None, **options) -> AttributionDataset
DATASETS: Registry = Registry("dataset")
