"""``maskbench paper-smoke`` (``make paper-smoke``): the papers' settings driven end to end on this machine.

What users bring (VOC-2007, COCO-2014 and ImageNet, VGG-16 and ResNet-50, the ``paper`` presets) cannot be
downloaded here, so this run writes it: the synthetic generator's scenes at 224 px become

* a VOC-2007 tree (``VOCdevkit/VOC2007``: JPEGs, XML annotations, palette segmentation PNGs, ImageSets lists),
  packed as the two official tar files;
* a COCO-2014 tree (``instances_{train,val}2014.json`` with the 80 real categories and ids, ``COCO_val2014_...``
  file names, polygon and RLE segmentations), packed as the three official zip files;
* an ILSVRC-2012 tree (flat ``val/*.JPEG`` with the per-image XML of the bbox tarball, and ``train/<wnid>/``
  class folders),

with real class names: the six synthetic shapes take the names (and COCO ids, ImageNet synsets) of six real
classes (:data:`REAL_NAMES`). The VOC and COCO archives are served over a loopback HTTP server and fetched with
the real download code (resumable download, checksums, atomic extraction into the run's cache, where the loaders
find them with no ``--data-root``). Then every built-in method runs at its ``paper`` preset on the three published
settings (VGG-16 on VOC, ResNet-50 on COCO, ResNet-50 on ImageNet), with

* the classifiers built **without pretrained weights** (``--classifier-param pretrained_backbone=False``) and
  trained for a few steps where the setting trains one (VOC, COCO);
* every method's iteration and step counts capped with ``--param`` (:data:`CAPS`): RISE's masks, EP's and MP's
  iterations, iGOS++'s iterations and integration steps, SmoothGrad's samples, IG's steps, the learned methods'
  optimiser steps (the Explainer is the DeepLabV3-ResNet-50 of the paper preset and trains two steps);
* a few images at a reduced size (``--image-size``, default 64 px; the trees are 224 px and the loaders resize
  them): the metrics' insertion and deletion curves take one forward pass per image row, which at 224 px on
  two CPU cores would take hours.

Every table, the deviations list and the reproduction report (published values beside ours, headed "Not the
published run") are written under ``<results>/<dataset>/<run>/``, with ``SMOKE.md`` at the top.
**Its numbers mean nothing** (random-weight classifiers on six shapes, a few images, capped iterations): it
proves that nothing on the path from the archives to the reproduction report is untested.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskbench.core.storage import atomic_write
from maskbench.datasets import VOC_CLASSES, generate_synthetic
from maskbench.datasets.imagenet import synsets
from maskbench.datasets.synthetic import SYNTHETIC_CLASSES

from .config import DEFAULT_METHODS, RunConfig

# The real classes the six synthetic shapes stand for: VOC name, COCO (id, name), ImageNet synset. The VOC and
# COCO table classes (bottle, car, cat, dog, person) are among them.
REAL_NAMES: dict[str, tuple[str, tuple[int, str], str]] = {
    "disc": ("person", (1, "person"), "n01440764"),  # tench
    "square": ("car", (3, "car"), "n02102040"),  # English springer
    "triangle": ("cat", (17, "cat"), "n02979186"),  # cassette player
    "ring": ("dog", (18, "dog"), "n03000684"),  # chain saw
    "cross": ("bottle", (44, "bottle"), "n03028079"),  # church
    "star": ("aeroplane", (5, "airplane"), "n03394916"),  # French horn
}

# The 80 COCO-2014 categories (id, name, supercategory), as instances_*2014.json lists them.
_COCO = """1 person person|2 bicycle vehicle|3 car vehicle|4 motorcycle vehicle|5 airplane vehicle|6 bus vehicle|
7 train vehicle|8 truck vehicle|9 boat vehicle|10 traffic_light outdoor|11 fire_hydrant outdoor|13 stop_sign outdoor|
14 parking_meter outdoor|15 bench outdoor|16 bird animal|17 cat animal|18 dog animal|19 horse animal|20 sheep animal|
21 cow animal|22 elephant animal|23 bear animal|24 zebra animal|25 giraffe animal|27 backpack accessory|
28 umbrella accessory|31 handbag accessory|32 tie accessory|33 suitcase accessory|34 frisbee sports|35 skis sports|
36 snowboard sports|37 sports_ball sports|38 kite sports|39 baseball_bat sports|40 baseball_glove sports|
41 skateboard sports|42 surfboard sports|43 tennis_racket sports|44 bottle kitchen|46 wine_glass kitchen|
47 cup kitchen|48 fork kitchen|49 knife kitchen|50 spoon kitchen|51 bowl kitchen|52 banana food|53 apple food|
54 sandwich food|55 orange food|56 broccoli food|57 carrot food|58 hot_dog food|59 pizza food|60 donut food|
61 cake food|62 chair furniture|63 couch furniture|64 potted_plant furniture|65 bed furniture|
67 dining_table furniture|70 toilet furniture|72 tv electronic|73 laptop electronic|74 mouse electronic|
75 remote electronic|76 keyboard electronic|77 cell_phone electronic|78 microwave appliance|79 oven appliance|
80 toaster appliance|81 sink appliance|82 refrigerator appliance|84 book indoor|85 clock indoor|86 vase indoor|
87 scissors indoor|88 teddy_bear indoor|89 hair_drier indoor|90 toothbrush indoor"""
COCO_CATEGORIES: list[dict[str, Any]] = [
    {"id": int(i), "name": n.replace("_", " "), "supercategory": s}
    for i, n, s in (e.split() for e in _COCO.replace("\n", "").split("|"))
]

# (data set, classifier, images): VGG-16's forward passes cost four ResNet-50 ones, so its setting explains one image
SETTINGS: tuple[tuple[str, str, int], ...] = (("voc", "vgg16", 1), ("coco", "resnet50", 2), ("imagenet", "resnet50", 2))

# Iteration and step counts capped (scoped to each method: every other hyperparameter is the paper preset's).
_LEARNED_CAP = {"max_steps": 2, "batch_size": 2, "checkpoint_every": None}
CAPS: dict[str, Any] = {
    "rise.num_masks": 8,
    "extremal-perturbation.max_iter": 2,
    "meaningful-perturbation.max_iter": 2,
    "igos++.iterations": 1,
    "igos++.ig_iter": 2,
    "smoothgrad.samples": 2,
    "integrated-gradients.steps": 2,
    **{f"{m}.{k}": v for m in ("explainer", "rtis", "dgmp-bf", "dgmp-cf", "dgmp-cf-ft")
       for k, v in _LEARNED_CAP.items()},
    **{f"{m}.filter_images": 4 for m in ("dgmp-bf", "dgmp-cf", "dgmp-cf-ft")},  # two filter steps of 2
    "dgmp-cf-ft.ft_points": 3,
    "pretrained_backbone": False,  # the Explainer's and RTIS's ResNet-50 backbones: no ImageNet weights here
}
CLASSIFIER_CAPS: dict[str, Any] = {"pretrained_backbone": False, "epochs": 2, "batch_size": 4}  # VOC, COCO: trained
IMAGENET_CLASSIFIER_CAPS: dict[str, Any] = {"pretrained_backbone": False}  # torchvision's ImageNet head, untrained
TABLE_CLASSES = {"voc": ["person"], "coco": ["person"], "imagenet": []}  # keeps the (image, class) pairs few

NOTICE = """# paper-smoke: these numbers mean nothing

