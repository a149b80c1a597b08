"""PASCAL VOC loader (VOC2007 by default; any ``VOC<year>`` tree in the devkit layout works).

Reads the devkit layout exactly as distributed::

    VOCdevkit/VOC2007/
        JPEGImages/<id>.jpg            RGB image
        Annotations/<id>.xml           objects: name, difficult, bndbox (1-based inclusive pixel indices)
        SegmentationClass/<id>.png     palette PNG, pixel value = class index (0 background, 255 void)
        ImageSets/Segmentation/<split>.txt, ImageSets/Main/<split>.txt

Per image it returns a :class:`~maskbench.datasets.base.Sample`:

* ``image``: resized to ``image_size x image_size`` with antialiased bilinear filtering (PIL), **the aspect
  ratio is not kept** (as in the NeurIPS evaluation protocol); ``image_size=None`` keeps the native size.
  Normalised with the ImageNet mean/std.
* ``label``: multi-hot over ``classes`` from **all** objects of the XML, each class once. Objects marked
  ``difficult`` are included (an image-level classifier sees them; the benchmark does not drop them).
* ``class_masks`` (C, H, W) bool from the PNG (value ``k`` -> ``classes[k-1]``), resized with nearest
  neighbour; ``ignore`` = the PNG's 255 void band (never foreground). Both are ``None`` for an image
  without PNG, which is only possible with ``segmentation_only=False``.
* ``boxes``: VOC's 1-based inclusive ``xmin..xmax`` become continuous 0-based pixel-edge coordinates
  ``[xmin - 1, ymin - 1, xmax, ymax]`` (the box covers pixels ``xmin-1 .. xmax-1`` of the 0-based image),
  then are scaled to the returned image size.

The small image helpers at the bottom (:func:`load_rgb`, :func:`resize_nearest`, :func:`image_to_tensor`)
are shared with the COCO loader.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from maskbench.core.errors import DataError

from .base import DATASETS, AttributionDataset, Sample, check_image_size
from .download import RECORD, default_root, how_to_download

VOC_CLASSES: list[str] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

VOID_LABEL = 255


# --------------------------------------------------------------------------------------------------
# shared image helpers
# --------------------------------------------------------------------------------------------------


def load_rgb(path: Path) -> Image.Image:
    """Open an image file fully decoded as RGB; any missing/corrupt file raises :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"Image file not found: {path} (expected a JPEG image).")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"Cannot decode image {path}: {exc} (expected a valid JPEG image).") from exc


def resize_rgb(image: Image.Image, image_size: int | None) -> Image.Image:
    """Square resize with antialiased bilinear filtering (aspect ratio not kept); None keeps the size."""
    if image_size is None or image.size == (image_size, image_size):
        return image
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resizing (pixel-centre aligned)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def resize_nearest(array: np.ndarray, image_size: int | None) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes of ``array`` to ``image_size x image_size``."""
    if image_size is None:
        return array
    h, w = array.shape[-2:]
    if (h, w) == (image_size, image_size):
        return array
    yi = nearest_indices(h, image_size)
    xi = nearest_indices(w, image_size)
    return array[..., yi[:, None], xi[None, :]]


def image_to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], then normalised with ``mean``/``std``."""
    arr = np.asarray(image, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s


def output_size(native_wh: tuple[int, int], image_size: int | None) -> tuple[int, int]:
    """(width, height) of the returned image."""
    return native_wh if image_size is None else (image_size, image_size)


# --------------------------------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------------------------------


def _find_voc_dir(root: Path, year: str) -> Path:
    """Accept the folder containing ``VOCdevkit``, the ``VOCdevkit`` folder or ``VOC<year>`` itself."""
    if not root.exists():
        raise DataError(
            f"VOC data root not found: {root} (expected a folder containing VOCdevkit/VOC{year}); "
            f"{how_to_download('voc', root)}."
        )
    candidates = [root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root]
    for cand in candidates:
        if (cand / "ImageSets").is_dir() and (cand / "JPEGImages").is_dir():
            return cand
    searched = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"No VOC{year} folder (with ImageSets/ and JPEGImages/) found under {root}; searched: {searched}."
    )


def _xml_text(node: ET.Element, tag: str, path: Path, what: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"Malformed annotation {path}: {what} has no <{tag}>.")
    return child.text.strip()


def _xml_number(node: ET.Element, tag: str, path: Path, what: str) -> float:
    text = _xml_text(node, tag, path, what)
    try:
        return float(text)
    except ValueError:
        raise DataError(
            f"Malformed annotation {path}: <{tag}> of {what} is {text!r}, expected a number."
        ) from None


