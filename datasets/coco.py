"""COCO loader (COCO-2014 instances by default) through pycocotools.

Reads an ``instances_<split>.json`` file (``info``, ``images`` with ``id``/``file_name``/``width``/``height``,
``categories``, ``annotations`` with ``image_id``/``category_id``/``bbox``/``segmentation``) and the JPEGs of
``image_dir``. Per image it returns a :class:`~maskbench.datasets.base.Sample`:

* ``image``: resized to ``image_size x image_size`` with antialiased bilinear filtering, **aspect ratio not
  kept**; ``image_size=None`` keeps the native size. ImageNet mean/std normalisation.
* ``label``: multi-hot over the categories, from **this image's annotations only** (crowd annotations
  included). An image without annotations gets an all-zero label. (The reference code called
  ``getCatIds(catIds=[...])`` with an empty list, which pycocotools answers with *every* category; that bug
  is deliberately not reproduced.)
* category ids (not contiguous in COCO) sorted ascending map to indices ``0..C-1``; ``classes`` are the
  category names in that order.
* ``class_masks``: per class the union of ``annToMask`` of its annotations (polygons, compressed and
  uncompressed RLE), resized nearest-neighbour. ``ignore`` is ``None`` (COCO has no void band).
* ``boxes``: ``bbox`` ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]`` scaled to the returned size;
  ``box_difficult`` is all False.
* ``image_id``: the file stem of ``file_name``.

Splits: any ``instances_<split>.json`` (``train2014``, ``val2014``), and the named subsets of the NeurIPS 2022
runs (:data:`DERIVED_SPLITS`), all seeded samples of the sorted image ids (:func:`~maskbench.datasets.base.
seeded_sample`, seed 0):

* ``train`` / ``val``: train2014 split 90/10. NN-Explainer trained its classifiers and Explainers on a 90/10
  split of train2014 whose JSON files were downloaded from a private server and cannot be regenerated, so ours
  is a seeded one (``val`` = a tenth of train2014, ``train`` = the rest).
* ``neurips-test``: 1,000 images of val2014, where the paper's mask metrics were computed (its script drew them
  with ``random.sample`` and no seed; every val2014 image when there are fewer).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO

from maskbench.core.errors import DataError

from .base import DATASETS, AttributionDataset, Sample, check_image_size, seeded_sample
from .download import how_to_download
from .voc import _root_from_env, image_to_tensor, load_rgb, output_size, resize_nearest, resize_rgb

# name -> (official split it is drawn from, what it keeps): "holdout" = a tenth, "rest" = the other nine tenths,
# an int = that many images
DERIVED_SPLITS: dict[str, tuple[str, str | int]] = {
    "train": ("train2014", "rest"),
    "val": ("train2014", "holdout"),
    "neurips-test": ("val2014", 1000),
}


def derived_ids(ids: list[str], keep: str | int) -> list[str]:
    """The image ids of a derived split (see :data:`DERIVED_SPLITS`) among the official split's ``ids``."""
    if isinstance(keep, int):
        return seeded_sample(ids, keep)
    held = seeded_sample(ids, max(1, round(len(ids) / 10)))
    return held if keep == "holdout" else sorted(set(ids) - set(held))


