"""The embedded synthetic data set: procedurally generated multi-label scenes with exact ground truth.

In the spirit of BAM, CLEVR-XAI and FunnyBirds: because every pixel is drawn by the generator, the
segmentation of every object is known exactly, which the real data sets only approximate.

Scenes (``image_size`` x ``image_size``, default 64 px):

* **6 object classes** (:data:`SYNTHETIC_CLASSES`) that differ in shape, colour and texture: ``disc``
  (red-ish, solid with fine noise), ``square`` (blue-ish, stripes, random rotation), ``triangle``
  (green-ish, checker), ``ring`` (yellow-ish annulus, radial shading), ``cross`` (magenta-ish plus sign,
  dots) and ``star`` (cyan-ish five-pointed star, stripes). Each object's hue is the class hue plus a
  jitter of +-0.09 (hue circle = 1), with random saturation/value, so colour overlaps a little between
  neighbouring classes and shape/texture matter too. Object size (circumscribed diameter) is 15-35% of
  the image side.
* **1-3 objects** per image at random positions. Later objects occlude earlier ones; a placement is
  rejected (and retried, at most 40 times, then the object is skipped) if it would leave an earlier
  object with less than 15% of its area visible. All ground truth (masks, boxes, areas) follows what is
  visible. An object with less than 30% of its area visible is ``difficult=1``.
* **Cluttered backgrounds**: smooth random colour noise (bilinearly upsampled coarse grid) plus fine
  noise, and 1-3 thin lines and 0-2 small ellipses of random colours. Distractors are not objects and are
  in no ground truth.
* **Controlled co-occurrence** of ``cross`` and ``star`` (like cat/dog in VOC): whenever one of the two
  is chosen, the other is also placed with probability ``cooccurrence``. The measured conditional
  frequencies are stored in ``metadata.json``.

Written in the real formats, under ``out_dir``::

    VOCdevkit/VOC2007/JPEGImages/<id>.jpg            JPEG quality 95
    VOCdevkit/VOC2007/Annotations/<id>.xml           VOC schema; bndbox = visible extent, 1-based inclusive
    VOCdevkit/VOC2007/SegmentationClass/<id>.png     mode "P", VOC palette, 0 bg, 1..6 classes, 255 void
    VOCdevkit/VOC2007/ImageSets/{Main,Segmentation}/{train,val,test,trainval}.txt
    annotations/instances_{train,val,test}.json      COCO instances; category ids 1,3,5,7,9,11;
                                                     file_name relative to VOCdevkit/VOC2007/JPEGImages
    metadata.json                                    generator version, options, classes, statistics
    .complete                                        written last

The PNG's void band (255) is 1 pixel wide and lies on the *lower* side of every boundary: background
pixels 4-adjacent to an object, and pixels of an occluded object 4-adjacent to the object on top of it.
Object pixels on top are therefore never void. COCO segmentations are a polygon for an unoccluded polygon
shape (disc = 32-gon, square, triangle, cross, star; the mask is rasterised by pycocotools from the very
same rounded polygon, so the polygon decodes to exactly the drawn pixels) and an RLE (pycocotools
``mask.encode``, ``counts`` as str) for rings and occluded objects. The generation is written into a
temporary folder that is renamed to ``out_dir`` only when complete.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from maskbench.core.errors import DataError, InvalidOptionError

from .base import DATASETS, check_image_size
from .coco import COCODataset
from .digests import memo_dir
from .voc import VOCDataset

GENERATOR_VERSION = "1.1"

SYNTHETIC_CLASSES: list[str] = ["disc", "square", "triangle", "ring", "cross", "star"]
SYNTHETIC_CATEGORY_IDS: list[int] = [1, 3, 5, 7, 9, 11]  # deliberately not contiguous, like COCO
COOCCURRING_PAIR: tuple[str, str] = ("cross", "star")

# class -> (base hue in [0, 1), texture)
_STYLES: dict[str, tuple[float, str]] = {
    "disc": (0.00, "noise"),
    "square": (0.62, "stripes"),
    "triangle": (0.33, "checker"),
    "ring": (0.15, "radial"),
    "cross": (0.84, "dots"),
    "star": (0.50, "stripes"),
}
HUE_JITTER = 0.09
SIZE_RANGE = (0.3, 0.6)  # circumscribed diameter / image side
MAX_OBJECTS = 3
MIN_VISIBLE = 0.15  # placements leaving an earlier object less visible than this are rejected
DIFFICULT_VISIBLE = 0.30  # visible fraction below which an object is difficult
MAX_ATTEMPTS = 40
VOID = 255
SPLITS = ("train", "val", "test")


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (768 ints): bits of the index spread over the high bits of R, G, B."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.extend((r, g, b))
    return pal


# --------------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------------


@dataclass
class _Object:
    cls: int
    mask: np.ndarray  # full (unoccluded) mask
    polygon: list[float] | None  # flat [x0, y0, x1, y1, ...] if the shape is a single polygon
    geometry: tuple[float, float, float, float]  # cx, cy, r, theta
    area: int = field(init=False)

    def __post_init__(self) -> None:
        self.area = int(self.mask.sum())


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (S, S)."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)


@lru_cache(maxsize=64)
def _interp_matrix(size: int, k: int) -> np.ndarray:
    """(size, k) linear-interpolation weights from a k-point coarse grid to ``size`` pixels."""
    t = (np.arange(size) + 0.5) / size * (k - 1)
    i0 = np.minimum(np.floor(t).astype(int), k - 2)
    frac = t - i0
    w = np.zeros((size, k))
    w[np.arange(size), i0] = 1 - frac
    w[np.arange(size), i0 + 1] = frac
    return w


def _shape_polygon(name: str, cx: float, cy: float, r: float, theta: float) -> np.ndarray | None:
    """(n, 2) vertices of the shape inscribed in the circle (cx, cy, r); None for the ring."""
    if name == "disc":
        ang = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(ang), np.sin(ang)], 1)
    elif name == "square":
        ang = np.pi / 4 + np.arange(4) * np.pi / 2
        pts = np.stack([np.cos(ang), np.sin(ang)], 1)
    elif name == "triangle":
        ang = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(ang), np.sin(ang)], 1)
    elif name == "cross":
        a = 0.32  # half arm width / radius
        pts = np.array(
            [[a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1],
             [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a], [-a, -1]]
        ) / np.hypot(1, a)
    elif name == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    elif name == "ring":
        return None
    else:  # pragma: no cover - internal
        raise ValueError(name)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = pts @ rot.T * r + np.array([cx, cy])
    return np.round(pts, 2)


def _paint(img: np.ndarray, visible: np.ndarray, obj: _Object, rng: np.random.Generator) -> None:
    """Draw the class texture of ``obj`` on the ``visible`` pixels of ``img`` (in place)."""
    size = img.shape[0]
    cx, cy, r, theta = obj.geometry
    x0, x1 = max(0, int(cx - r) - 1), min(size, int(np.ceil(cx + r)) + 1)
    y0, y1 = max(0, int(cy - r) - 1), min(size, int(np.ceil(cy + r)) + 1)
    col = _texture(SYNTHETIC_CLASSES[obj.cls], rng, x0, x1, y0, y1, cx, cy, r, theta)
    win = visible[y0:y1, x0:x1]
    img[y0:y1, x0:x1][win] = col[win]


def _texture(name: str, rng: np.random.Generator, x0: int, x1: int, y0: int, y1: int, cx: float, cy: float,
             r: float, theta: float) -> np.ndarray:
    """(y1 - y0, x1 - x0, 3) colours of the class texture over the window [y0:y1, x0:x1]."""
    hue0, kind = _STYLES[name]
    hue = (hue0 + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.95), rng.uniform(0.6, 0.95)))
    dark = base * rng.uniform(0.35, 0.6)
    xx, yy = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
    shape = (y1 - y0, x1 - x0, 3)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    period = max(2.5, r * rng.uniform(0.35, 0.5))
    if kind == "noise":
        col = base + rng.normal(0.0, 0.06, shape)
    elif kind == "stripes":
        p = np.sin(2 * np.pi * u / period) > 0
        col = np.where(p[..., None], dark, base)
    elif kind == "checker":
        p = (np.floor(u / period) + np.floor(v / period)) % 2 == 1
        col = np.where(p[..., None], dark, base)
    elif kind == "dots":
        p = np.hypot(np.mod(u, period) - period / 2, np.mod(v, period) - period / 2) < 0.3 * period
        col = np.where(p[..., None], dark, base)
    else:  # radial shading
        t = np.clip(np.hypot(dx, dy) / max(r, 1e-6), 0, 1)
        col = base * (0.65 + 0.35 * np.cos(np.pi * (t - 0.75) * 2))[..., None]
    return col + rng.normal(0.0, 0.02, shape)


def _render_object(cls: int, rng: np.random.Generator, size: int) -> _Object:
    name = SYNTHETIC_CLASSES[cls]
    r = rng.uniform(*SIZE_RANGE) * size / 2
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    theta = rng.uniform(0, 2 * np.pi)
    poly = _shape_polygon(name, cx, cy, r, theta)
    if poly is None:  # ring
        xx, yy = _grid(size)
        d = np.hypot(xx - cx, yy - cy)
        mask = (d <= r) & (d >= 0.5 * r)
        flat = None
    else:
        flat = [float(v) for v in poly.reshape(-1)]
        rle = mask_utils.frPyObjects([flat], size, size)
        mask = mask_utils.decode(rle)[:, :, 0].astype(bool)
    return _Object(cls, mask, flat, (cx, cy, r, theta))


def _void_band(inst: np.ndarray) -> np.ndarray:
    """Pixels 4-adjacent to a pixel of higher depth (background = -1, later objects higher)."""
    v = np.zeros(inst.shape, dtype=bool)
    v[:-1, :] |= inst[1:, :] > inst[:-1, :]
    v[1:, :] |= inst[:-1, :] > inst[1:, :]
    v[:, :-1] |= inst[:, 1:] > inst[:, :-1]
    v[:, 1:] |= inst[:, :-1] > inst[:, 1:]
    return v


def _choose_classes(rng: np.random.Generator, cooccurrence: float) -> list[int]:
    """1-3 classes; a chosen cross/star brings its partner with probability ``cooccurrence``."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    pair = [SYNTHETIC_CLASSES.index(c) for c in COOCCURRING_PAIR]
    chosen: list[int] = []
    while len(chosen) < n:
        c = int(rng.integers(len(SYNTHETIC_CLASSES)))
        chosen.append(c)
        if c in pair:
            partner = pair[1 - pair.index(c)]
            if partner not in chosen and rng.random() < cooccurrence:
                chosen.append(partner)
                if len(chosen) > MAX_OBJECTS:  # make room: drop the oldest object that is not c/partner
                    drop = next((i for i, x in enumerate(chosen[:-2]) if x not in pair), 0)
                    chosen.pop(drop)
    return chosen


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    k = int(rng.integers(3, 7))
    coarse = rng.uniform(0.1, 0.9, (k, k, 3))
    grey = coarse.mean(-1, keepdims=True)
    coarse = grey + 0.6 * (coarse - grey)  # muted colours: objects stand out, but not by colour alone
    w = _interp_matrix(size, k)
    bg = np.tensordot(np.tensordot(w, coarse, axes=(1, 0)), w, axes=(1, 1)).transpose(0, 2, 1)
    bg += rng.normal(0.0, 0.03, (size, size, 3))
    img = Image.fromarray(np.clip(bg * 255 + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    width = max(1, size // 64)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0, x1, y1 = (float(t) for t in rng.uniform(0, size, 4))
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(t) for t in rng.integers(0, 256, 3)), width=width)
    for _ in range(int(rng.integers(0, 3))):
        rx, ry = rng.uniform(0.02, 0.06, 2) * size
        cx, cy = rng.uniform(0, size, 2)
        colour = tuple(int(t) for t in rng.integers(0, 256, 3))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
    return np.asarray(img, dtype=np.float64) / 255.0


@dataclass
class _SceneObject:
    cls: int
    visible: np.ndarray
    area: int
    polygon: list[float] | None  # set only when unoccluded
    difficult: bool
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive ends), 0-based, of the visible pixels