This folder was written by `maskbench paper-smoke` (`make paper-smoke`). It drives the real code paths of the
papers' settings (VOC-2007, COCO-2014 and ImageNet formats, fetched through `maskbench download` from a loopback
server; VGG-16 and ResNet-50; every method at its `paper` preset) on this machine, on trees written from the
synthetic generator, with classifiers built **without pretrained weights**, a few images at {size} px and every
method's iterations capped:

{caps}

It proves that nothing on the path from the archives to the tables and the reproduction report is untested. Its
values are no measurement of anything.
"""


# -- the trees ---------------------------------------------------------------------------------------------------
def _remap_voc(src: Path, dst: Path) -> None:
    """The synthetic VOC tree with real VOC class names: XML names and segmentation PNG indices remapped."""
    shutil.copytree(src / "VOCdevkit", dst / "VOCdevkit")
    voc = dst / "VOCdevkit" / "VOC2007"
    for xml in (voc / "Annotations").glob("*.xml"):
        text = xml.read_text()
        for shape, (name, _, _) in REAL_NAMES.items():
            text = text.replace(f"<name>{shape}</name>", f"<name>{name}</name>")
        xml.write_text(text)
    lut = np.arange(256, dtype=np.uint8)
    for k, shape in enumerate(SYNTHETIC_CLASSES):
        lut[k + 1] = VOC_CLASSES.index(REAL_NAMES[shape][0]) + 1
    for png in (voc / "SegmentationClass").glob("*.png"):
        img = Image.open(png)
        palette = img.getpalette()
        out = Image.fromarray(lut[np.asarray(img)], mode="P")
        out.putpalette(palette)
        out.save(png)


def _coco_json(src: Path, splits: list[str]) -> dict[str, Any]:
    """The synthetic COCO annotations of ``splits`` merged, with the 80 real categories and COCO file names."""
    cat = {c["id"]: REAL_NAMES[c["name"]][1][0] for c in json.loads(
        (src / "annotations" / f"instances_{splits[0]}.json").read_text())["categories"]}
    images, annotations = [], []
    for split in splits:
        data = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        images += data["images"]
        annotations += [{**a, "category_id": cat[a["category_id"]]} for a in data["annotations"]]
    return {"info": {"description": "maskbench paper-smoke (synthetic scenes in COCO-2014 format)"},
            "licenses": [], "images": images, "annotations": annotations, "categories": COCO_CATEGORIES}


def _write_coco(src: Path, dst: Path) -> None:
    """train2014 = the synthetic train and val splits, val2014 = the synthetic test split."""
    jpegs = src / "VOCdevkit" / "VOC2007" / "JPEGImages"
    for official, splits in (("train2014", ["train", "val"]), ("val2014", ["test"])):
        data = _coco_json(src, splits)
        (dst / official).mkdir(parents=True)
        for im in data["images"]:
            name = f"COCO_{official}_{im['id']:012d}.jpg"
            shutil.copy(jpegs / im["file_name"], dst / official / name)
            im["file_name"] = name
        (dst / "annotations").mkdir(parents=True, exist_ok=True)
        (dst / "annotations" / f"instances_{official}.json").write_text(json.dumps(data))


def _write_imagenet(src: Path, dst: Path) -> None:
    """Validation = the synthetic test split (flat JPEGs, per-image XML, 0-based inclusive boxes), training = the
    synthetic train and val splits in class folders. Single-label: an image takes the class of its largest
    object, and only that class's boxes."""
    jpegs = src / "VOCdevkit" / "VOC2007" / "JPEGImages"
    wnids = set(synsets())
    for official, splits in (("train", ["train", "val"]), ("val", ["test"])):
        for split in splits:
            data = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
            names = {c["id"]: c["name"] for c in data["categories"]}
            anns: dict[int, list[dict[str, Any]]] = {}
            for a in data["annotations"]:
                anns.setdefault(a["image_id"], []).append(a)
            for im in data["images"]:
                objs = anns.get(im["id"], [])
                if not objs:
                    continue
                main = max(objs, key=lambda a: a["area"])
                wnid = REAL_NAMES[names[main["category_id"]]][2]
                assert wnid in wnids
                if official == "train":
                    folder = dst / "train" / wnid
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.copy(jpegs / im["file_name"], folder / f"{wnid}_{im['id']}.JPEG")
                    continue
                stem = f"ILSVRC2012_val_{im['id']:08d}"
                (dst / "val").mkdir(parents=True, exist_ok=True)
                shutil.copy(jpegs / im["file_name"], dst / "val" / f"{stem}.JPEG")
                boxes = "".join(
                    f"<object><name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0"
                    f"</difficult><bndbox><xmin>{round(x)}</xmin><ymin>{round(y)}</ymin><xmax>{round(x + w) - 1}"
                    f"</xmax><ymax>{round(y + h) - 1}</ymax></bndbox></object>"
                    for a in objs if a["category_id"] == main["category_id"] for x, y, w, h in [a["bbox"]])
                (dst / "val" / f"{stem}.xml").write_text(
                    f"<annotation><folder>val</folder><filename>{stem}</filename><source><database>ILSVRC_2012"
                    f"</database></source><size><width>{im['width']}</width><height>{im['height']}</height>"
                    f"<depth>3</depth></size><segmented>0</segmented>{boxes}</annotation>")


