"""The ImageNet validation loader on fixtures written in its distributed layouts, with known answers."""

import math

import pytest
import torch
from mb_testutils import IMAGENET_FIXTURE, write_imagenet_fixture

from maskbench.core.errors import DataError
from maskbench.datasets import build_dataset, collate
from maskbench.datasets import imagenet as inet
from maskbench.metrics import METRICS, MetricInputs

LAYOUTS = ["flat-xml", "folders-csv", "kaggle-xml"]


def test_the_classes_are_the_1000_synsets_in_torchvisions_order():
    wnids = inet.synsets()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    names = inet.category_names()
    assert len(names) == 1000 and names[wnids.index("n01440764")] == "tench"
    assert names[wnids.index("n15075141")] == "toilet tissue"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_same_labels_and_boxes(layout, tmp_path):
    root = write_imagenet_fixture(tmp_path / layout, layout)
    data = build_dataset("imagenet", root=root, split="val", image_size=32)
    assert data.image_ids == sorted(IMAGENET_FIXTURE) and data.num_classes == 1000
    wnids = inet.synsets()
    for image_id, (wnid, boxes, (w, h)) in IMAGENET_FIXTURE.items():
        s = data.load(image_id)
        assert torch.nonzero(s.label).flatten().tolist() == [wnids.index(wnid)]  # single-label
        assert s.class_masks is None and s.box_labels.tolist() == [wnids.index(wnid)] * len(boxes)
        # inclusive pixel indices -> pixel edges [x0, y0, x1 + 1, y1 + 1], scaled to 32 x 32
        expected = torch.tensor([[b[0] * 32 / w, b[1] * 32 / h, (b[2] + 1) * 32 / w, (b[3] + 1) * 32 / h]
                                 for b in boxes])
        torch.testing.assert_close(s.boxes, expected)
        assert s.image.shape == (3, 32, 32)


def test_no_segmentation_means_undefined_never_zero(tmp_path):
    data = build_dataset("imagenet", root=write_imagenet_fixture(tmp_path), split="val", image_size=32)
    batch = collate([data[i] for i in range(len(data))])
    assert not batch.has_seg.any()
    classes = batch.labels.argmax(1, keepdim=True)
    masks = torch.rand(len(batch), 1, 32, 32)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1000))
    for name in ("acc", "iou", "mae"):
        values = METRICS.get(name).fn(MetricInputs(model, batch.images, masks, classes, batch))
        assert all(math.isnan(v) for v in values.tolist()), name
    mi = METRICS.get("mi").fn(MetricInputs(model, batch.images, masks, classes, batch))
    assert not any(math.isnan(v) for v in mi.tolist())  # the boxes are there: M_I is defined


def test_the_dgmp_test_split_is_a_seeded_sample(tmp_path, monkeypatch):
    root = write_imagenet_fixture(tmp_path)
    assert build_dataset("imagenet", root=root, split="dgmp-test").image_ids == sorted(IMAGENET_FIXTURE)
    monkeypatch.setattr(inet, "DGMP_TEST_SIZE", 3)
    a = build_dataset("imagenet", root=root, split="dgmp-test").image_ids
    b = build_dataset("imagenet", root=root, split="dgmp-test").image_ids
    assert a == b == sorted(a) and len(a) == 3 and set(a) < set(IMAGENET_FIXTURE)


def test_missing_or_wrong_data_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.delenv("MASKBENCH_IMAGENET_ROOT", raising=False)
    for kwargs in ({}, {"root": tmp_path / "nowhere"}):
        with pytest.raises(DataError) as err:
            build_dataset("imagenet", **kwargs)
        assert "ILSVRC2012_img_val.tar" in str(err.value) and "LOC_val_solution.csv" in str(err.value)
    root = write_imagenet_fixture(tmp_path / "a")
    with pytest.raises(DataError, match="Available splits: val, dgmp-test, train, train-holdout"):
        build_dataset("imagenet", root=root, split="test")
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar's class folders into <root>/train/"):
        build_dataset("imagenet", root=root, split="train")
    xml = root / "val" / "ILSVRC2012_val_00000003.xml"
    xml.write_text(xml.read_text().replace("n01440764", "n99999999"))
    with pytest.raises(DataError, match="n99999999"):
        build_dataset("imagenet", root=root, split="val")
    folders = write_imagenet_fixture(tmp_path / "b", "folders-csv")
    (folders / "val" / "n01751748" / "ILSVRC2012_val_00000001.JPEG").rename(
        folders / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="class folder n01440764 but its annotation says n01751748"):
        build_dataset("imagenet", root=folders, split="val")


# ---------------------------------------------------------------------- torchvision's ImageNet classifiers


