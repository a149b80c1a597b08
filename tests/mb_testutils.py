"""Shared helpers for the tests: a tiny frozen classifier and hand-made batches with known answers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from maskbench.classifiers import SmallCNN, freeze
from maskbench.core.registry import Registry
from maskbench.datasets.base import Batch


def tiny_model(num_classes: int = 4, seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, widths=(4, 8, 8, 8))
    # non-trivial BatchNorm statistics so eval() differs from train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return freeze(model)


def make_batch(
    labels: list[list[int]],
    class_masks: torch.Tensor,
    ignore: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    num_classes: int = 4,
) -> Batch:
    """A batch from explicit per-class masks (B, C, H, W); ``labels`` lists each image's true classes."""
    b, c, h, w = class_masks.shape
    lab = torch.zeros(b, num_classes)
    for i, cl in enumerate(labels):
        lab[i, cl] = 1
    if images is None:
        images = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))
    return Batch(
        images=images,
        labels=lab,
        image_ids=[f"img{i}" for i in range(b)],
        class_masks=class_masks.bool(),
        ignore=torch.zeros(b, h, w, dtype=torch.bool) if ignore is None else ignore,
        has_seg=torch.ones(b, dtype=torch.bool),
        boxes=[torch.zeros(0, 4) for _ in range(b)],
        box_labels=[torch.zeros(0, dtype=torch.long) for _ in range(b)],
        box_difficult=[torch.zeros(0, dtype=torch.bool) for _ in range(b)],
    )


class QuadrantNet(nn.Module):
    """A classifier whose answer is known by construction: it zeroes everything outside the top-left quadrant,
    then conv (no bias) - ReLU - positive 1x1 head - mean. Nothing outside the quadrant can change a logit, and
    inside every feature pushes the logits up. ``gain`` scales the logits."""

    def __init__(self, size: int = 32, classes: int = 3, gain: float = 1.0):
        super().__init__()
        quadrant = torch.zeros(1, 1, size, size)
        quadrant[..., : size // 2, : size // 2] = 1
        self.register_buffer("quadrant", quadrant)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1, bias=False)
        self.gain = gain
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv[0].weight.normal_(0.0, 0.5, generator=gen)
            self.head.weight.uniform_(0.5, 2.0, generator=gen)
        self.cam_layer = self.conv
        self.feature_layers = [self.conv]

    def forward(self, x):
        return self.gain * self.head(self.conv(x * self.quadrant)).mean(dim=(2, 3))