def _make_scene(index: int, seed: int, size: int, cooccurrence: float) -> tuple[np.ndarray, np.ndarray,
                                                                                 list[_SceneObject]]:
    """RGB uint8 image, class PNG (uint8) and the visible objects of image ``index``."""
    rng = np.random.default_rng([seed, index])
    img = _background(rng, size)
    inst = np.full((size, size), -1, dtype=np.int8)
    placed: list[_Object] = []
    for cls in _choose_classes(rng, cooccurrence):
        for _ in range(MAX_ATTEMPTS):
            obj = _render_object(cls, rng, size)
            if obj.area < 4:
                continue
            new = inst.copy()
            new[obj.mask] = len(placed)
            void = _void_band(new)
            ok = True
            for j, prev in enumerate(placed):
                vis = new == j
                if vis.sum() < MIN_VISIBLE * prev.area or not (vis & ~void).any():
                    ok = False
                    break
            if ok:
                inst = new
                placed.append(obj)
                break
    for j, obj in enumerate(placed):
        vis = inst == j
        _paint(img, vis, obj, rng)
    rgb = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)

    png = np.zeros((size, size), dtype=np.uint8)
    objects = []
    for j, obj in enumerate(placed):
        vis = inst == j
        png[vis] = obj.cls + 1
        n_vis = int(vis.sum())
        ys, xs = np.nonzero(vis)
        objects.append(
            _SceneObject(
                cls=obj.cls,
                visible=vis,
                area=n_vis,
                polygon=obj.polygon if n_vis == obj.area else None,
                difficult=n_vis < DIFFICULT_VISIBLE * obj.area,
                bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
            )
        )
    png[_void_band(inst)] = VOID
    return rgb, png, objects


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def _voc_xml(stem: str, size: int, objects: list[_SceneObject]) -> str:
    parts = [
        "<annotation>",
        "\t<folder>VOC2007</folder>",
        f"\t<filename>{stem}.jpg</filename>",
        "\t<source>",
        "\t\t<database>maskbench synthetic</database>",
        "\t\t<annotation>maskbench synthetic generator</annotation>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{size}</width>",
        f"\t\t<height>{size}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>1</segmented>",
    ]
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        parts += [
            "\t<object>",
            f"\t\t<name>{SYNTHETIC_CLASSES[o.cls]}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            f"\t\t<difficult>{int(o.difficult)}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x0 + 1}</xmin>",
            f"\t\t\t<ymin>{y0 + 1}</ymin>",
            f"\t\t\t<xmax>{x1}</xmax>",
            f"\t\t\t<ymax>{y1}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>\n")
    return "\n".join(parts)