@pytest.fixture()
def offline_weights(tmp_path, monkeypatch):
    """TORCH_HOME in a temporary folder holding resnet50's weight file under torchvision's own name (random
    weights: nothing here may download), and no network: a missing file cannot be fetched."""
    import urllib.error

    import torchvision

    from maskbench.classifiers import weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    path = weights_file("resnet50")
    assert path.parent == tmp_path / "torch" / "hub" / "checkpoints" and path.name == "resnet50-0676ba61.pth"
    return path, torchvision.models.resnet50(weights=None).state_dict()


def test_a_missing_weights_file_is_named_with_where_torchvision_expects_it(offline_weights):
    from maskbench.classifiers import imagenet_classifier
    from maskbench.core.errors import MaskbenchError

    path, _ = offline_weights
    with pytest.raises(MaskbenchError) as err:
        imagenet_classifier("resnet50", torch.device("cpu"))
    assert str(path) in str(err.value) and "download.pytorch.org" in str(err.value)
    with pytest.raises(MaskbenchError, match="vgg16, resnet50"):
        imagenet_classifier("smallcnn", torch.device("cpu"))


def test_resnet50_on_imagenet_is_torchvisions_model_scored_with_softmax_everywhere(offline_weights, tmp_path):
    import json

    import pandas as pd

    from maskbench.benchmark.cli import main
    from maskbench.core.scores import probability_kind

    path, state = offline_weights
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    from maskbench.classifiers import imagenet_classifier

    model, info = imagenet_classifier("resnet50", torch.device("cpu"))
    assert probability_kind(model) == "softmax" and info["probabilities"] == "softmax" and not info["fine_tuned"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), _torchvision_resnet(state)(x))  # the model itself, its own head
    # end to end: the dgmp-test split, resnet50's softmax in the methods (score=auto) and the metrics
    root = write_imagenet_fixture(tmp_path / "imagenet")
    results = tmp_path / "res"
    assert main(["bench", "--dataset", "imagenet", "--data-root", str(root), "--model", "resnet50",
                 "--image-size", "32", "--methods", "gradcam,rise,constant-0.5", "--param", "rise.num_masks=16",
                 "--cache", str(tmp_path / "cache"), "--results", str(results), "--no-progress"]) == 0
    run = next((results / "imagenet").iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["classifier"]["probabilities"] == "softmax" and manifest["classifier"]["weights"]
    seg = pd.read_csv(run / "segmentation.csv")
    gt = seg[seg["statistic"].isin(["acc", "iou", "mae"])]  # no segmentation: undefined, never 0
    assert len(gt) == 9 and gt["value"].isna().all() and (gt["images"] == 0).all()
    assert seg.loc[seg["statistic"] == "sal", "value"].notna().all()  # Sal needs no ground truth
    assert pd.read_csv(run / "explainability.csv")["value"].notna().all()  # boxes: M_I defined


def _torchvision_resnet(state):
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    net.load_state_dict(state)
    return net.eval()


def _write_train_tree(root, per_class: dict[str, int]):
    from PIL import Image

    for k, (wnid, n) in enumerate(per_class.items()):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20 + i, 16), (k * 40, i * 10, 0)).save(root / "train" / wnid / f"{wnid}_{i}.JPEG")
    return root


def test_the_training_split_is_labelled_by_its_folders_and_the_holdout_is_disjoint(tmp_path, monkeypatch):
    per_class = {"n01440764": 7, "n01443537": 6, "n15075141": 7}  # 20 images: the holdout is a tenth
    root = _write_train_tree(write_imagenet_fixture(tmp_path), per_class)
    train = build_dataset("imagenet", root=root, split="train", image_size=32)
    held = build_dataset("imagenet", root=root, split="train-holdout", image_size=32)
    assert len(held) == 2 and len(train) == 18 and not set(train.image_ids) & set(held.image_ids)
    assert held.image_ids == build_dataset("imagenet", root=root, split="train-holdout").image_ids  # seeded
    wnids = inet.synsets()
    for data in (train, held):
        for image_id in data.image_ids:
            s = data.load(image_id)
            assert torch.nonzero(s.label).flatten().tolist() == [wnids.index(image_id.split("_")[0])]
            assert s.boxes.shape == (0, 4) and s.box_labels.numel() == 0 and s.image.shape == (3, 32, 32)
    monkeypatch.setattr(inet, "HOLDOUT_SIZE", 1)  # 10,000 on the real set: the smaller of the two
    assert len(build_dataset("imagenet", root=root, split="train-holdout")) == 1
    (root / "train" / "n99999999").mkdir()
    with pytest.raises(DataError, match="n99999999"):
        build_dataset("imagenet", root=root, split="train")
