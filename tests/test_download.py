"""``maskbench download``: official archives fetched with resume, verified and extracted atomically, tested
against archives built from the synthetic tree and served over a loopback HTTP server (the same code path as the
official URLs: only the base URL and the checksums differ)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from maskbench.benchmark.cli import main
from maskbench.benchmark.smoke import archive_server, md5sums, voc_archives, zip_bytes
from maskbench.core.errors import DataError
from maskbench.datasets import SYNTHETIC_CLASSES, build_dataset, generate_synthetic
from maskbench.datasets import download as dl


@pytest.fixture()
def server():
    with archive_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synthetic") / "data", n_train=6, n_val=3, n_test=4,
                              image_size=32, seed=3)


def coco_archives(root: Path) -> dict[str, bytes]:
    """The synthetic COCO annotations and images (synthetic layout) as the three official COCO-2014 zips."""
    images = root / "VOCdevkit" / "VOC2007" / "JPEGImages"
    out, ann = {}, {}
    for split, official in (("train", "train2014"), ("val", "val2014")):
        data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        ann[f"annotations/instances_{official}.json"] = json.dumps(data).encode()
        out[f"{official}.zip"] = zip_bytes({f"{official}/{im['file_name']}": (images / im["file_name"]).read_bytes()
                                       for im in data["images"]})
    out["annotations_trainval2014.zip"] = zip_bytes(ann)
    return out


def serve(server, archives: dict[str, bytes], tmp_path: Path, wrong: str | None = None) -> Path:
    """Put the archives on the server and write their md5sum file (``wrong``: that archive's sum is bad)."""
    server.files.update(archives)
    return md5sums(archives, tmp_path / "MD5SUMS", wrong)


def test_voc_is_fetched_verified_and_extracted_and_a_second_call_does_nothing(server, synthetic, tmp_path):
    sums = serve(server, voc_archives(synthetic), tmp_path)
    root = tmp_path / "voc"
    args = ["download", "voc", "--root", str(root), "--mirror", server.url, "--checksums", str(sums),
            "--archives", str(tmp_path / "archives"), "--no-progress"]
    assert main(args) == 0
    assert sorted(n for n, _ in server.log) == ["VOCtest_06-Nov-2007.tar", "VOCtrainval_06-Nov-2007.tar"]
    record = json.loads((root / dl.RECORD).read_text())
    assert record["dataset"] == "voc" and record["verified"] and len(record["archives"]) == 2
    # the merged tree reads through the real VOC loader (with the synthetic class names): the 4 test images
    data = build_dataset("voc", root=root, split="test", image_size=32, classes=SYNTHETIC_CLASSES)
    assert len(data) == 4 and all(data[i].class_masks is not None for i in range(4))
    assert not list(tmp_path.glob(".voc.partial")) and not list((tmp_path / "archives").glob("*.part"))
    server.log.clear()
    assert main(args) == 0
    assert server.log == []  # already complete: no request at all


def test_a_killed_download_resumes_where_it_stopped(server, synthetic, tmp_path):
    archives = voc_archives(synthetic)
    sums = serve(server, archives, tmp_path)
    name = "VOCtest_06-Nov-2007.tar"
    cut = len(archives[name]) // 3
    server.drop[name] = cut
    kw = {"mirror": server.url, "checksums": sums, "archive_dir": tmp_path / "a", "progress": False,
          "log": lambda _: None}
    with pytest.raises(DataError, match="rerun the command to resume"):
        dl.download("voc", tmp_path / "voc", **kw)
    part = tmp_path / "a" / f"{name}.part"
    assert part.stat().st_size == cut and not (tmp_path / "voc").exists()
    server.log.clear()
    dl.download("voc", tmp_path / "voc", **kw)
    assert (name, f"bytes={cut}-") in server.log  # continued, not started over
    assert hashlib.md5((tmp_path / "a" / name).read_bytes()).digest() == hashlib.md5(archives[name]).digest()
    assert (tmp_path / "voc" / dl.RECORD).is_file() and not part.exists()


def test_a_checksum_mismatch_deletes_the_file_and_names_it(server, synthetic, tmp_path):
    name = "VOCtest_06-Nov-2007.tar"
    sums = serve(server, voc_archives(synthetic), tmp_path, wrong=name)
    with pytest.raises(DataError) as err:
        dl.download("voc", tmp_path / "voc", mirror=server.url, checksums=sums, archive_dir=tmp_path / "a",
                    progress=False, log=lambda _: None)
    assert "Checksum mismatch" in str(err.value) and str(tmp_path / "a" / name) in str(err.value)
    assert not (tmp_path / "a" / name).exists() and not (tmp_path / "a" / f"{name}.part").exists()
    assert not (tmp_path / "voc").exists()


def test_an_interrupted_extraction_leaves_no_tree_that_looks_complete(server, synthetic, tmp_path, monkeypatch):
    sums = serve(server, voc_archives(synthetic), tmp_path)
    kw = {"mirror": server.url, "checksums": sums, "archive_dir": tmp_path / "a", "progress": False,
          "log": lambda _: None}
    real, calls = dl._extract, []

    def dies_on_the_second(archive, into):
        calls.append(archive)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(archive, into)

    monkeypatch.setattr(dl, "_extract", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        dl.download("voc", tmp_path / "voc", **kw)
    assert not (tmp_path / "voc").exists() and (tmp_path / ".voc.partial").is_dir()
    with pytest.raises(DataError, match="VOC data root not found"):
        build_dataset("voc", root=tmp_path / "voc", split="test")
    monkeypatch.setattr(dl, "_extract", real)
    server.log.clear()
    dl.download("voc", tmp_path / "voc", **kw)
    assert server.log == []  # the verified archives were kept: only the extraction is redone
    assert len(build_dataset("voc", root=tmp_path / "voc", split="test", image_size=32, classes=SYNTHETIC_CLASSES)) == 4
    assert not (tmp_path / ".voc.partial").exists()


def test_coco_zips_extract_into_the_layout_the_loader_reads(server, synthetic, tmp_path):
    sums = serve(server, coco_archives(synthetic), tmp_path)
    root = dl.download("coco", tmp_path / "coco", mirror=server.url, checksums=sums, archive_dir=tmp_path / "a",
                       progress=False, keep_archives=False, log=lambda _: None)
    val = build_dataset("coco", root=root, split="val2014", image_size=32)
    train = build_dataset("coco", root=root, split="train2014", image_size=32)
    assert (len(val), len(train)) == (3, 6)
    assert not list((tmp_path / "a").iterdir())  # --delete-archives


def test_missing_data_says_how_to_fetch_it_and_the_default_root_is_found(server, synthetic, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("MASKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MASKBENCH_VOC_ROOT", raising=False)
    with pytest.raises(DataError, match=r"maskbench download voc"):
        build_dataset("voc", split="test")
    with pytest.raises(DataError, match=r"maskbench download coco --root"):
        build_dataset("coco", root=tmp_path / "nowhere")
    sums = serve(server, voc_archives(synthetic), tmp_path)
    monkeypatch.setenv("MASKBENCH_VOC_MIRROR", server.url)
    monkeypatch.setenv("MASKBENCH_VOC_CHECKSUMS", str(sums))
    assert main(["download", "voc", "--no-progress"]) == 0  # into <cache>/data/voc
    found = build_dataset("voc", split="test", image_size=32, classes=SYNTHETIC_CLASSES)  # no root given
    assert len(found) == 4 and Path(found.root) == tmp_path / "cache" / "data" / "voc"


def test_a_root_holding_other_data_is_refused(tmp_path):
    root = tmp_path / "voc"
    root.mkdir()
    (root / "mine.txt").write_text("x")
    with pytest.raises(DataError, match="not a complete maskbench download"):
        dl.download("voc", root, progress=False, log=lambda _: None)
    assert (root / "mine.txt").is_file()
    with pytest.raises(Exception, match="Valid downloadable data set names: coco, voc"):
        dl.download("imagenet", tmp_path / "x")
    shutil.rmtree(root)