class VOCDataset(AttributionDataset):
    """PASCAL VOC in the devkit layout (see the module docstring for formats and conventions).

    Args:
        root: the folder containing ``VOCdevkit/``, the ``VOCdevkit`` folder or the ``VOC<year>`` folder.
        split: image list name (``train``, ``val``, ``trainval``, ``test``).
        image_size: side of the returned square images (aspect ratio not kept); ``None`` = native size.
        year: devkit year, e.g. ``"2007"`` or ``"2012"``.
        classes: class names; PNG value ``k`` means ``classes[k - 1]``.
        segmentation_only: read ``ImageSets/Segmentation/<split>.txt`` (every image has a PNG) instead of
            ``ImageSets/Main/<split>.txt`` (images without PNG get ``class_masks = ignore = None``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "test",
        image_size: int | None = 224,
        year: str = "2007",
        classes: Sequence[str] = VOC_CLASSES,
        segmentation_only: bool = True,
    ):
        check_image_size(image_size)
        super().__init__(str(root), split, image_size)
        self.year = str(year)
        self.classes = list(classes)
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"Duplicate class names in {self.classes}")
        self.class_to_index = {c: i for i, c in enumerate(self.classes)}
        self.segmentation_only = segmentation_only
        self.voc_dir = _find_voc_dir(Path(root), self.year)
        list_dir = self.voc_dir / "ImageSets" / ("Segmentation" if segmentation_only else "Main")
        list_file = list_dir / f"{split}.txt"
        if not list_file.is_file():
            available = sorted(p.stem for p in list_dir.glob("*.txt") if "_" not in p.stem)
            raise DataError(
                f"Image list not found: {list_file} (expected one image id per line). "
                f"Available splits: {', '.join(available) if available else '(none)'}."
            )
        ids = []
        for line in list_file.read_text().splitlines():
            line = line.strip()
            if line:
                ids.append(line.split()[0])
        if not ids:
            raise DataError(f"Image list {list_file} is empty (expected one image id per line).")
        self.image_ids = ids

    def content_files(self) -> list[tuple[str, Path]]:
        """Per image: its JPEG, XML annotation and segmentation PNG (absent PNGs count as absent)."""
        out = []
        for image_id in self.image_ids:
            for folder, ext in (("JPEGImages", "jpg"), ("Annotations", "xml"), ("SegmentationClass", "png")):
                name = f"{folder}/{image_id}.{ext}"
                out.append((name, self.voc_dir / name))
        return out

    def fingerprint_options(self) -> dict[str, Any]:
        return {"year": self.year, "segmentation_only": self.segmentation_only}

    # ---------------------------------------------------------------------------------------------
    def _parse_annotation(
        self, image_id: str, native_wh: tuple[int, int]
    ) -> tuple[list[int], list[list[float]], list[bool]]:
        path = self.voc_dir / "Annotations" / f"{image_id}.xml"
        if not path.is_file():
            raise DataError(f"Annotation file not found: {path} (expected a VOC XML annotation).")
        try:
            tree = ET.parse(path)
        except ET.ParseError as exc:
            raise DataError(f"Invalid XML in annotation {path}: {exc}.") from exc
        root = tree.getroot()
        if root.tag != "annotation":
            raise DataError(
                f"Malformed annotation {path}: root element is <{root.tag}>, expected <annotation>."
            )
        size = root.find("size")
        if size is not None and size.find("width") is not None and size.find("height") is not None:
            w = int(_xml_number(size, "width", path, "<size>"))
            h = int(_xml_number(size, "height", path, "<size>"))
            if (w, h) != native_wh:
                raise DataError(
                    f"Annotation {path} gives image size {w}x{h} "
                    f"but the JPEG is {native_wh[0]}x{native_wh[1]}."
                )
        labels: list[int] = []
        boxes: list[list[float]] = []
        difficult: list[bool] = []
        for k, obj in enumerate(root.findall("object")):
            what = f"object #{k + 1}"
            name = _xml_text(obj, "name", path, what)
            if name not in self.class_to_index:
                raise DataError(
                    f"Unknown class name {name!r} in annotation {path} ({what}). "
                    f"Valid class names: {', '.join(self.classes)}."
                )
            diff_node = obj.find("difficult")
            diff = False
            if diff_node is not None and diff_node.text is not None and diff_node.text.strip():
                try:
                    diff = bool(int(float(diff_node.text.strip())))
                except ValueError:
                    raise DataError(
                        f"Malformed annotation {path}: <difficult> of {what} is {diff_node.text!r}, "
                        "expected 0 or 1."
                    ) from None
            bnd = obj.find("bndbox")
            if bnd is None:
                raise DataError(f"Malformed annotation {path}: {what} ({name}) has no <bndbox>.")
            xmin, ymin, xmax, ymax = (_xml_number(bnd, t, path, f"{what} <bndbox>") for t in
                                      ("xmin", "ymin", "xmax", "ymax"))
            if xmax < xmin or ymax < ymin:
                raise DataError(
                    f"Malformed annotation {path}: {what} ({name}) has an empty box "
                    f"xmin={xmin} ymin={ymin} xmax={xmax} ymax={ymax}."
                )
            labels.append(self.class_to_index[name])
            boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
            difficult.append(diff)
        return labels, boxes, difficult

    def _load_segmentation(self, image_id: str, native_wh: tuple[int, int]) -> np.ndarray | None:
        path = self.voc_dir / "SegmentationClass" / f"{image_id}.png"
        if not path.is_file():
            if self.segmentation_only:
                raise DataError(
                    f"Segmentation file not found: {path} "
                    f"(the image is listed in ImageSets/Segmentation/{self.split}.txt)."
                )
            return None
        try:
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                arr = np.array(im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"Cannot decode segmentation PNG {path}: {exc}.") from exc
        if mode not in ("P", "L"):
            raise DataError(
                f"Segmentation {path} has mode {mode!r}; "
                "expected a palette ('P') PNG whose values are class indices."
            )
        if (arr.shape[1], arr.shape[0]) != native_wh:
            raise DataError(
                f"Segmentation {path} is {arr.shape[1]}x{arr.shape[0]} "
                f"but the JPEG is {native_wh[0]}x{native_wh[1]}."
            )
        values = np.unique(arr)
        bad = [int(v) for v in values if v > len(self.classes) and v != VOID_LABEL]
        if bad:
            raise DataError(
                f"Segmentation {path} contains values {bad}; expected 0 (background), 1..{len(self.classes)} "
                f"(classes) or {VOID_LABEL} (void)."
            )
        return arr

    def load(self, image_id: str) -> Sample:
        img_path = self.voc_dir / "JPEGImages" / f"{image_id}.jpg"
        image = load_rgb(img_path)
        native_wh = image.size
        out_w, out_h = output_size(native_wh, self.image_size)
        labels, boxes, difficult = self._parse_annotation(image_id, native_wh)
        seg = self._load_segmentation(image_id, native_wh)

        label = torch.zeros(len(self.classes), dtype=torch.float32)
        if labels:
            label[torch.tensor(sorted(set(labels)))] = 1.0
        box_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if len(boxes):
            scale = torch.tensor(
                [out_w / native_wh[0], out_h / native_wh[1], out_w / native_wh[0], out_h / native_wh[1]]
            )
            box_t = box_t * scale

        class_masks = ignore = None
        if seg is not None:
            seg = resize_nearest(seg, self.image_size)
            seg_t = torch.from_numpy(np.ascontiguousarray(seg)).long()
            class_masks = seg_t[None] == torch.arange(1, len(self.classes) + 1)[:, None, None]
            ignore = seg_t == VOID_LABEL

        return Sample(
            image=image_to_tensor(resize_rgb(image, self.image_size), self.mean, self.std),
            label=label,
            image_id=image_id,
            class_masks=class_masks,
            ignore=ignore,
            boxes=box_t,
            box_labels=torch.tensor(labels, dtype=torch.long),
            box_difficult=torch.tensor(difficult, dtype=torch.bool),
        )


def _root_from_env(root: str | os.PathLike[str] | None, env_var: str, name: str) -> str:
    """``root``, else ``$<env_var>``, else the folder ``maskbench download <name>`` fills by default."""
    if root is not None:
        return str(root)
    value = os.environ.get(env_var)
    if value:
        return value
    downloaded = default_root(name)
    if (downloaded / RECORD).is_file():
        return str(downloaded)
    raise DataError(
        f"No root given for the '{name}' dataset, {env_var} is not set and {downloaded} holds no download: pass "
        f"--data-root (root=...), set {env_var}, or {how_to_download(name)}."
    )


@DATASETS.register("voc")
def build_voc(
    root: str | os.PathLike[str] | None = None,
    split: str = "test",
    image_size: int | None = 224,
    **options: Any,
) -> VOCDataset:
    """PASCAL VOC (default VOC2007 test, segmentation subset).

    ``root`` defaults to ``$MASKBENCH_VOC_ROOT``; ``options`` go to :class:`VOCDataset`.
    """
    return VOCDataset(_root_from_env(root, "MASKBENCH_VOC_ROOT", "voc"), split, image_size, **options)