def write_trees(out: Path, n_train: int = 16, n_val: int = 4, n_test: int = 4, size: int = 224) -> dict[str, Path]:
    """VOC-2007, COCO-2014 and ILSVRC-2012 trees from the synthetic generator at ``size`` px (see the module
    docstring); returns their roots."""
    src = generate_synthetic(out / "synthetic", n_train=n_train, n_val=n_val, n_test=n_test, image_size=size,
                             seed=0)
    roots = {name: out / name for name in ("voc", "coco", "imagenet")}
    for root in roots.values():
        if root.exists():
            shutil.rmtree(root)
    _remap_voc(src, roots["voc"])
    _write_coco(src, roots["coco"])
    _write_imagenet(src, roots["imagenet"])
    return roots


# -- the official archive files, and a loopback server for them --------------------------------------------------
def tar_bytes(members: dict[str, Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for arcname, path in sorted(members.items()):
            t.add(path, arcname=arcname)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in sorted(members.items()):
            z.writestr(name, data)
    return buf.getvalue()


def voc_archives(root: Path) -> dict[str, bytes]:
    """A VOC tree (``root/VOCdevkit/VOC2007``) split as the official archives are: the test images and lists in
    the test tar, the rest in the trainval tar, both rooted at ``VOCdevkit/VOC2007``."""
    voc = root / "VOCdevkit" / "VOC2007"
    test_ids = set((voc / "ImageSets" / "Main" / "test.txt").read_text().split())
    trainval, test = {}, {}
    for path in voc.rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        is_test = path.stem in test_ids or path.name == "test.txt"
        (test if is_test else trainval)[rel] = path
    return {"VOCtrainval_06-Nov-2007.tar": tar_bytes(trainval), "VOCtest_06-Nov-2007.tar": tar_bytes(test)}


def coco_archives(root: Path) -> dict[str, bytes]:
    """A COCO-2014 tree (``annotations/instances_*2014.json``, ``train2014/``, ``val2014/``) as the official zips."""
    out = {f"{s}.zip": zip_bytes({f"{s}/{p.name}": p.read_bytes() for p in sorted((root / s).iterdir())})
           for s in ("train2014", "val2014")}
    out["annotations_trainval2014.zip"] = zip_bytes(
        {f"annotations/{p.name}": p.read_bytes() for p in sorted((root / "annotations").glob("*.json"))})
    return out


def md5sums(archives: dict[str, bytes], path: Path, wrong: str | None = None) -> Path:
    """An ``md5sum`` file of the archives (``wrong``: that archive's sum is made bad, for tests)."""
    lines = [f"{'0' * 32 if name == wrong else hashlib.md5(data).hexdigest()}  {name}"
             for name, data in archives.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with HTTP Range support; ``server.drop[name] = n`` cuts the next response of
    ``name`` after ``n`` bytes (a killed download); every request is logged as (name, Range header)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        name = self.path.lstrip("/")
        data = self.server.files.get(name)  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        self.server.log.append((name, rng))  # type: ignore[attr-defined]
        if data is None:
            self.send_error(404)
            return
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start >= len(data):
            self.send_response(416)
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = self.server.drop.pop(name, None)  # type: ignore[attr-defined]
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def archive_server() -> Iterator[http.server.ThreadingHTTPServer]:
    """A loopback HTTP server (``.url``) serving the bytes of ``.files`` by name, with Range requests."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.drop, srv.log = {}, {}, []  # type: ignore[attr-defined]
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


# -- the run -----------------------------------------------------------------------------------------------------
@dataclass
class SmokeResult:
    runs: dict[str, Any] = field(default_factory=dict)  # "<model>-<dataset>" -> RunResult
    seconds: dict[str, float] = field(default_factory=dict)


def run_smoke(work: Path, results: Path, *, limit: int | None = None, image_size: int = 64, progress: bool = False,
              log: Callable[[str], None] = print) -> SmokeResult:
    """Write the trees, serve and download the archives into ``work/cache``, run the three published settings at
    the ``paper`` preset with :data:`CAPS`; tables and reports go under ``results``. ``limit``: images per
    setting (default: :data:`SETTINGS`'s)."""
    from maskbench.datasets.digests import using_memo_dir
    from maskbench.datasets.download import download

    from .runner import run

    out = SmokeResult()
    t0 = time.perf_counter()
    cache = work / "cache"
    roots = write_trees(work / "trees")
    out.seconds["trees"] = round(time.perf_counter() - t0, 2)
    # the downloads go where the loaders look: <cache>/data/<dataset>
    with using_memo_dir(cache), archive_server() as srv:
        for dataset, archives in (("voc", voc_archives(roots["voc"])), ("coco", coco_archives(roots["coco"]))):
            t = time.perf_counter()
            srv.files.update(archives)  # type: ignore[attr-defined]
            sums = md5sums(archives, work / f"{dataset}.md5")
            download(dataset, cache / "data" / dataset, mirror=srv.url, checksums=sums,  # type: ignore[attr-defined]
                     archive_dir=work / "archives" / dataset, progress=progress, log=log)
            out.seconds[f"download-{dataset}"] = round(time.perf_counter() - t, 2)
    for dataset, model, images in SETTINGS:
        t = time.perf_counter()
        clf_caps = IMAGENET_CLASSIFIER_CAPS if dataset == "imagenet" else CLASSIFIER_CAPS
        config = RunConfig(
            dataset=dataset, model=model, methods=list(DEFAULT_METHODS), preset="paper", limit=limit or images,
            image_size=image_size, cache_dir=str(cache), results_dir=str(results),
            data_root=str(roots["imagenet"]) if dataset == "imagenet" else None,
            method_params=dict(CAPS), classifier_params=dict(clf_caps),
            table_classes=TABLE_CLASSES[dataset], progress=progress, threads="auto",
        )
        result = run(config)
        caps = "\n".join(f"- `{k}={v}`" for k, v in {**CAPS, **{f"classifier.{k}": v for k, v in
                                                                  clf_caps.items()}}.items())
        atomic_write(result.run_dir / "SMOKE.md", NOTICE.format(size=image_size, caps=caps))
        out.runs[f"{model}-{dataset}"] = result
        out.seconds[f"{model}-{dataset}"] = round(time.perf_counter() - t, 2)
        log(f"paper-smoke: {model}-{dataset} at preset paper: {len(result.summaries)} methods, "
            f"{result.failed} failed pairs, {out.seconds[f'{model}-{dataset}']:.1f} s -> {result.run_dir}")
    out.seconds["total"] = round(time.perf_counter() - t0, 2)
    return out
