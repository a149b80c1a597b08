"""maskbench.datasets: loaders for PASCAL VOC, COCO, ImageNet and the embedded synthetic data set.

Importing this package registers the builders ``voc``, ``coco``, ``imagenet``, ``synthetic``, ``synthetic-coco``
and ``synthetic-grid`` (2 x 2 grids of synthetic scenes, :mod:`maskbench.datasets.grid`) in :data:`DATASETS`;
:func:`build_dataset` builds one by name.
"""

from __future__ import annotations

from typing import Any

from .base import DATASETS, AttributionDataset, Batch, Sample, collate
from .coco import COCODataset
from .grid import GridDataset
from .imagenet import ImageNetDataset
from .synthetic import SYNTHETIC_CLASSES, SyntheticCOCODataset, SyntheticDataset, generate_synthetic
from .voc import VOC_CLASSES, VOCDataset


def build_dataset(name: str, **kwargs: Any) -> AttributionDataset:
    """``DATASETS.get(name)(**kwargs)``; an unknown name raises :class:`UnknownNameError`."""
    return DATASETS.get(name)(**kwargs)


def build_split(name: str, split: str, **kwargs: Any) -> AttributionDataset:
    """:func:`build_dataset` of one split, named by its role (``train``, ``val``, ``test``: mapped through the
    data set's registered ``splits``, e.g. COCO's test role is ``val2014``) or by its own name."""
    roles = DATASETS.meta(name).get("splits", {})
    return build_dataset(name, split=roles.get(split, split), **kwargs)


__all__ = [
    "DATASETS",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "AttributionDataset",
    "Batch",
    "COCODataset",
    "GridDataset",
    "ImageNetDataset",
    "Sample",
    "SyntheticCOCODataset",
    "SyntheticDataset",
    "VOCDataset",
    "build_dataset",
    "build_split",
    "collate",
    "generate_synthetic",
]
