"""ImageNet (ILSVRC-2012) validation images with their localisation boxes: the distribution-guided paper's data.

Single-label: each image's label is its one class (all of a validation image's boxes belong to it). Classes are
the 1,000 ILSVRC-2012 synsets in sorted WordNet-id order (``imagenet_synsets.txt``), the output order of
torchvision's ImageNet weights, whose category names label them. There is no segmentation: the segmentation
metrics are undefined (NaN, reported as undefined, never 0); the boxes serve M_I and the pointing game.

Layouts read (``root`` is the folder given with ``--data-root`` or ``$MASKBENCH_IMAGENET_ROOT``):

* images: ``val/ILSVRC2012_val_00000001.JPEG`` flat, or in class folders ``val/n01440764/...JPEG`` (the
  layout torchvision's ``ImageNet`` and most training scripts produce), or Kaggle's
  ``ILSVRC/Data/CLS-LOC/val/``;
* labels and boxes: the per-image XML of ``ILSVRC2012_bbox_val_v3.tgz`` (``val/*.xml`` next to the images,
  ``bbox_val/*.xml`` or Kaggle's ``ILSVRC/Annotations/CLS-LOC/val/*.xml``), or Kaggle's
  ``LOC_val_solution.csv`` (``ImageId,PredictionString`` with ``wnid xmin ymin xmax ymax`` repeated).

Boxes: the annotations give inclusive 0-based pixel indices; a box covers pixels ``xmin..xmax``, so it becomes the
pixel-edge box ``[xmin, ymin, xmax + 1, ymax + 1]``, scaled with the image like VOC's. Splits:

* ``val`` (every annotated validation image) and ``dgmp-test``, the distribution-guided paper's test set:
  "10,000 images randomly sampled from the validation set"; the paper does not list them, so ours is a seeded
  sample (``random.Random(0)`` over the sorted image ids; every image when there are fewer);
* ``train`` and ``train-holdout``, for the learned methods (the paper trains its mask predictor on the training
  set: "250,000 images sampled from the training set" for the feature filter, then 10 epochs): the training
  images in their class folders (``train/n01440764/n01440764_10026.JPEG``, or Kaggle's
  ``ILSVRC/Data/CLS-LOC/train/``), labelled by their folder, without boxes (the training boxes cover a fraction
  of the images and no metric reads them). ``train-holdout`` is a seeded sample of 10,000 training images (a
  tenth when there are fewer than 100,000), our validation split for the learned methods' model selection (the
  paper keeps the last epoch and names no validation set); ``train`` is the rest.

No download: the ImageNet licence requires a sign-in at image-net.org, so a missing root is an error that says
which files to put where.
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

from maskbench.core.errors import DataError
from maskbench.core.storage import stable_hash

from .base import DATASETS, AttributionDataset, Sample, check_image_size, seeded_sample
from .voc import image_to_tensor, load_rgb, output_size, resize_rgb

SYNSETS_FILE = Path(__file__).with_name("imagenet_synsets.txt")
DGMP_TEST_SIZE = 10_000
DGMP_TEST_SEED = 0
HOLDOUT_SIZE = 10_000  # train-holdout: this many training images, or a tenth of them when that is fewer
SPLITS = ("val", "dgmp-test", "train", "train-holdout")
HOW_TO = (
    "ImageNet cannot be downloaded by maskbench (its licence needs a sign-in at image-net.org). Put the "
    "ILSVRC-2012 validation images (ILSVRC2012_img_val.tar) into <root>/val/ (flat or in class folders) and "
    "their boxes (ILSVRC2012_bbox_val_v3.tgz) into <root>/val/ or <root>/bbox_val/ as *.xml, or use Kaggle's "
    "imagenet-object-localization-challenge layout (<root>/ILSVRC/Data/CLS-LOC/val/ and "
    "<root>/LOC_val_solution.csv); then pass --data-root <root> or set MASKBENCH_IMAGENET_ROOT."
)
HOW_TO_TRAIN = (
    "The learned methods train on the ILSVRC-2012 training images: put ILSVRC2012_img_train.tar's class folders "
    "into <root>/train/ (<root>/train/n01440764/n01440764_10026.JPEG ...), or use Kaggle's "
    "<root>/ILSVRC/Data/CLS-LOC/train/."
)


def synsets() -> list[str]:
    """The 1,000 ILSVRC-2012 WordNet ids in class-index order (sorted)."""
    return SYNSETS_FILE.read_text().split()


def category_names() -> list[str]:
    """Class names in index order: torchvision's ImageNet categories (``tench``, ``goldfish``, ...)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _image_dir(root: Path, folder: str = "val") -> Path:
    for cand in (root / folder, root / "ILSVRC" / "Data" / "CLS-LOC" / folder):
        if cand.is_dir():
            return cand
    if folder == "train":
        raise DataError(f"ImageNet training images not found under {root}. {HOW_TO_TRAIN}")
    raise DataError(f"ImageNet validation images not found under {root}. {HOW_TO}")