class COCODataset(AttributionDataset):
    """COCO instance annotations read with pycocotools (see the module docstring for conventions).

    Args:
        root: data folder; defaults below are relative to it.
        split: e.g. ``val2014``, or a derived split (``train``, ``val``, ``neurips-test``; see the module
            docstring) when no ``instances_<split>.json`` of that name exists.
        image_size: side of the returned square images (aspect ratio not kept); ``None`` = native size.
        ann_file: annotation json, default ``<root>/annotations/instances_<split>.json``.
        image_dir: folder that ``file_name`` is relative to, default ``<root>/<split>``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "val2014",
        image_size: int | None = 224,
        ann_file: str | os.PathLike[str] | None = None,
        image_dir: str | os.PathLike[str] | None = None,
    ):
        check_image_size(image_size)
        super().__init__(str(root), split, image_size)
        root_p = Path(root)
        if not root_p.exists():
            raise DataError(f"COCO data root not found: {root_p} (expected annotations/ and image folders); "
                            f"{how_to_download('coco', root_p)}.")
        source, keep = split, None
        if split in DERIVED_SPLITS and not (root_p / "annotations" / f"instances_{split}.json").is_file():
            source, keep = DERIVED_SPLITS[split]
        default_ann = root_p / "annotations" / f"instances_{source}.json"
        self.ann_file = Path(ann_file) if ann_file is not None else default_ann
        self.image_dir = Path(image_dir) if image_dir is not None else root_p / source
        if not self.ann_file.is_file():
            found = sorted(f.stem[len("instances_"):] for f in (root_p / "annotations").glob("instances_*.json"))
            derived = [d for d, (src, _) in DERIVED_SPLITS.items() if src in found and d not in found]
            raise DataError(
                f"COCO annotation file not found: {self.ann_file} (expected an instances_<split>.json). "
                f"Available splits: {', '.join(found + derived) if found else '(none)'}."
            )
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder not found: {self.image_dir}.")
        self.coco = self._load_coco(self.ann_file)

        cat_ids = sorted(self.coco.cats)
        if not cat_ids:
            raise DataError(f"COCO annotation file {self.ann_file} has no categories.")
        self.category_ids: list[int] = cat_ids
        self.cat_to_index = {cid: i for i, cid in enumerate(cat_ids)}
        self.classes = [str(self.coco.cats[cid].get("name", cid)) for cid in cat_ids]

        self._stem_to_img: dict[str, int] = {}
        for img_id in sorted(self.coco.imgs):
            info = self.coco.imgs[img_id]
            if "file_name" not in info:
                raise DataError(f"COCO annotation file {self.ann_file}: image id {img_id} has no file_name.")
            stem = Path(info["file_name"]).stem
            if stem in self._stem_to_img:
                raise DataError(
                    f"COCO annotation file {self.ann_file}: two images share the file stem {stem!r} "
                    f"(ids {self._stem_to_img[stem]} and {img_id}); stems must be unique ids."
                )
            self._stem_to_img[stem] = img_id
        if not self._stem_to_img:
            raise DataError(f"COCO annotation file {self.ann_file} lists no images.")
        self.image_ids = list(self._stem_to_img) if keep is None else derived_ids(list(self._stem_to_img), keep)

    def content_files(self) -> list[tuple[str, Path]]:
        """The annotation file, then every image of the split (named by its ``file_name``)."""
        files = [("annotations.json", self.ann_file)]
        for stem in self.image_ids:
            file_name = self.coco.imgs[self._stem_to_img[stem]]["file_name"]
            files.append((f"images/{file_name}", self.image_dir / file_name))
        return files

    @staticmethod
    def _load_coco(path: Path) -> COCO:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"Cannot read COCO annotation file {path}: {exc}.") from exc
        if not isinstance(data, dict):
            raise DataError(f"COCO annotation file {path} is not a json object.")
        missing = [k for k in ("images", "categories", "annotations") if k not in data]
        if missing:
            raise DataError(
                f"COCO annotation file {path} has no {', '.join(repr(m) for m in missing)} "
                "(expected an instances_*.json with images, categories and annotations)."
            )
        coco = COCO()
        coco.dataset = data
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
        except (KeyError, TypeError) as exc:
            raise DataError(f"Malformed COCO annotation file {path}: missing or bad field {exc}.") from exc
        return coco

    def load(self, image_id: str) -> Sample:
        if image_id not in self._stem_to_img:
            raise DataError(f"Image id {image_id!r} is not in {self.ann_file}.")
        coco_id = self._stem_to_img[image_id]
        info = self.coco.imgs[coco_id]
        path = self.image_dir / info["file_name"]
        image = load_rgb(path)
        native_wh = image.size
        if (info.get("width"), info.get("height")) != native_wh:
            raise DataError(
                f"{self.ann_file} gives image {info['file_name']} "
                f"size {info.get('width')}x{info.get('height')} "
                f"but the file {path} is {native_wh[0]}x{native_wh[1]}."
            )
        out_w, out_h = output_size(native_wh, self.image_size)
        sx, sy = out_w / native_wh[0], out_h / native_wh[1]

        c = len(self.classes)
        masks = np.zeros((c, native_wh[1], native_wh[0]), dtype=bool)
        label = torch.zeros(c, dtype=torch.float32)
        boxes: list[list[float]] = []
        box_labels: list[int] = []
        for ann in self.coco.imgToAnns.get(coco_id, []):
            ann_id = ann.get("id")
            cid = ann.get("category_id")
            if cid not in self.cat_to_index:
                raise DataError(
                    f"Annotation id {ann_id} in {self.ann_file} has category_id {cid!r}, "
                    f"which is not among the categories {self.category_ids}."
                )
            k = self.cat_to_index[cid]
            label[k] = 1.0
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise DataError(
                    f"Annotation id {ann_id} in {self.ann_file} has bbox {bbox!r}, expected [x, y, w, h]."
                )
            x, y, w, h = (float(v) for v in bbox)
            boxes.append([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
            box_labels.append(k)
            if "segmentation" not in ann:
                raise DataError(f"Annotation id {ann_id} in {self.ann_file} has no segmentation.")
            try:
                with warnings.catch_warnings():  # pycocotools + numpy 2: DeprecationWarning on every decode
                    warnings.simplefilter("ignore", DeprecationWarning)
                    m = self.coco.annToMask(ann)
            except Exception as exc:  # pycocotools raises assorted errors on malformed polygons/RLE
                raise DataError(
                    f"Cannot decode the segmentation of annotation id {ann_id} in {self.ann_file}: {exc!r}."
                ) from exc
            if m.shape != masks.shape[1:]:
                raise DataError(
                    f"Segmentation of annotation id {ann_id} in {self.ann_file} decodes to {m.shape}, "
                    f"expected {masks.shape[1:]} (the image's height x width)."
                )
            masks[k] |= m.astype(bool)

        class_masks = torch.from_numpy(np.ascontiguousarray(resize_nearest(masks, self.image_size)))
        return Sample(
            image=image_to_tensor(resize_rgb(image, self.image_size), self.mean, self.std),
            label=label,
            image_id=image_id,
            class_masks=class_masks,
            ignore=None,
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            box_labels=torch.tensor(box_labels, dtype=torch.long),
            box_difficult=torch.zeros(len(boxes), dtype=torch.bool),
        )


@DATASETS.register("coco", splits={"test": "neurips-test", "train": "train", "val": "val"})
def build_coco(
    root: str | os.PathLike[str] | None = None,
    split: str = "val2014",
    image_size: int | None = 224,
    **options: Any,
) -> COCODataset:
    """COCO (default val2014 instances); ``root`` defaults to ``$MASKBENCH_COCO_ROOT``."""
    return COCODataset(_root_from_env(root, "MASKBENCH_COCO_ROOT", "coco"), split, image_size, **options)