def _coco_segmentation(o: _SceneObject) -> list[list[float]] | dict[str, Any]:
    if o.polygon is not None:
        return [o.polygon]
    rle = mask_utils.encode(np.asfortranarray(o.visible.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _options(n_train: int, n_val: int, n_test: int, image_size: int, seed: int, cooccurrence: float) -> dict:
    return {
        "n_train": int(n_train),
        "n_val": int(n_val),
        "n_test": int(n_test),
        "image_size": int(image_size),
        "seed": int(seed),
        "cooccurrence": float(cooccurrence),
    }


def _cooccurrence_stats(label_sets: list[set[int]]) -> dict[str, Any]:
    a, b = (SYNTHETIC_CLASSES.index(c) for c in COOCCURRING_PAIR)
    na, nb = COOCCURRING_PAIR
    has_a = np.array([a in s for s in label_sets], dtype=bool)
    has_b = np.array([b in s for s in label_sets], dtype=bool)

    def ratio(num: int, den: int) -> float | None:
        return round(num / den, 4) if den else None

    return {
        "pair": list(COOCCURRING_PAIR),
        f"images_with_{na}": int(has_a.sum()),
        f"images_with_{nb}": int(has_b.sum()),
        "images_with_both": int((has_a & has_b).sum()),
        f"P({nb}|{na})": ratio(int((has_a & has_b).sum()), int(has_a.sum())),
        f"P({na}|{nb})": ratio(int((has_a & has_b).sum()), int(has_b.sum())),
        f"P({nb}|not {na})": ratio(int((~has_a & has_b).sum()), int((~has_a).sum())),
        f"P({na}|not {nb})": ratio(int((has_a & ~has_b).sum()), int((~has_b).sum())),
    }


def _write_dataset(out: Path, options: dict[str, Any]) -> None:
    size, seed, cooc = options["image_size"], options["seed"], options["cooccurrence"]
    voc = out / "VOCdevkit" / "VOC2007"
    dirs = {k: voc / k for k in ("JPEGImages", "Annotations", "SegmentationClass")}
    extra = [voc / "ImageSets" / "Main", voc / "ImageSets" / "Segmentation", out / "annotations"]
    for d in [*dirs.values(), *extra]:
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    categories = [
        {"id": cid, "name": name, "supercategory": "shape"}
        for cid, name in zip(SYNTHETIC_CATEGORY_IDS, SYNTHETIC_CLASSES, strict=True)
    ]
    counts = {"train": options["n_train"], "val": options["n_val"], "test": options["n_test"]}
    split_ids: dict[str, list[str]] = {}
    label_sets: list[set[int]] = []
    n_objects_hist = [0] * (MAX_OBJECTS + 1)
    class_images = [0] * len(SYNTHETIC_CLASSES)
    n_difficult = n_polygons = n_rle = 0
    index = 0
    ann_id = 1
    for split in SPLITS:
        images, annotations, ids = [], [], []
        for _ in range(counts[split]):
            index += 1
            stem = f"{index:06d}"
            rgb, png, objects = _make_scene(index, seed, size, cooc)
            Image.fromarray(rgb).save(dirs["JPEGImages"] / f"{stem}.jpg", quality=95)
            seg = Image.frombytes("P", (size, size), png.tobytes())
            seg.putpalette(palette)
            seg.save(dirs["SegmentationClass"] / f"{stem}.png")
            (dirs["Annotations"] / f"{stem}.xml").write_text(_voc_xml(stem, size, objects))
            images.append({"id": index, "file_name": f"{stem}.jpg", "width": size, "height": size})
            for o in objects:
                x0, y0, x1, y1 = o.bbox
                segm = _coco_segmentation(o)
                n_polygons += isinstance(segm, list)
                n_rle += isinstance(segm, dict)
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": index,
                        "category_id": SYNTHETIC_CATEGORY_IDS[o.cls],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(o.area),
                        "iscrowd": 0,
                        "segmentation": segm,
                    }
                )
                ann_id += 1
            ids.append(stem)
            labels = {o.cls for o in objects}
            label_sets.append(labels)
            n_objects_hist[len(objects)] += 1
            n_difficult += sum(o.difficult for o in objects)
            for c in labels:
                class_images[c] += 1
        split_ids[split] = ids
        coco = {
            "info": {
                "description": f"maskbench synthetic scenes, {split} split",
                "version": GENERATOR_VERSION,
                "contributor": "maskbench.datasets.synthetic",
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        with open(out / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as f:
            json.dump(coco, f, separators=(",", ":"))
    split_ids["trainval"] = split_ids["train"] + split_ids["val"]
    for split, ids in split_ids.items():
        text = "".join(f"{i}\n" for i in ids)
        for sub in ("Main", "Segmentation"):
            (voc / "ImageSets" / sub / f"{split}.txt").write_text(text)

    metadata = {
        "generator": "maskbench.datasets.synthetic",
        "version": GENERATOR_VERSION,
        "options": options,
        "classes": SYNTHETIC_CLASSES,
        "coco_category_ids": dict(zip(SYNTHETIC_CLASSES, SYNTHETIC_CATEGORY_IDS, strict=True)),
        "cooccurring_pair": list(COOCCURRING_PAIR),
        "splits": {k: len(v) for k, v in split_ids.items()},
        "parameters": {
            "size_range": list(SIZE_RANGE),
            "hue_jitter": HUE_JITTER,
            "max_objects": MAX_OBJECTS,
            "min_visible_fraction": MIN_VISIBLE,
            "difficult_below_visible_fraction": DIFFICULT_VISIBLE,
            "void_band_px": 1,
            "jpeg_quality": 95,
        },
        "stats": {
            "images": len(label_sets),
            "objects_per_image": {str(k): v for k, v in enumerate(n_objects_hist)},
            "images_per_class": dict(zip(SYNTHETIC_CLASSES, class_images, strict=True)),
            "difficult_objects": n_difficult,
            "coco_polygon_segmentations": n_polygons,
            "coco_rle_segmentations": n_rle,
            "cooccurrence": _cooccurrence_stats(label_sets),
        },
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")


def generate_synthetic(
    out_dir: str | os.PathLike[str],
    *,
    n_train: int = 4800,
    n_val: int = 200,
    n_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    cooccurrence: float = 0.7,
    overwrite: bool = False,
) -> Path:
    """Generate the synthetic data set into ``out_dir`` (see the module docstring) and return its path.

    If ``out_dir`` already holds a complete data set generated with the same options and version it is
    returned as is; with other options a :class:`DataError` is raised unless ``overwrite``. A non-empty
    ``out_dir`` that is not a complete synthetic data set is also refused unless ``overwrite``.
    """
    _check_generator_options(n_train, n_val, n_test, image_size, seed, cooccurrence)
    options = _options(n_train, n_val, n_test, image_size, seed, cooccurrence)
    out = Path(out_dir)

    if out.exists() and not overwrite:
        if (out / ".complete").is_file():
            _check_existing(out, options)
            return out
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(
                f"{out} exists and is not a complete synthetic data set (no .complete marker); "
                "pass overwrite=True to replace it or choose another folder."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700; give the data set the usual folder permissions
    try:
        with warnings.catch_warnings():  # pycocotools + numpy 2: DeprecationWarning on every decode
            warnings.simplefilter("ignore", DeprecationWarning)
            _write_dataset(tmp, options)
        (tmp / ".complete").write_text(
            json.dumps({"version": GENERATOR_VERSION, "options_hash": options_hash(options)}) + "\n"
        )
        if out.exists():  # an empty folder, or overwrite=True: move the old one aside first
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                tmp.rename(out)
            except OSError:
                if (out / ".complete").is_file():  # a concurrent generation finished first
                    shutil.rmtree(tmp, ignore_errors=True)
                    _check_existing(out, options)
                    return out
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_generator_options(n_train: Any, n_val: Any, n_test: Any, image_size: Any, seed: Any,
                             cooccurrence: Any) -> None:
    """Refuse bad generator options (:class:`InvalidOptionError`, naming the value and the valid range)."""

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not is_int(n) or n < 0:
            raise InvalidOptionError(f"{name} must be an int >= 0, got {n!r}")
    if n_train + n_val + n_test < 1:
        raise InvalidOptionError("the synthetic data set needs at least one image (n_train + n_val + n_test >= 1), "
                                 f"got {n_train} + {n_val} + {n_test}")
    check_image_size(image_size if not isinstance(image_size, np.integer) else int(image_size),
                     "the synthetic resolution (image_size of generate_synthetic, resolution of the builders)")
    if not is_int(seed) or seed < 0:
        raise InvalidOptionError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(cooccurrence, bool) or not isinstance(cooccurrence, (int, float)) or not 0.0 <= cooccurrence <= 1.0:
        raise InvalidOptionError(f"cooccurrence must be a probability in [0, 1], got {cooccurrence!r}")


def _check_existing(out: Path, options: dict[str, Any]) -> None:
    meta_path = out / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"Cannot read {meta_path} of the synthetic data set: {exc}.") from exc
    if meta.get("version") != GENERATOR_VERSION or meta.get("options") != options:
        raise DataError(
            f"{out} holds a synthetic data set generated with version {meta.get('version')} and options "
            f"{meta.get('options')}, not version {GENERATOR_VERSION} with {options}; pass overwrite=True "
            "or choose another folder."
        )


def options_hash(options: dict[str, Any]) -> str:
    """Short hash of the generator options and version (names the cache folder)."""
    payload = json.dumps({"version": GENERATOR_VERSION, **options}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_synthetic_root(**options: Any) -> Path:
    """``<cache>/data/synthetic-<hash>`` for the given generator options (``_options`` keys), in the run's cache
    (:func:`~maskbench.datasets.digests.memo_dir`)."""
    return memo_dir() / "data" / f"synthetic-{options_hash(_options(**options))}"


# --------------------------------------------------------------------------------------------------
# data set classes and builders
# --------------------------------------------------------------------------------------------------


class SyntheticDataset(VOCDataset):
    """The synthetic data set read through the VOC loader (its ``VOCdevkit/VOC2007`` tree)."""

    def __init__(self, root: str | os.PathLike[str], split: str = "test", image_size: int | None = 64):
        super().__init__(
            root, split, image_size, year="2007", classes=SYNTHETIC_CLASSES, segmentation_only=True
        )


class SyntheticCOCODataset(COCODataset):
    """The synthetic data set read through the COCO loader (``annotations/instances_<split>.json``)."""

    def __init__(self, root: str | os.PathLike[str], split: str = "test", image_size: int | None = 64):
        root_p = Path(root)
        super().__init__(
            root_p,
            split,
            image_size,
            ann_file=root_p / "annotations" / f"instances_{split}.json",
            image_dir=root_p / "VOCdevkit" / "VOC2007" / "JPEGImages",
        )


def _prepare(
    root: str | os.PathLike[str] | None,
    builder: str,
    options: dict[str, Any],
    gen: dict[str, Any],
    generate: bool,
    image_size: int | None,
) -> Path:
    """Check every option, then find (or generate) the data: nothing is written before the options pass.

    No ``root``: the cached copy for ``gen``, generated on first use. A given ``root`` must hold a complete
    synthetic data set; it is generated there only with ``generate=True`` (``maskbench generate-synthetic``).
    """
    if options:
        raise TypeError(
            f"{builder}() got unexpected options {sorted(options)}; valid: root, split, image_size, "
            "n_train, n_val, n_test, resolution, seed, cooccurrence, generate."
        )
    check_image_size(image_size)
    _check_generator_options(**gen)
    if not isinstance(generate, bool):
        raise InvalidOptionError(f"generate must be True or False, got {generate!r}")
    if root is None:
        path = default_synthetic_root(**gen)
        if not (path / ".complete").is_file():
            generate_synthetic(path, **gen)
        return path
    path = Path(root)
    if (path / ".complete").is_file():
        return path
    if generate:
        return generate_synthetic(path, **gen)
    how = (f"write one with `maskbench generate-synthetic --out {path}` (or pass generate=True to the builder), "
           "or give no data root to use the copy generated in the cache")
    if not path.exists():
        raise DataError(f"Synthetic data root not found: {path} (expected a synthetic data set folder with a "
                        f".complete marker); {how}.")
    raise DataError(f"{path} is not a complete synthetic data set (expected VOCdevkit/, annotations/ and a .complete "
                    f"marker, as written by the generator); {how}.")


def _native_resolution(path: Path, default: int) -> int:
    """The resolution a data set on disk was generated at (its metadata), so it is not resized by default."""
    try:
        return int(json.loads((path / "metadata.json").read_text())["options"]["image_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return default


@DATASETS.register("synthetic")
def build_synthetic(
    root: str | os.PathLike[str] | None = None,
    split: str = "test",
    image_size: int | None = None,
    n_train: int = 4800,
    n_val: int = 200,
    n_test: int = 200,
    resolution: int = 64,
    seed: int = 0,
    cooccurrence: float = 0.7,
    generate: bool = False,
    **options: Any,
) -> SyntheticDataset:
    """The embedded synthetic set (VOC format), generated into the cache on first use.

    ``root`` None -> ``<cache>/data/synthetic-<hash of options>``, generated there if missing. A given ``root``
    must hold a complete synthetic data set, read as is (a missing or incomplete one is a :class:`DataError`);
    ``generate=True`` generates it there first. ``image_size`` None -> the resolution the data was generated at;
    otherwise an int in [16, 4096]. Every option is checked before anything is written.
    """
    gen = dict(n_train=n_train, n_val=n_val, n_test=n_test, image_size=resolution, seed=seed,
               cooccurrence=cooccurrence)
    path = _prepare(root, "build_synthetic", options, gen, generate, image_size)
    size = image_size if image_size is not None else _native_resolution(path, resolution)
    return SyntheticDataset(path, split, size)


@DATASETS.register("synthetic-coco")
def build_synthetic_coco(
    root: str | os.PathLike[str] | None = None,
    split: str = "test",
    image_size: int | None = None,
    n_train: int = 4800,
    n_val: int = 200,
    n_test: int = 200,
    resolution: int = 64,
    seed: int = 0,
    cooccurrence: float = 0.7,
    generate: bool = False,
    **options: Any,
) -> SyntheticCOCODataset:
    """The same synthetic images and objects read through the COCO loader (options as :func:`build_synthetic`)."""
    gen = dict(n_train=n_train, n_val=n_val, n_test=n_test, image_size=resolution, seed=seed,
               cooccurrence=cooccurrence)
    path = _prepare(root, "build_synthetic_coco", options, gen, generate, image_size)
    size = image_size if image_size is not None else _native_resolution(path, resolution)
    return SyntheticCOCODataset(path, split, size)
