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
    "collate",
    "generate_synthetic",
]
