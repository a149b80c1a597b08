"""Tests of maskbench.datasets: VOC and COCO loaders on hand-written fixtures, the synthetic generator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskbench.core.errors import DataError, UnknownNameError
from maskbench.datasets import (
    DATASETS,
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    COCODataset,
    VOCDataset,
    build_dataset,
    collate,
    generate_synthetic,
)
from maskbench.datasets import synthetic as synthetic_mod
from maskbench.datasets.synthetic import SyntheticCOCODataset, SyntheticDataset, voc_palette

DOG, PERSON, CAT, CAR = (VOC_CLASSES.index(n) for n in ("dog", "person", "cat", "car"))


# --------------------------------------------------------------------------------------------------
# fixture writers
# --------------------------------------------------------------------------------------------------


def _voc_xml(filename: str, w: int, h: int, objects: list[tuple[str, int, tuple[int, int, int, int]]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{diff}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, diff, b in objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def _save_png(path: Path, arr: np.ndarray) -> None:
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
    im.putpalette(voc_palette())
    im.save(path)


def _random_jpeg(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def write_voc_fixture(root: Path) -> Path:
    """Three images; 000001 and 000002 have segmentation, 000003 is in ImageSets/Main only."""
    voc = root / "VOCdevkit" / "VOC2007"
    for d in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    # 000001: 48 x 32, two dogs (label counted once) and a difficult person.
    _random_jpeg(voc / "JPEGImages/000001.jpg", 48, 32, 1)
    (voc / "Annotations/000001.xml").write_text(
        _voc_xml(
            "000001.jpg",
            48,
            32,
            [("dog", 0, (5, 3, 20, 30)), ("dog", 0, (25, 1, 48, 32)), ("person", 1, (10, 10, 15, 20))],
        )
    )
    png = np.zeros((32, 48), np.uint8)
    png[2:30, 4:20] = DOG + 1  # 448 px
    png[0:32, 24:48] = DOG + 1  # 768 px
    png[9:20, 9:15] = PERSON + 1  # 66 px, on top of the first dog
    png[2:30, 20] = 255  # void band: 28 px
    png[1, 4:20] = 255  # 16 px
    _save_png(voc / "SegmentationClass/000001.png", png)
    # 000002: 40 x 40 uniform grey, one cat; regions aligned to 2 px so a 2x nearest downscale is exact.
    Image.new("RGB", (40, 40), (128, 128, 128)).save(voc / "JPEGImages/000002.jpg", quality=95)
    (voc / "Annotations/000002.xml").write_text(_voc_xml("000002.jpg", 40, 40, [("cat", 0, (11, 9, 30, 24))]))
    png = np.zeros((40, 40), np.uint8)
    png[8:24, 10:30] = CAT + 1  # 320 px
    png[24:26, 10:30] = 255  # 40 px
    _save_png(voc / "SegmentationClass/000002.png", png)
    # 000003: no segmentation.
    _random_jpeg(voc / "JPEGImages/000003.jpg", 32, 32, 3)
    (voc / "Annotations/000003.xml").write_text(_voc_xml("000003.jpg", 32, 32, [("car", 0, (1, 1, 16, 16))]))
    (voc / "ImageSets/Segmentation/test.txt").write_text("000001\n000002\n")
    (voc / "ImageSets/Main/test.txt").write_text("000001\n000002\n000003\n")
    return root


def write_coco_fixture(root: Path) -> Path:
    """Non-contiguous, unsorted category ids; polygon, compressed RLE, uncompressed RLE; an empty image."""
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    for i, name in enumerate(("a", "b", "c")):
        _random_jpeg(root / "val" / f"{name}.jpg", 40, 30, 10 + i)
    m = np.zeros((30, 40), np.uint8)
    m[20:24, 25:31] = 1  # 24 px
    rle = mask_utils.encode(np.asfortranarray(m))
    compressed = {"size": [30, 40], "counts": rle["counts"].decode("ascii")}
    # column-major runs: columns 5 and 6, rows 2..4 -> 6 px
    uncompressed = {"size": [30, 40], "counts": [5 * 30 + 2, 3, 27, 3, 1200 - 152 - 3 - 27 - 3]}
    data = {
        "info": {"description": "fixture"},
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 20, "file_name": "b.jpg", "width": 40, "height": 30},
            {"id": 30, "file_name": "c.jpg", "width": 40, "height": 30},
        ],
        "categories": [
            {"id": 7, "name": "dog"},
            {"id": 2, "name": "cat"},
            {"id": 11, "name": "bird"},
            {"id": 4, "name": "fish"},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 2, "bbox": [10, 5, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[10, 5, 20, 5, 20, 15, 10, 15]]},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [25, 20, 6, 4], "area": 24, "iscrowd": 0,
             "segmentation": compressed},
            {"id": 3, "image_id": 20, "category_id": 4, "bbox": [5, 2, 2, 3], "area": 6, "iscrowd": 1,
             "segmentation": uncompressed},
            {"id": 4, "image_id": 20, "category_id": 2, "bbox": [30, 20, 6, 6], "area": 36, "iscrowd": 0,
             "segmentation": [[30, 20, 36, 20, 36, 26, 30, 26]]},
        ],
    }
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def ds_voc_root(tmp_path: Path) -> Path:
    return write_voc_fixture(tmp_path / "vocdata")


@pytest.fixture
def ds_coco_root(tmp_path: Path) -> Path:
    return write_coco_fixture(tmp_path / "cocodata")


# --------------------------------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------------------------------


def test_voc_native_values(ds_voc_root: Path) -> None:
    ds = VOCDataset(ds_voc_root, "test", image_size=None)
    assert ds.image_ids == ["000001", "000002"] and ds.classes == VOC_CLASSES and len(ds) == 2
    s = ds[0]
    assert s.image_id == "000001" and s.image.shape == (3, 32, 48) and s.image.dtype == torch.float32
    expected = torch.zeros(20)
    expected[[DOG, PERSON]] = 1  # two dogs -> dog counted once; the difficult person is included
    assert torch.equal(s.label, expected)
    assert s.box_labels.tolist() == [DOG, DOG, PERSON]
    assert s.box_difficult.tolist() == [False, False, True]
    assert torch.equal(s.boxes, torch.tensor([[4.0, 2, 20, 30], [24, 0, 48, 32], [9, 9, 15, 20]]))
    assert s.class_masks.shape == (20, 32, 48) and s.class_masks.dtype == torch.bool
    assert int(s.class_masks[DOG].sum()) == 448 - 66 + 768
    assert int(s.class_masks[PERSON].sum()) == 66
    assert int(s.class_masks.sum()) == 448 - 66 + 768 + 66
    assert int(s.ignore.sum()) == 44
    assert not (s.ignore & s.class_masks.any(0)).any()
    assert torch.equal(s.segmentation, s.class_masks.any(0))

    grey = ds[1]  # uniform 128 grey JPEG -> ImageNet-normalised constant
    mean = torch.tensor(ds.mean)[:, None, None]
    std = torch.tensor(ds.std)[:, None, None]
    assert torch.allclose(grey.image, (torch.full((3, 40, 40), 128 / 255) - mean) / std, atol=0.02)


def test_voc_resized_boxes_and_masks(ds_voc_root: Path) -> None:
    s = VOCDataset(ds_voc_root, "test", image_size=24)[0]  # 48 x 32 -> 24 x 24: sx = 0.5, sy = 0.75
    assert s.image.shape == (3, 24, 24) and s.class_masks.shape == (20, 24, 24) and s.ignore.shape == (24, 24)
    assert torch.allclose(s.boxes[0], torch.tensor([2.0, 1.5, 10.0, 22.5]))
    assert torch.allclose(s.boxes[1], torch.tensor([12.0, 0.0, 24.0, 24.0]))
    s = VOCDataset(ds_voc_root, "test", image_size=20)[1]  # 40 x 40 -> 20 x 20, 2 px aligned regions
    assert int(s.class_masks[CAT].sum()) == 80 and int(s.ignore.sum()) == 10
    assert int(s.class_masks.sum()) == 80
    assert torch.allclose(s.boxes, torch.tensor([[5.0, 4.0, 15.0, 12.0]]))


def test_voc_root_variants_and_main_split(ds_voc_root: Path) -> None:
    voc = ds_voc_root / "VOCdevkit" / "VOC2007"
    for root in (ds_voc_root, ds_voc_root / "VOCdevkit", voc):
        assert VOCDataset(root, "test", 32).image_ids == ["000001", "000002"]
    ds = VOCDataset(ds_voc_root, "test", 32, segmentation_only=False)
    assert ds.image_ids == ["000001", "000002", "000003"]
    s3 = ds[2]
    assert s3.class_masks is None and s3.ignore is None and s3.segmentation is None
    assert s3.label.nonzero().flatten().tolist() == [CAR]
    batch = collate([ds[0], s3])
    assert batch.has_seg.tolist() == [True, False] and batch.class_masks.shape == (2, 20, 32, 32)
    assert not batch.class_masks[1].any() and batch.images.shape == (2, 3, 32, 32)


def test_voc_builder_env(ds_voc_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASKBENCH_VOC_ROOT", raising=False)
    with pytest.raises(DataError, match="MASKBENCH_VOC_ROOT"):
        build_dataset("voc")
    monkeypatch.setenv("MASKBENCH_VOC_ROOT", str(ds_voc_root))
    ds = build_dataset("voc", image_size=16)
    assert isinstance(ds, VOCDataset) and len(ds) == 2 and ds[0].image.shape == (3, 16, 16)


def test_voc_errors(ds_voc_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        VOCDataset(missing)
    with pytest.raises(DataError, match="searched"):
        VOCDataset(tmp_path)  # exists, but holds no VOC tree
    with pytest.raises(DataError, match=r"bogus\.txt.*Available splits: test"):
        VOCDataset(ds_voc_root, "bogus")

    voc = ds_voc_root / "VOCdevkit" / "VOC2007"
    ds = VOCDataset(ds_voc_root, "test", 16)
    xml = voc / "Annotations" / "000001.xml"
    good = xml.read_text()
    xml.write_text(good.replace("<name>person</name>", "<name>persn</name>"))
    with pytest.raises(DataError, match="persn") as err:
        ds[0]
    assert str(xml) in str(err.value) and "aeroplane" in str(err.value) and "tvmonitor" in str(err.value)
    person_box = "<bndbox><xmin>10</xmin><ymin>10</ymin><xmax>15</xmax><ymax>20</ymax></bndbox>"
    assert person_box in good
    xml.write_text(good.replace(person_box, ""))
    with pytest.raises(DataError, match="bndbox") as err:
        ds[0]
    assert str(xml) in str(err.value)
    xml.write_text("<annotation><object><name>dog</name></annotation>")
    with pytest.raises(DataError, match="Invalid XML") as err:
        ds[0]
    assert str(xml) in str(err.value)
    xml.write_text(good)
    ds[0]  # restored

    png = voc / "SegmentationClass" / "000002.png"
    _save_png(png, np.full((40, 40), 50, np.uint8))
    with pytest.raises(DataError, match=r"values \[50\]") as err:
        ds[1]
    assert str(png) in str(err.value)

    jpg = voc / "JPEGImages" / "000002.jpg"
    jpg.write_bytes(b"this is not a jpeg \x00\x01\x02" * 10)
    with pytest.raises(DataError) as err:
        ds[1]
    assert str(jpg) in str(err.value)
    jpg.unlink()
    with pytest.raises(DataError, match="not found") as err:
        ds[1]
    assert str(jpg) in str(err.value)


# --------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------


def test_coco_values(ds_coco_root: Path) -> None:
    ds = COCODataset(ds_coco_root, "val", image_size=None)
    assert ds.category_ids == [2, 4, 7, 11]
    assert ds.classes == ["cat", "fish", "dog", "bird"]
    assert ds.image_ids == ["a", "b", "c"]
    a, b, c = ds[0], ds[1], ds[2]
    assert a.image.shape == (3, 30, 40) and a.ignore is None
    assert a.label.tolist() == [1, 0, 1, 0]
    assert int(a.class_masks[0].sum()) == 100 and int(a.class_masks[2].sum()) == 24
    assert int(a.class_masks.sum()) == 124
    assert bool(a.class_masks[0, 5:15, 10:20].all()) and bool(a.class_masks[2, 20:24, 25:31].all())
    assert torch.equal(a.boxes, torch.tensor([[10.0, 5, 20, 15], [25, 20, 31, 24]]))
    assert a.box_labels.tolist() == [0, 2] and a.box_difficult.tolist() == [False, False]
    assert b.label.tolist() == [1, 1, 0, 0]
    assert int(b.class_masks[1].sum()) == 6 and bool(b.class_masks[1, 2:5, 5:7].all())
    assert int(b.class_masks[0].sum()) == 36
    # no annotations -> all-zero label (never "all classes"), empty masks
    assert c.label.tolist() == [0, 0, 0, 0] and not c.class_masks.any() and c.boxes.shape == (0, 4)
    batch = collate([a, b, c])
    assert batch.has_seg.tolist() == [True, True, True] and not batch.ignore.any()


def test_coco_resized(ds_coco_root: Path) -> None:
    s = COCODataset(ds_coco_root, "val", image_size=20)[0]  # 40 x 30 -> 20 x 20
    assert s.image.shape == (3, 20, 20) and s.class_masks.shape == (4, 20, 20)
    assert torch.allclose(s.boxes, torch.tensor([[5.0, 10 / 3, 10, 10], [12.5, 40 / 3, 15.5, 16]]))
    assert int(s.class_masks[0].sum()) > 0 and int(s.class_masks[2].sum()) > 0
    assert not s.class_masks[[1, 3]].any()


def test_coco_builder_and_errors(ds_coco_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASKBENCH_COCO_ROOT", raising=False)
    with pytest.raises(DataError, match="MASKBENCH_COCO_ROOT"):
        build_dataset("coco")
    monkeypatch.setenv("MASKBENCH_COCO_ROOT", str(ds_coco_root))
    assert len(build_dataset("coco", split="val", image_size=16)) == 3

    missing = tmp_path / "nococo"
    with pytest.raises(DataError, match=str(missing)):
        COCODataset(missing, "val")
    with pytest.raises(DataError, match="instances_val2014.json"):
        COCODataset(ds_coco_root)  # default split has no annotation file

    ann = ds_coco_root / "annotations" / "instances_val.json"
    good = ann.read_text()
    ann.write_text(good[:-20])
    with pytest.raises(DataError, match="Cannot read") as err:
        COCODataset(ds_coco_root, "val")
    assert str(ann) in str(err.value)
    ann.write_text(good.replace('"category_id": 4', '"category_id": 5'))
    with pytest.raises(DataError, match=r"category_id 5.*\[2, 4, 7, 11\]"):
        COCODataset(ds_coco_root, "val")[1]
    ann.write_text(good)

    jpg = ds_coco_root / "val" / "b.jpg"
    jpg.write_bytes(b"\xff\xd8\xff garbage" * 5)
    with pytest.raises(DataError) as err:
        COCODataset(ds_coco_root, "val")[1]
    assert str(jpg) in str(err.value)


def test_coco_derived_splits_are_seeded_subsets_of_the_official_ones(ds_coco_root: Path) -> None:
    import shutil

    from maskbench.datasets import coco

    for official in ("train2014", "val2014"):
        shutil.copy(ds_coco_root / "annotations" / "instances_val.json",
                    ds_coco_root / "annotations" / f"instances_{official}.json")
        shutil.copytree(ds_coco_root / "val", ds_coco_root / official)
    full = COCODataset(ds_coco_root, "train2014").image_ids
    train, val = COCODataset(ds_coco_root, "train").image_ids, COCODataset(ds_coco_root, "val2014").image_ids
    # (this fixture's own instances_val.json takes precedence over the derived "val": tested below on ids)
    assert sorted(train) == train and len(train) == 2 and set(train) < set(full)
    assert COCODataset(ds_coco_root, "neurips-test").image_ids == sorted(val)  # 3 <= 1,000: every image
    # the holdout of 10 ids is one tenth, drawn with random.Random(0), and the rest is disjoint from it
    ids = [f"{i:03d}" for i in range(30)]
    held, rest = coco.derived_ids(ids, "holdout"), coco.derived_ids(ids, "rest")
    assert len(held) == 3 and len(rest) == 27 and sorted(held + rest) == ids
    assert held == coco.derived_ids(list(reversed(ids)), "holdout") == coco.derived_ids(ids, "holdout")
    assert coco.derived_ids(ids, 5) == sorted(__import__("random").Random(0).sample(ids, 5))
    with pytest.raises(DataError, match="Available splits: train2014, val, val2014, train, neurips-test"):
        COCODataset(ds_coco_root, "test")


def test_registry() -> None:
    assert {"voc", "coco", "synthetic", "synthetic-coco"} <= set(DATASETS.list())
    with pytest.raises(UnknownNameError, match="voc") as err:
        DATASETS.get("vocc")
    assert "synthetic" in str(err.value)
    with pytest.raises(UnknownNameError):
        build_dataset("vocc")


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------

TINY = dict(n_train=4, n_val=4, n_test=4, image_size=32, seed=0)


@pytest.fixture(scope="module")
def ds_synth_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "tiny", **TINY)


@pytest.fixture(scope="module")
def ds_synth_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(
        tmp_path_factory.mktemp("synth") / "s300", n_train=300, n_val=0, n_test=0, image_size=32, seed=1
    )


def test_synthetic_files(ds_synth_tiny: Path) -> None:
    root = ds_synth_tiny
    voc = root / "VOCdevkit" / "VOC2007"
    assert (root / ".complete").is_file()
    for sub in ("Main", "Segmentation"):
        for split, n in (("train", 4), ("val", 4), ("test", 4), ("trainval", 8)):
            assert len((voc / "ImageSets" / sub / f"{split}.txt").read_text().split()) == n
    for i in range(1, 13):
        stem = f"{i:06d}"
        assert (voc / "JPEGImages" / f"{stem}.jpg").is_file()
        assert (voc / "Annotations" / f"{stem}.xml").is_file()
        with Image.open(voc / "SegmentationClass" / f"{stem}.png") as im:
            assert im.mode == "P" and im.size == (32, 32)
            assert set(np.unique(np.asarray(im)).tolist()) <= {0, 1, 2, 3, 4, 5, 6, 255}
            pal = im.getpalette()
            assert pal[3:6] == [128, 0, 0] and pal[255 * 3 : 255 * 3 + 3] == [224, 224, 192]
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["classes"] == SYNTHETIC_CLASSES and meta["options"]["seed"] == 0
    assert meta["cooccurring_pair"] == ["cross", "star"] and "P(star|cross)" in meta["stats"]["cooccurrence"]
    for split in ("train", "val", "test"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert [c["id"] for c in coco["categories"]] == [1, 3, 5, 7, 9, 11]
        assert len(coco["images"]) == 4 and coco["annotations"]
        for ann in coco["annotations"]:
            assert ann["iscrowd"] == 0 and len(ann["bbox"]) == 4 and ann["area"] > 0
        for img in coco["images"]:
            assert (voc / "JPEGImages" / img["file_name"]).is_file()


def test_synthetic_voc_coco_agree(ds_synth_tiny: Path) -> None:
    for split in ("train", "val", "test"):
        v_ds, c_ds = SyntheticDataset(ds_synth_tiny, split), SyntheticCOCODataset(ds_synth_tiny, split)
        assert v_ds.image_ids == c_ds.image_ids and c_ds.classes == SYNTHETIC_CLASSES
        for v, c in zip(v_ds, c_ds, strict=True):
            assert torch.equal(v.label, c.label) and 1 <= v.label.sum() <= 3
            assert 1 <= len(v.boxes) <= 3 and len(v.boxes) == len(c.boxes)
            assert torch.equal(v.boxes, c.boxes) and torch.equal(v.box_labels, c.box_labels)
            assert torch.equal(v.image, c.image)
            assert (v.class_masks == c.class_masks).float().mean() >= 0.95
            # exact: the VOC mask is the COCO mask minus the void band
            assert not (v.class_masks & ~c.class_masks).any()
            assert not ((c.class_masks & ~v.class_masks).any(0) & ~v.ignore).any()
            assert not (v.ignore & v.class_masks.any(0)).any()
            for k in v.label.nonzero().flatten().tolist():
                assert v.class_masks[k].any()  # every labelled class has visible, non-void pixels


def test_synthetic_determinism(ds_synth_tiny: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", **TINY)
    for rel in (
        "VOCdevkit/VOC2007/SegmentationClass/000005.png",
        "VOCdevkit/VOC2007/JPEGImages/000005.jpg",
        "VOCdevkit/VOC2007/Annotations/000005.xml",
        "annotations/instances_train.json",
        "metadata.json",
    ):
        assert (again / rel).read_bytes() == (ds_synth_tiny / rel).read_bytes(), rel
    other = generate_synthetic(tmp_path / "other", **{**TINY, "seed": 1})
    rel = "annotations/instances_train.json"
    assert (other / rel).read_bytes() != (ds_synth_tiny / rel).read_bytes()


def test_synthetic_cooccurrence(ds_synth_300: Path) -> None:
    ds = SyntheticDataset(ds_synth_300, "train", None)
    labels = torch.stack([ds[i].label for i in range(len(ds))]).bool()
    assert len(labels) == 300
    cross, star = labels[:, SYNTHETIC_CLASSES.index("cross")], labels[:, SYNTHETIC_CLASSES.index("star")]
    p_star_cross = (star & cross).sum() / cross.sum()
    p_star_not_cross = (star & ~cross).sum() / (~cross).sum()
    assert p_star_cross > 0.5 and p_star_cross > p_star_not_cross + 0.3
    stats = json.loads((ds_synth_300 / "metadata.json").read_text())["stats"]["cooccurrence"]
    assert stats["P(star|cross)"] == pytest.approx(float(p_star_cross), abs=1e-3)
    assert labels.any(1).all() and (labels.sum(0) > 0).all()  # every class occurs
    coco = json.loads((ds_synth_300 / "annotations" / "instances_train.json").read_text())
    kinds = {type(a["segmentation"]).__name__ for a in coco["annotations"]}
    assert kinds == {"list", "dict"}  # polygons and RLE both present
    assert any(a["segmentation"]["counts"] and isinstance(a["segmentation"]["counts"], str)
               for a in coco["annotations"] if isinstance(a["segmentation"], dict))


def test_synthetic_builders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASKBENCH_CACHE", str(tmp_path / "cache"))
    opts = dict(n_train=2, n_val=2, n_test=2, resolution=32)
    ds = build_dataset("synthetic", **opts)
    assert isinstance(ds, SyntheticDataset) and "SyntheticDataset" in repr(ds) and len(ds) == 2
    root = Path(ds.root)
    assert root.parent == tmp_path / "cache" / "data" and root.name.startswith("synthetic-")
    assert ds[0].image.shape == (3, 32, 32) and ds.classes == SYNTHETIC_CLASSES

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not regenerate")

    monkeypatch.setattr(synthetic_mod, "generate_synthetic", boom)
    assert build_dataset("synthetic", split="train", image_size=48, **opts)[0].image.shape == (3, 48, 48)
    coco = build_dataset("synthetic-coco", **opts)
    assert isinstance(coco, SyntheticCOCODataset) and Path(coco.root) == root
    assert torch.equal(coco[1].label, ds[1].label)
    with pytest.raises(TypeError, match="bogus"):
        build_dataset("synthetic", bogus=1, **opts)


def test_synthetic_atomic_and_existing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "gen" / "data"
    calls = {"n": 0}
    original = synthetic_mod._voc_xml

    def flaky(*args: object, **kwargs: object) -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # an interruption half-way
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic_mod, "_voc_xml", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(out, n_train=4, n_val=0, n_test=0, image_size=16)
    assert not out.exists() and os.listdir(out.parent) == []  # nothing half-written is left
    monkeypatch.setattr(synthetic_mod, "_voc_xml", original)

    small = dict(n_train=2, n_val=0, n_test=0, image_size=16)
    assert generate_synthetic(out, **small) == out and (out / ".complete").is_file()
    stamp = (out / ".complete").stat().st_mtime_ns
    assert generate_synthetic(out, **small) == out  # same options: reused
    assert (out / ".complete").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="overwrite=True"):
        generate_synthetic(out, **{**small, "seed": 5})
    generate_synthetic(out, **{**small, "seed": 5}, overwrite=True)
    assert json.loads((out / "metadata.json").read_text())["options"]["seed"] == 5
    assert sorted(os.listdir(out.parent)) == ["data"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(DataError, match=str(foreign)):
        generate_synthetic(foreign, **small)
