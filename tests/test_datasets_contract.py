"""Contract tests run over every registered data set, each built on a small fixture in its real format: the
Sample / Batch contract of ``maskbench.datasets.base``, ``collate``, a deterministic order, the splits it
accepts and the error of an unknown split.

Fixtures: the synthetic generator for ``synthetic`` / ``synthetic-coco``; for ``voc`` / ``coco`` the hand-written
trees of ``test_datasets.py`` (its writers, imported as they are). A data set registered without a fixture here
fails loudly instead of being skipped."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from mb_testutils import write_imagenet_fixture
from test_datasets import write_coco_fixture, write_voc_fixture

from maskbench.core.errors import MaskbenchError
from maskbench.datasets import DATASETS, AttributionDataset, build_dataset, collate, generate_synthetic

SIZE = 32
CONTRACT_DATASETS = DATASETS.list()


@dataclass
class Fixture:
    """How to build a registered data set on a fixture tree: ``write(folder) -> root``, the builder's options,
    the splits the tree holds (all of them must build) and the split the contract is checked on."""

    write: Callable[[Path], Path]
    splits: tuple[str, ...]
    split: str
    options: dict[str, Any] = field(default_factory=dict)


def _synthetic(root: Path) -> Path:
    return generate_synthetic(root / "synthetic", n_train=3, n_val=2, n_test=4, image_size=SIZE, seed=3)


def _grid_scenes(root: Path) -> Path:
    """Scenes for ``synthetic-grid``: enough per split for grids of four scenes with pairwise disjoint classes
    (read at SIZE / 2, so that the grids are SIZE px)."""
    return generate_synthetic(root / "scenes", n_train=16, n_val=16, n_test=24, image_size=SIZE, seed=3)


FIXTURES: dict[str, Fixture] = {
    # the generator writes ImageSets lists for train / val / test / trainval, COCO json files for train / val / test
    "synthetic": Fixture(_synthetic, ("train", "val", "test", "trainval"), "test"),
    "synthetic-coco": Fixture(_synthetic, ("train", "val", "test"), "test"),
    # 2x2 grids of the synthetic scenes at SIZE / 2 px (the splits and the trainval union of synthetic)
    "synthetic-grid": Fixture(_grid_scenes, ("train", "val", "test", "trainval"), "test", {"image_size": SIZE}),
    # the Main list: three images, one without segmentation (has_seg False); resized from 48 x 32 / 40 x 40
    "voc": Fixture(write_voc_fixture, ("test",), "test", {"image_size": SIZE, "segmentation_only": False}),
    "coco": Fixture(write_coco_fixture, ("val",), "val", {"image_size": SIZE}),
    # five validation images of four classes, boxes from the per-image XML (flat val/ layout)
    "imagenet": Fixture(write_imagenet_fixture, ("val", "dgmp-test"), "val", {"image_size": SIZE}),
}



def fixture_of(name: str) -> Fixture:
    if name not in FIXTURES:
        pytest.fail(f"data set {name!r} is registered but has no fixture in tests/test_datasets_contract.py: add one "
                    f"to FIXTURES so the contract covers it")
    return FIXTURES[name]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """One fixture tree per writer (synthetic and synthetic-coco share theirs)."""
    out: dict[str, Path] = {}
    made: dict[Callable, Path] = {}
    for name in CONTRACT_DATASETS:
        fx = FIXTURES.get(name)
        if fx is None:
            continue
        if fx.write not in made:
            made[fx.write] = fx.write(tmp_path_factory.mktemp(name))
        out[name] = made[fx.write]
    return out


def build(name: str, roots: dict[str, Path], split: str | None = None) -> AttributionDataset:
    fx = fixture_of(name)
    return build_dataset(name, root=roots[name], split=split or fx.split, **fx.options)


def check_sample(ds: AttributionDataset, index: int) -> None:
    s = ds[index]
    c = ds.num_classes
    assert c == len(ds.classes) >= 1
    assert isinstance(s.image_id, str) and s.image_id == ds.image_ids[index]
    # image: (3, H, W) float32, normalised with the data set's mean / std (de-normalised values are in [0, 1])
    assert s.image.dim() == 3 and s.image.shape[0] == 3 and s.image.dtype == torch.float32, s.image.shape
    _, h, w = s.image.shape
    assert (h, w) == (SIZE, SIZE), (h, w)
    mean = torch.tensor(ds.mean)[:, None, None]
    std = torch.tensor(ds.std)[:, None, None]
    raw = s.image * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5, (float(raw.min()), float(raw.max()))
    # every format reads 8-bit images (JPEG), resized in 8 bits: de-normalised with the data set's own mean and
    # std, each value is a multiple of 1/255 (other normalisation constants would not give that)
    levels = raw * 255
    assert (levels - levels.round()).abs().max() < 1e-3, float((levels - levels.round()).abs().max())
    assert s.image.std() > 0  # not blank: the pixels were read
    # label: (C,) float multi-hot
    assert s.label.shape == (c,) and s.label.dtype == torch.float32
    assert set(s.label.unique().tolist()) <= {0.0, 1.0}
    # class masks: (C, H, W) bool, non-empty only for a labelled class; ignore (H, W) bool, never foreground
    if s.class_masks is not None:
        assert s.class_masks.shape == (c, h, w) and s.class_masks.dtype == torch.bool
        nonempty = s.class_masks.flatten(1).any(1)
        assert not (nonempty & (s.label == 0)).any(), (s.image_id, nonempty, s.label)
        assert torch.equal(s.segmentation, s.class_masks.any(0))
    else:
        assert s.segmentation is None
    if s.ignore is not None:
        assert s.class_masks is not None, "an ignore band without segmentation"
        assert s.ignore.shape == (h, w) and s.ignore.dtype == torch.bool
        assert not (s.ignore & s.class_masks.any(0)).any()
    # boxes: (N, 4) float xyxy inside the returned image, one label (long, a labelled class) and flag (bool) each
    n = len(s.boxes)
    assert s.boxes.shape == (n, 4) and s.boxes.dtype == torch.float32
    assert s.box_labels.shape == (n,) and s.box_labels.dtype == torch.long
    assert s.box_difficult.shape == (n,) and s.box_difficult.dtype == torch.bool
    if n:
        x0, y0, x1, y1 = s.boxes.unbind(1)
        assert ((0 <= x0) & (x0 <= x1) & (x1 <= w) & (0 <= y0) & (y0 <= y1) & (y1 <= h)).all(), s.boxes
        assert ((s.box_labels >= 0) & (s.box_labels < c)).all()
        assert (s.label[s.box_labels] == 1).all(), (s.box_labels, s.label)


@pytest.mark.parametrize("name", CONTRACT_DATASETS)
def test_samples_follow_the_contract(name, roots):
    ds = build(name, roots)
    assert len(ds) == len(ds.image_ids) >= 2 and len(set(ds.image_ids)) == len(ds.image_ids)
    for i in range(len(ds)):
        check_sample(ds, i)
    labels = torch.stack([ds[i].label for i in range(len(ds))])
    assert labels.sum() > 0  # the fixture has labelled images: the checks above are not vacuous


@pytest.mark.parametrize("name", CONTRACT_DATASETS)
def test_collate_gives_the_batched_shapes(name, roots):
    ds = build(name, roots)
    samples = [ds[i] for i in range(len(ds))]
    b, c = len(samples), ds.num_classes
    batch = collate(samples)
    assert len(batch) == b and batch.image_ids == [s.image_id for s in samples]
    assert batch.images.shape == (b, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert batch.labels.shape == (b, c)
    assert batch.class_masks.shape == (b, c, SIZE, SIZE) and batch.class_masks.dtype == torch.bool
    assert batch.ignore.shape == (b, SIZE, SIZE) and batch.ignore.dtype == torch.bool
    assert batch.has_seg.shape == (b,) and batch.has_seg.dtype == torch.bool
    assert len(batch.boxes) == len(batch.box_labels) == len(batch.box_difficult) == b
    for i, s in enumerate(samples):
        assert torch.equal(batch.images[i], s.image) and torch.equal(batch.labels[i], s.label)
        assert bool(batch.has_seg[i]) == (s.class_masks is not None)
        if s.class_masks is None:  # no segmentation: all-False masks and ignore
            assert not batch.class_masks[i].any() and not batch.ignore[i].any()
        else:
            assert torch.equal(batch.class_masks[i], s.class_masks)
            assert torch.equal(batch.ignore[i], s.ignore if s.ignore is not None else torch.zeros(SIZE, SIZE).bool())
        assert torch.equal(batch.boxes[i], s.boxes) and torch.equal(batch.box_labels[i], s.box_labels)
    # a sub-batch selects rows without reloading
    sub = batch.select([b - 1, 0])
    assert sub.image_ids == [batch.image_ids[-1], batch.image_ids[0]]
    assert torch.equal(sub.class_masks[1], batch.class_masks[0]) and torch.equal(sub.has_seg, batch.has_seg[[b - 1, 0]])


@pytest.mark.parametrize("name", CONTRACT_DATASETS)
def test_order_is_deterministic(name, roots):
    first, second = build(name, roots), build(name, roots)
    assert first.image_ids == second.image_ids
    assert first.classes == second.classes
    a, b = first[len(first) - 1], second[len(second) - 1]
    assert a.image_id == b.image_id and torch.equal(a.image, b.image) and torch.equal(a.label, b.label)


@pytest.mark.parametrize("name", CONTRACT_DATASETS)
def test_every_split_of_the_fixture_builds(name, roots):
    fx = fixture_of(name)
    ids = {}
    for split in fx.splits:
        ds = build(name, roots, split)
        assert ds.split == split and len(ds) >= 1
        ids[split] = ds.image_ids
    if {"train", "val", "trainval"} <= set(ids):
        assert ids["trainval"] == ids["train"] + ids["val"]
    if {"train", "val", "test"} <= set(ids):
        assert not (set(ids["train"]) | set(ids["val"])) & set(ids["test"])  # no test image in training


@pytest.mark.parametrize("name", CONTRACT_DATASETS)
def test_an_unknown_split_is_an_error_naming_the_valid_ones(name, roots):
    fx = fixture_of(name)
    with pytest.raises(MaskbenchError) as err:
        build(name, roots, "bogus")
    message = str(err.value).replace(str(roots[name]), "<root>")  # the tmp path holds "test" ("pytest-of-...")
    assert "bogus" in message
    missing = [s for s in fx.splits if not re.search(rf"\b{s}\b", message)]
    assert not missing, f"the error does not name the valid split(s) {missing}: {message}"