def _annotations(root: Path, image_dir: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """{image id: [(wnid, [xmin, ymin, xmax, ymax]) ...]} from the XML files or LOC_val_solution.csv."""
    csv_path = root / "LOC_val_solution.csv"
    if csv_path.is_file():
        out: dict[str, list[tuple[str, list[float]]]] = {}
        with open(csv_path, newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                parts = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not parts or len(parts) % 5:
                    raise DataError(f"{csv_path}:{n}: expected 'ImageId,PredictionString' with 'wnid xmin ymin "
                                    f"xmax ymax' repeated, got {row!r}.")
                out[row["ImageId"]] = [(parts[i], [float(v) for v in parts[i + 1 : i + 5]])
                                       for i in range(0, len(parts), 5)]
        return out
    for folder in (image_dir, root / "bbox_val", root / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"):
        files = sorted(folder.glob("*.xml")) if folder.is_dir() else []
        if files:
            return {p.stem: _parse_xml(p) for p in files}
    raise DataError(f"ImageNet validation boxes not found under {root} (no *.xml, no LOC_val_solution.csv). "
                    f"{HOW_TO}")


def _parse_xml(path: Path) -> list[tuple[str, list[float]]]:
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise DataError(f"Invalid XML in annotation {path}: {exc}.") from None
    objects = []
    for k, obj in enumerate(tree.getroot().findall("object")):
        name, box = obj.findtext("name"), obj.find("bndbox")
        if not name or box is None:
            raise DataError(f"Malformed annotation {path}: object #{k + 1} has no <name> or <bndbox>.")
        try:
            objects.append((name.strip(), [float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]))
        except (TypeError, ValueError):
            raise DataError(f"Malformed annotation {path}: object #{k + 1} has a box that is not 4 numbers."
                            ) from None
    return objects


class ImageNetDataset(AttributionDataset):
    """ILSVRC-2012 validation images, single-label, with boxes and no segmentation (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], split: str = "dgmp-test", image_size: int | None = 224):
        check_image_size(image_size)
        super().__init__(str(root), split, image_size)
        root_p = Path(root)
        if not root_p.is_dir():
            raise DataError(f"ImageNet data root not found: {root_p}. {HOW_TO}")
        if split not in SPLITS:
            raise DataError(f"Unknown ImageNet split {split!r}. Available splits: {', '.join(SPLITS)}.")
        self.synsets = synsets()
        self.classes = self.synsets
        self.class_to_index = {w: i for i, w in enumerate(self.synsets)}
        if split in ("train", "train-holdout"):
            self._init_train(root_p, split)
        else:
            self._init_val(root_p, split)

    def _init_train(self, root: Path, split: str) -> None:
        """Training images in class folders, labelled by the folder (no boxes)."""
        self.image_dir = _image_dir(root, "train")
        self.paths = {}
        for folder in sorted(p for p in self.image_dir.iterdir() if p.is_dir()):
            if folder.name not in self.class_to_index:
                raise DataError(f"ImageNet training folder {folder} is not one of the 1,000 ILSVRC-2012 synsets "
                                f"({SYNSETS_FILE.name}). {HOW_TO_TRAIN}")
            self.paths.update({p.stem: p for p in folder.glob("*.JPEG")})
        if not self.paths:
            raise DataError(f"No *.JPEG images in the class folders of {self.image_dir}. {HOW_TO_TRAIN}")
        self.objects = {i: [(p.parent.name, None)] for i, p in self.paths.items()}
        ids = sorted(self.paths)
        held = seeded_sample(ids, min(HOLDOUT_SIZE, len(ids) // 10) or 1, DGMP_TEST_SEED)
        self.image_ids = held if split == "train-holdout" else sorted(set(ids) - set(held))

    def _init_val(self, root: Path, split: str) -> None:
        self.image_dir = _image_dir(root)
        self.paths = {p.stem: p for p in self.image_dir.rglob("*.JPEG")}
        if not self.paths:
            raise DataError(f"No *.JPEG images in {self.image_dir}. {HOW_TO}")
        self.objects = _annotations(root, self.image_dir)
        missing = sorted(set(self.paths) - set(self.objects))
        if missing:
            raise DataError(f"{len(missing)} ImageNet image(s) have no annotation, e.g. {missing[0]} "
                            f"({self.paths[missing[0]]}). {HOW_TO}")
        for image_id in self.paths:
            for wnid, _ in self.objects[image_id]:
                if wnid not in self.class_to_index:
                    raise DataError(f"Unknown ImageNet class {wnid!r} in the annotation of {image_id}: not one of "
                                    f"the 1,000 ILSVRC-2012 synsets ({SYNSETS_FILE.name}).")
            folder = self.paths[image_id].parent
            if folder != self.image_dir and folder.name != self.objects[image_id][0][0]:
                raise DataError(f"{self.paths[image_id]} lies in class folder {folder.name} but its annotation says "
                                f"{self.objects[image_id][0][0]}.")
        ids = sorted(self.paths)
        self.image_ids = seeded_sample(ids, DGMP_TEST_SIZE, DGMP_TEST_SEED) if split == "dgmp-test" else ids

    def content_files(self) -> list[tuple[str, Path]] | None:
        folder = "train" if self.split.startswith("train") else "val"
        return [(f"{folder}/{i}.JPEG", self.paths[i]) for i in self.image_ids]

    def fingerprint_options(self) -> dict[str, Any]:
        return {"annotations": stable_hash([(i, self.objects[i]) for i in self.image_ids])}

    def load(self, image_id: str) -> Sample:
        image = load_rgb(self.paths[image_id])
        native_wh = image.size
        out_w, out_h = output_size(native_wh, self.image_size)
        objects = self.objects[image_id]
        cls = [self.class_to_index[w] for w, _ in objects]
        label = torch.zeros(len(self.classes), dtype=torch.float32)
        label[torch.tensor(sorted(set(cls)))] = 1.0
        boxes = torch.tensor([[x0, y0, x1 + 1.0, y1 + 1.0] for _, b in objects if b is not None
                              for x0, y0, x1, y1 in [b]], dtype=torch.float32).reshape(-1, 4)
        boxes = boxes * torch.tensor([out_w / native_wh[0], out_h / native_wh[1]] * 2)
        return Sample(
            image=image_to_tensor(resize_rgb(image, self.image_size), self.mean, self.std),
            label=label,
            image_id=image_id,
            boxes=boxes,
            box_labels=torch.tensor(cls[: len(boxes)], dtype=torch.long),
            box_difficult=torch.zeros(len(boxes), dtype=torch.bool),
        )


@DATASETS.register("imagenet", splits={"test": "dgmp-test", "train": "train", "val": "train-holdout"},
                   classifier="imagenet")
def build_imagenet(root: str | os.PathLike[str] | None = None, split: str = "dgmp-test",
                   image_size: int | None = 224, **options: Any) -> ImageNetDataset:
    """ImageNet validation (default: the distribution-guided paper's 10,000-image test set); ``root`` defaults to
    ``$MASKBENCH_IMAGENET_ROOT``."""
    if root is None:
        root = os.environ.get("MASKBENCH_IMAGENET_ROOT")
        if not root:
            raise DataError(f"No root given for the 'imagenet' dataset and MASKBENCH_IMAGENET_ROOT is not set. "
                            f"{HOW_TO}")
    return ImageNetDataset(root, split, image_size, **options)