class _RegionFeatures(nn.Module):
    """conv (no bias) - ReLU, then each channel group zeroed outside its own region (``regions``: (1, C, H, W))."""

    def __init__(self, regions: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv2d(3, regions.shape[1], 3, padding=1, bias=False)
        self.register_buffer("regions", regions)

    def forward(self, x):
        return torch.relu(self.conv(x)) * self.regions


class TwoRegionNet(nn.Module):
    """A two-class classifier whose answer is known by construction: class 0's evidence lies only in the top-left
    quadrant, class 1's only in the bottom-right one (:func:`quadrant`).

    Features (the ``cam_layer``): conv (no bias) - ReLU with 8 channels, channels 0-3 zeroed outside the
    top-left quadrant and channels 4-7 outside the bottom-right one. Head: positive 1x1 weights, class 0 on
    channels 0-3 only, class 1 on channels 4-7 only, then the spatial mean. So nothing outside a class's
    quadrant can change its logit, inside every feature pushes it up, and the two classes share no feature.
    Class 1's weights are ``ratio`` (3) times larger: a map that ignored the class (e.g. the sum of both classes'
    evidence) would peak in class 1's quadrant for class 0 as well. ``gain`` scales the logits."""

    def __init__(self, size: int = 32, gain: float = 1.0, ratio: float = 3.0):
        super().__init__()
        regions = torch.zeros(1, 8, size, size)
        regions[:, :4] = quadrant(size, "top-left")
        regions[:, 4:] = quadrant(size, "bottom-right")
        self.features = _RegionFeatures(regions)
        self.head = nn.Conv2d(8, 2, 1, bias=False)
        self.gain = gain
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.features.conv.weight.normal_(0.0, 0.5, generator=gen)
            self.head.weight.zero_()
            self.head.weight[0, :4].uniform_(0.5, 1.0, generator=gen)
            self.head.weight[1, 4:].uniform_(0.5 * ratio, 1.0 * ratio, generator=gen)
        self.cam_layer = self.features
        self.feature_layers = [self.features]

    def forward(self, x):
        return self.gain * self.head(self.features(x)).mean(dim=(2, 3))


def quadrant(h: int, which: str = "top-left", w: int | None = None) -> torch.Tensor:
    """(h, w) float mask of one quadrant (w = h by default): ``top-left`` or ``bottom-right``."""
    w = h if w is None else w
    out = torch.zeros(h, w)
    if which == "top-left":
        out[: h // 2, : w // 2] = 1
    elif which == "bottom-right":
        out[h // 2 :, w // 2 :] = 1
    else:
        raise ValueError(which)
    return out


def region_scores(masks: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For (..., H, W) maps and an (H, W) region: the share of each map's top 10 % pixels that lie in the region,
    and the map's mean inside and outside it."""
    h, w = masks.shape[-2:]
    inside = region.bool().flatten()
    flat = masks.flatten(-2)
    top = flat.topk(h * w // 10, dim=-1).indices
    return inside[top].float().mean(-1), flat[..., inside].mean(-1), flat[..., ~inside].mean(-1)


def quadrant_scores(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For (..., H, W) maps of a :class:`QuadrantNet`: the share of each map's top 10 % pixels that lie in the
    top-left quadrant, and the map's mean inside and outside the quadrant."""
    h, w = masks.shape[-2:]
    return region_scores(masks, quadrant(h, "top-left", w))


def tiny_synthetic(tmp_path_factory, n_test: int, seed: int):
    """A small synthetic data set on disk (96 train / 24 val / ``n_test`` test images at 32 px) for runner tests."""
    from maskbench.datasets import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, n_train=96, n_val=24, n_test=n_test, image_size=32, seed=seed)
    return root


def run_config(data_root, cache_dir, results, **kw):
    """A RunConfig on that data with its own cache and results folders, no progress bars; ``kw`` overrides."""
    from maskbench.benchmark.config import RunConfig

    return RunConfig(**{"data_root": str(data_root), "cache_dir": str(cache_dir), "results_dir": str(results),
                        "progress": False, **kw})


@contextmanager
def registries_restored(*registries: Registry) -> Iterator[None]:
    """Whatever is registered inside the block is unregistered on leaving it, and plugin modules first imported
    inside it are forgotten (so a later ``import_plugin`` of the same file registers again). The registry has
    no public way to unregister, hence its private dicts; entry points are loaded before the snapshot so that
    they are never dropped."""
    for reg in registries:
        reg.load_entry_points()
    saved = [(reg, dict(reg._items), dict(reg._meta), dict(reg._origin)) for reg in registries]
    modules = {m for m in sys.modules if m.startswith("maskbench_plugin_")}
    try:
        yield
    finally:
        for reg, items, meta, origin in saved:
            for attr, old in (("_items", items), ("_meta", meta), ("_origin", origin)):
                current = getattr(reg, attr)
                current.clear()
                current.update(old)
        for m in [m for m in sys.modules if m.startswith("maskbench_plugin_") and m not in modules]:
            del sys.modules[m]


IMAGENET_FIXTURE = {  # image id -> (wnid, boxes [xmin, ymin, xmax, ymax] as the annotations give them, size w x h)
    "ILSVRC2012_val_00000001": ("n01751748", [[10, 5, 29, 20]], (40, 30)),
    "ILSVRC2012_val_00000002": ("n09193705", [[0, 0, 39, 39], [4, 4, 9, 9]], (40, 40)),
    "ILSVRC2012_val_00000003": ("n01440764", [[2, 3, 12, 13]], (24, 32)),
    "ILSVRC2012_val_00000004": ("n15075141", [[5, 5, 15, 15]], (32, 32)),
    "ILSVRC2012_val_00000005": ("n01751748", [[0, 0, 7, 7]], (16, 16)),
}


def write_imagenet_fixture(root, layout: str = "flat-xml"):
    """A tiny ILSVRC-2012 validation tree in one of the distributed layouts: ``flat-xml`` (``val/*.JPEG`` with the
    bbox tarball's ``val/*.xml`` beside them), ``folders-csv`` (class folders ``val/<wnid>/*.JPEG`` and Kaggle's
    ``LOC_val_solution.csv``) or ``kaggle-xml`` (``ILSVRC/Data/CLS-LOC/val`` and ``ILSVRC/Annotations/...``)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    images = root / ("ILSVRC/Data/CLS-LOC/val" if layout == "kaggle-xml" else "val")
    xml_dir = root / "ILSVRC/Annotations/CLS-LOC/val" if layout == "kaggle-xml" else images
    rows = []
    for k, (image_id, (wnid, boxes, (w, h))) in enumerate(IMAGENET_FIXTURE.items()):
        folder = images / wnid if layout == "folders-csv" else images
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{image_id}.JPEG", quality=95)
        if layout == "folders-csv":
            rows.append(f"{image_id}," + " ".join(f"{wnid} {' '.join(map(str, b))}" for b in boxes))
            continue
        xml_dir.mkdir(parents=True, exist_ok=True)
        objects = "".join(
            f"<object><name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
            f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for b in boxes)
        (xml_dir / f"{image_id}.xml").write_text(
            f"<annotation><folder>val</folder><filename>{image_id}</filename><source><database>ILSVRC_2012"
            f"</database></source><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objects}</annotation>")
    if layout == "folders-csv":
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return root
